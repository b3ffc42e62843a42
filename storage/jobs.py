"""Jobs (refreshes, rollbacks): queued, started under a lock, finished or interrupted;
and the scheduler's own job store beside them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from voiceprint.engine.errors import InvalidInput
from voiceprint.storage import db, feed, ids
from voiceprint.storage import models as m
from voiceprint.storage.records import Job

FINISHED_JOB = ("succeeded", "rejected", "failed", "skipped")
INTERRUPTED = "interrupted: the process running it stopped"  # the error of a job found running, lock free
UNFINISHED = "interrupted before promotion"  # the note of a candidate its refresh never finished


class Jobs:
    """The job table: what was asked for, what runs, and how each job ended."""

    def __init__(self, database: db.Database):
        self._db = database

    def queue_job(self, kind: str, reason: str, *, dry_run: bool = False) -> Job:
        """Ask for a job (e.g. a refresh requested by a drift signal); it runs later.
        ``dry_run``: a refresh that trains and evaluates and stores no version."""
        with self._db.session(f"queue a {kind} job", write=True) as s:
            row = m.Job(kind=kind, status="queued", reason=reason, dry_run=dry_run, result={}, requested_at=db.now())
            s.add(row)
            s.flush()
            return _job_record(row)

    def start_job(self, kind: str, reason: str, *, owner: str, dry_run: bool = False) -> tuple[Job, list[Job]]:
        """Start a job of ``kind``; call it only while holding ``Store.exclusive`` for it.

        Because the caller holds the lock, any job still marked running belongs to a
        process that died: it is marked failed, and the candidate version it left half
        built is rejected and its embeddings removed. The oldest queued request of this
        kind becomes the started job; later ones are marked skipped (covered by it). Only
        requests of the same ``dry_run`` are taken: a dry run stores nothing, so it
        covers no real request, and a real refresh does not stand in for a dry run.

        Returns the started job and the interrupted ones that were cleaned up.
        """
        with self._db.session(f"start a {kind} job", write=True) as s:
            now = db.now()
            interrupted = _fail_interrupted(s, now)
            queued = list(
                s.scalars(
                    select(m.Job)
                    .where(m.Job.kind == kind, m.Job.status == "queued", m.Job.dry_run == dry_run)
                    .order_by(m.Job.id)
                )
            )
            if queued:
                job, rest = queued[0], queued[1:]
                job.reason = _joined_reason(job.reason, reason)
            else:
                job, rest = m.Job(kind=kind, reason=reason, dry_run=dry_run, result={}, requested_at=now), []
                s.add(job)
            job.status, job.owner, job.started_at = "running", owner, now
            s.flush()
            for other in rest:
                other.status, other.finished_at, other.result = "skipped", now, {"covered_by": job.id}
            s.flush()
            return _job_record(job), [_job_record(j) for j in interrupted]

    def recover_interrupted_jobs(self) -> list[Job]:
        """Mark jobs left running by a process that died as failed (and reject the
        candidate each left half built); call it only while holding ``Store.exclusive``.

        A starting service calls this, so a job killed with its process reads as failed
        at once rather than when the next refresh starts.
        """
        with self._db.session("recover interrupted jobs", write=True) as s:
            return [_job_record(j) for j in _fail_interrupted(s, db.now())]

    def fail_job(self, job_id: int, *, result: dict) -> Job:
        """Record that a job failed; a candidate it was promoting is rejected as unfinished
        (as after a crash: see :meth:`start_job`)."""
        with self._db.session(f"record the failure of job {job_id}", write=True) as s:
            row = _job_row(s, job_id)
            _fail(s, row, db.now(), result)
            s.flush()
            return _job_record(row)

    def update_job(
        self, job_id: int, *, status: str | None = None, version: int | None = None, result: dict | None = None
    ) -> Job:
        """Record progress or the outcome of a job; a finished status stamps ``finished_at``."""
        if status is not None and status not in m.JOB_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(m.JOB_STATUSES)}")
        with self._db.session(f"update job {job_id}", write=True) as s:
            row = _job_row(s, job_id)
            if status is not None:
                row.status = status
                if status in FINISHED_JOB:
                    row.finished_at = db.now()
            if version is not None:
                row.version = version
            if result is not None:
                row.result = result
            s.flush()
            return _job_record(row)

    def get_job(self, job_id: int) -> Job:
        with self._db.session(f"read job {job_id}") as s:
            return _job_record(_job_row(s, job_id))

    def oldest_queued(self, kind: str) -> Job | None:
        """The request of ``kind`` waiting longest (the next one a worker should run), or None."""
        with self._db.session(f"read the queued {kind} jobs") as s:
            query = select(m.Job).where(m.Job.kind == kind, m.Job.status == "queued").order_by(m.Job.id).limit(1)
            row = s.scalars(query).first()
            return None if row is None else _job_record(row)

    def list_jobs(self, *, limit: int = 20, status: str | None = None) -> list[Job]:
        """The newest ``limit`` jobs (optionally of one status), newest first."""
        with self._db.session("list jobs") as s:
            query = select(m.Job).order_by(m.Job.id.desc()).limit(limit)
            if status is not None:
                query = query.where(m.Job.status == status)
            return [_job_record(row) for row in s.scalars(query)]

    def scheduler_jobstore(self, tablename: str = "apscheduler_jobs") -> Any:
        """An APScheduler job store in this database, on this store's write engine.

        Sharing the engine gives the scheduler's writes the same SQLite settings (busy
        timeout, BEGIN IMMEDIATE) as ours, so the two never trip over each other's locks.
        The table is APScheduler's own; Alembic leaves it alone (see migrations/env.py).
        """
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

        return SQLAlchemyJobStore(engine=self._db.write_engine, tablename=tablename)


def _fail_interrupted(s: Session, now: datetime) -> list[m.Job]:
    """Jobs marked running while the caller holds the job lock belong to dead processes
    (every kind: refreshes and rollbacks share one lock)."""
    interrupted = list(s.scalars(select(m.Job).where(m.Job.status == "running")))
    for job in interrupted:
        _fail(s, job, now, {**job.result, "error": INTERRUPTED})
    s.flush()
    return interrupted


def _fail(s: Session, job: m.Job, now: datetime, result: dict) -> None:
    """Mark ``job`` failed; the candidate it was promoting, never finished, is rejected
    (:data:`UNFINISHED`) and its embeddings and centroids removed."""
    job.status, job.finished_at, job.result = "failed", now, result
    if job.version is not None:
        version = s.get(m.ModelVersion, job.version)
        if version is not None and version.status == "candidate":
            version.status, version.note = "rejected", UNFINISHED
            feed.delete_centroids(s, m.Centroid.version == job.version)
            s.execute(delete(m.Embedding).where(m.Embedding.version == job.version))


def _job_row(s: Session, job_id: int) -> m.Job:
    row = ids.get(s, m.Job, job_id)
    if row is None:
        raise InvalidInput(f"no job {job_id}")
    return row


def _job_record(row: m.Job) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        status=row.status,
        reason=row.reason,
        owner=row.owner,
        version=row.version,
        result=dict(row.result or {}),
        requested_at=row.requested_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        dry_run=bool(row.dry_run),
    )


def _joined_reason(requested: str, starting: str) -> str:
    """The reason a request was queued with, then what the run that took it adds, each
    part once: "requested over HTTP" and "requested over HTTP; 57 pending" make
    "requested over HTTP; 57 pending"."""
    parts = requested.split("; ")
    return "; ".join(parts + [part for part in starting.split("; ") if part not in parts])
