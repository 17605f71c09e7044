"""The job store on each database it supports, a SQLite file and a real PostgreSQL server: migrations, a restart,
state transitions, and concurrent writers that each hold their own connections, as several service replicas would."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from service.store import PolicyExists, Store


def _head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", "service/migrations")
    return ScriptDirectory.from_config(config).get_current_head()


def _race(n: int, work: Callable[[int], object]) -> list[object]:
    """Run work(0..n-1) in n threads released together; return each result or the exception it raised."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # collected: the test asserts on what each writer saw
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_migrations_reach_head_and_a_restart_keeps_everything(database_url: str) -> None:
    store = Store(database_url)
    try:
        tables = set(inspect(store.engine).get_table_names())
        assert {"jobs", "job_transitions", "policies", "alembic_version"} <= tables
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head_revision()
        spec = {"name": "kept", "distill": {"beta": 0.25, "loss": "e-dpo"}, "data": {"source": "ünïcode.jsonl"}}
        store.create_job(job_id="job-1", name="kept", owner="alice", spec=spec, job_dir="/jobs/job-1")
        assert store.transition("job-1", "running", "started")
        store.add_policy(policy_id="pol-1", path="/jobs/job-1/distill", owner="alice", job_id="job-1")
    finally:
        store.close()

    restarted = Store(database_url)  # a second upgrade is a no-op and loses nothing
    try:
        job = restarted.get_job("job-1", owner="alice")
        assert job is not None and job.spec == spec and job.state == "running"
        assert job.started_at is not None and job.started_at.utcoffset() == dt.timedelta(0)
        assert [(t.from_state, t.to_state) for t in restarted.transitions("job-1")] == [
            (None, "pending"),
            ("pending", "running"),
        ]
        assert restarted.get_job("job-1", owner="bob") is None
        assert [p.id for p in restarted.list_policies("alice")] == ["pol-1"]
        with restarted.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        restarted.close()


def test_transitions_are_conditional_and_final_states_are_final(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.create_job(job_id="job-1", name="j", owner=None, spec={}, job_dir="/j")
        assert not store.transition("job-1", "succeeded", expect="running")  # still pending
        assert store.transition("job-1", "running")
        assert not store.transition("job-1", "running")  # already there
        assert store.transition("job-1", "cancelled", "stopped by its owner")
        assert not store.transition("job-1", "succeeded")  # final stays final
        job = store.get_job("job-1")
        assert job.state == "cancelled" and job.finished_at >= job.started_at
        assert store.count_by_state() == {"cancelled": 1}
        with pytest.raises(ValueError, match="unknown job state"):
            store.transition("job-1", "exploded")
    finally:
        store.close()


def test_concurrent_writers_never_lose_a_race(database_url: str) -> None:
    """Eight writers, each with its own engine (as separate service replicas have), race to end the same running
    job with different final states: exactly one wins, and the job's history records exactly that one."""
    Store(database_url).close()  # migrate once, before the racers start
    writers = [Store(database_url) for _ in range(8)]
    finals = ["succeeded", "failed", "cancelled"]
    try:
        for round_ in range(3):
            job_id = f"job-{round_}"
            writers[0].create_job(job_id=job_id, name="race", owner=None, spec={}, job_dir="/j", state="running")
            results = _race(
                8,
                lambda i, job_id=job_id: writers[i].transition(job_id, finals[i % 3], f"writer {i}", expect="running"),
            )
            assert [r for r in results if isinstance(r, Exception)] == []
            winners = [i for i, r in enumerate(results) if r is True]
            assert len(winners) == 1, results
            history = writers[0].transitions(job_id)
            assert [(t.from_state, t.to_state, t.reason) for t in history[1:]] == [
                ("running", finals[winners[0] % 3], f"writer {winners[0]}")
            ]
            assert writers[0].get_job(job_id).state == finals[winners[0] % 3]

        # Submissions from every writer at once all land; a policy id is taken exactly once.
        results = _race(
            8,
            lambda i: [
                writers[i].create_job(job_id=f"job-w{i}-{k}", name="many", owner="o", spec={}, job_dir="/j")
                for k in range(5)
            ],
        )
        assert [r for r in results if isinstance(r, Exception)] == []
        assert writers[0].list_jobs("o", name="many", limit=100)[1] == 40
        results = _race(8, lambda i: writers[i].add_policy(policy_id="pol-shared", path=f"/p{i}", owner="o"))
        assert sum(not isinstance(r, Exception) for r in results) == 1
        assert all(isinstance(r, PolicyExists) for r in results if isinstance(r, Exception)), results
    finally:
        for w in writers:
            w.close()


def test_the_service_runs_on_postgresql_and_a_restart_keeps_its_policies(postgres_server_url: str, tmp_path) -> None:
    """The real service over a socket, given a plain ``postgresql://`` URL as a user writes it (no driver named):
    a policy registered before a restart is served after it. No cluster is needed to register a policy."""
    import httpx
    from support.postgres import fresh_database

    from service.background import BackgroundServer
    from service.ray_backend import free_port
    from service.settings import Settings

    url = fresh_database(postgres_server_url, "service_restart").replace("postgresql+psycopg://", "postgresql://")
    (tmp_path / "datasets" / "model").mkdir(parents=True)
    (tmp_path / "datasets" / "model" / "config.json").write_text("{}")
    settings = Settings(data_dir=tmp_path, database_url=url, ray_address=f"http://127.0.0.1:{free_port()}")
    first = BackgroundServer(settings).start(timeout_s=120)
    try:
        created = httpx.post(f"{first.url}/v1/policies", json={"path": "model", "id": "kept-policy"})
        assert created.status_code == 201, created.text
    finally:
        first.stop()
    second = BackgroundServer(settings).start(timeout_s=120)
    try:
        held = httpx.get(f"{second.url}/v1/policies/kept-policy")
        assert held.status_code == 200 and held.json()["path"].endswith("datasets/model")
    finally:
        second.stop()
    store = Store(url)
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM policies")).scalars().all() == ["kept-policy"]
    finally:
        store.close()
