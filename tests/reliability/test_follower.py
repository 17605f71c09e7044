"""The job follower survives a database error, on SQLite and PostgreSQL: tracking resumes on the next pass instead
of ending for good, and reconciles what it finds."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import text

from service.follower import UNSUBMITTED_GRACE_S, JobFollower
from service.store import Store


def test_a_database_error_does_not_end_job_tracking(tmp_path, database_url):
    store = Store(database_url)
    # Ray is never asked: the only job was never submitted, which the follower judges from the store alone.
    follower = JobFollower(store, backend=None, interval_s=0.05)

    def sql(statement: str, **params: object) -> None:
        with store.engine.begin() as connection:
            connection.execute(text(statement), params)

    async def scenario() -> str:
        task = asyncio.create_task(follower.run())
        sql("ALTER TABLE jobs RENAME TO jobs_away")  # every pass now fails: no such table
        await asyncio.sleep(0.3)
        assert not task.done(), "the follower ended on a database error"
        sql("ALTER TABLE jobs_away RENAME TO jobs")
        store.create_job(job_id="job-lost", name="lost", owner=None, spec={}, job_dir=str(tmp_path / "job-lost"))
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=UNSUBMITTED_GRACE_S + 60)
        # SQLite stores naive UTC times (the store adds the zone back on reading); PostgreSQL keeps the zone.
        sqlite = store.engine.dialect.name == "sqlite"
        sql(
            "UPDATE jobs SET created_at = :t WHERE id = 'job-lost'",
            t=long_ago.replace(tzinfo=None) if sqlite else long_ago,
        )
        for _ in range(100):
            await asyncio.sleep(0.05)
            if store.get_job("job-lost").state != "pending":
                break
        task.cancel()
        return store.get_job("job-lost").state

    try:
        assert asyncio.run(scenario()) == "failed"  # tracked again: a never-submitted job is failed with its reason
        assert "never submitted" in store.get_job("job-lost").error
    finally:
        store.close()
