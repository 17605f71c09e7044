"""The persistent job store: jobs, every state transition with its time and reason, and registered policies.

SQLAlchemy 2.0 on any URL (SQLite file by default). The schema is versioned with Alembic; `Store.__init__` runs
`alembic upgrade head` with a Config built in code (migrations live in service/migrations/versions), so a new
release's tables are in place before the service answers. Objects are returned detached (expire_on_commit=False)
so callers read them without holding a session.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text, create_engine, func, select, update
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from ray_jobs.names import FINAL_STATES, JOB_STATES


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """SQLite drops the zone on the way in; every time in the store is UTC, so put it back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    ray_submission_id: Mapped[str | None] = mapped_column(String(128))
    job_dir: Mapped[str] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


class JobTransition(Base):
    __tablename__ = "job_transitions"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)


class Policy(Base):
    __tablename__ = "policies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    base_model: Mapped[str | None] = mapped_column(String(1024))
    loss: Mapped[str | None] = mapped_column(String(32))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when it is there already)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _owned(stmt: Any, model: type[Job] | type[Policy], owner: str | None) -> Any:
    # owner None means auth is off: everything is visible.
    return stmt if owner is None else stmt.where(model.owner == owner)


class PolicyExists(Exception):
    """A policy with this id is registered already."""


def engine_url(url: str) -> URL:
    """A user's database URL with the driver the server extra ships: a plain ``postgresql://`` would mean
    psycopg2, which is not installed; psycopg (3) is."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


class Store:
    def __init__(self, url: str):
        parsed = engine_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        connect_args = {"check_same_thread": False, "timeout": 30} if sqlite else {}
        if sqlite and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # pool_pre_ping: a PostgreSQL server restarted under a running service leaves dead pooled connections.
        self.engine = create_engine(parsed, connect_args=connect_args, pool_pre_ping=not sqlite)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- jobs --
    def create_job(
        self,
        *,
        job_id: str,
        name: str,
        owner: str | None,
        spec: dict[str, Any],
        job_dir: str,
        ray_submission_id: str | None = None,
        state: str = "pending",
        reason: str = "submitted",
    ) -> Job:
        job = Job(
            id=job_id,
            name=name,
            owner=owner,
            state=state,
            spec=spec,
            job_dir=job_dir,
            ray_submission_id=ray_submission_id,
        )
        with self.session() as s:
            s.add(job)
            s.add(JobTransition(job_id=job_id, from_state=None, to_state=state, reason=reason))
        return job

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        with self.session() as s:
            return s.scalars(_owned(select(Job).where(Job.id == job_id), Job, owner)).first()

    def list_jobs(
        self,
        owner: str | None = None,
        *,
        state: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """Newest first, with the total count before paging."""
        stmt = _owned(select(Job), Job, owner)
        if state:
            stmt = stmt.where(Job.state == state)
        if name:
            stmt = stmt.where(Job.name == name)
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = s.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
            return list(rows), total

    def active_jobs(self) -> list[Job]:
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.state.not_in(FINAL_STATES))).all())

    def count_active(self, owner: str | None) -> int:
        """An owner's jobs that are not final (everyone's when auth is off)."""
        stmt = _owned(select(func.count()).select_from(Job), Job, owner).where(Job.state.not_in(FINAL_STATES))
        with self.session() as s:
            return s.scalar(stmt) or 0

    def count_submitted(self) -> int:
        """Jobs handed to Ray and not final, everyone's: what the running-slot limit counts."""
        stmt = select(func.count()).select_from(Job).where(Job.state.not_in((*FINAL_STATES, "queued")))
        with self.session() as s:
            return s.scalar(stmt) or 0

    def count_queued(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) or 0

    def oldest_queued(self) -> Job | None:
        with self.session() as s:
            stmt = select(Job).where(Job.state == "queued").order_by(Job.created_at, Job.id).limit(1)
            return s.scalars(stmt).first()

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **fields))

    def transition(
        self, job_id: str, to: str, reason: str | None = None, *, expect: str | None = None, **fields: Any
    ) -> bool:
        """Move a job to state `to` and record it; with `expect`, only if it is still in that state (no lost races).

        Returns False (and changes nothing) when the job is in `to` already, is final, or left `expect`.
        """
        if to not in JOB_STATES:
            raise ValueError(f"unknown job state {to!r}")
        now = utcnow()
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.state == to or job.is_final or (expect is not None and job.state != expect):
                return False
            previous = job.state
            values: dict[str, Any] = {"state": to, "updated_at": now, **fields}
            if to == "running" and job.started_at is None:
                values["started_at"] = now
            if to in FINAL_STATES:
                values["finished_at"] = now
            # Conditional on the state we read, so a concurrent writer (follower vs. cancel) cannot be overwritten.
            result = s.execute(update(Job).where(Job.id == job_id, Job.state == previous).values(**values))
            if result.rowcount != 1:
                return False
            s.add(JobTransition(job_id=job_id, from_state=previous, to_state=to, at=now, reason=reason))
            return True

    def transitions(self, job_id: str) -> list[JobTransition]:
        with self.session() as s:
            stmt = select(JobTransition).where(JobTransition.job_id == job_id).order_by(JobTransition.id)
            return list(s.scalars(stmt).all())

    def count_by_state(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: count for state, count in rows}

    # -- policies (the serving helper reads these) --
    def add_policy(
        self,
        *,
        policy_id: str,
        path: str,
        owner: str | None,
        job_id: str | None = None,
        base_model: str | None = None,
        loss: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> Policy:
        policy = Policy(
            id=policy_id,
            job_id=job_id,
            owner=owner,
            path=path,
            base_model=base_model,
            loss=loss,
            summary=summary or {},
            created_at=utcnow(),
        )
        try:
            with self.session() as s:
                s.add(policy)  # an insert, never a merge: an id once taken is never overwritten
        except IntegrityError:
            raise PolicyExists(policy_id) from None
        return policy

    def get_policy(self, policy_id: str, owner: str | None = None) -> Policy | None:
        with self.session() as s:
            return s.scalars(_owned(select(Policy).where(Policy.id == policy_id), Policy, owner)).first()

    def list_policies(self, owner: str | None = None) -> list[Policy]:
        with self.session() as s:
            return list(s.scalars(_owned(select(Policy), Policy, owner).order_by(Policy.created_at.desc())).all())
