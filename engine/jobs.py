"""Jobs that change which version is active (refresh, rollback) run one at a time.

:func:`running_job` is the one wrapper around them: take the database-wide lock, start
the job (which also fails the jobs of processes that died holding it), and record the
outcome, or the failure of whatever the body raised.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from voiceprint.engine.errors import RefreshBusy, StorageError
from voiceprint.engine.events import event
from voiceprint.engine.progress import Progress, report
from voiceprint.storage import Job, ModelVersion, Store
from voiceprint.storage.jobs import UNFINISHED

log = logging.getLogger(__name__)

LOCK = "refresh"  # refreshes and rollbacks share one lock: both move the "active" alias


def job_owner() -> str:
    """``host:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RunningJob:
    """A started job; the body reports its outcome with :meth:`finish`."""

    def __init__(self, store: Store, job: Job) -> None:
        self.store, self.job = store, job
        self.started = time.monotonic()
        self.snapshot: Callable[[], dict] = dict  # what is known so far, recorded if the body fails

    @property
    def id(self) -> int:
        return self.job.id

    def attach(self, version: int) -> None:
        """Name the candidate version this job is building (a crash then rejects it)."""
        self.store.jobs.update_job(self.job.id, version=version)

    def recording(self, on_progress: Progress | None, every_s: float = 1.0) -> Progress:
        """``on_progress``, with the job's ``result["progress"]`` (stage, done, total)
        written as the work advances, so that another process (``GET /v1/jobs``, the
        console) can follow it: a new stage and its end at once, else at most every
        ``every_s``. The finished job's result replaces it."""
        last = {"at": 0.0, "stage": None}

        def record(done: int, total: int, what: str) -> None:
            report(on_progress, done, total, what)
            now = time.monotonic()
            if what == last["stage"] and done < total and now - last["at"] < every_s:
                return
            last.update(at=now, stage=what)
            try:
                self.store.jobs.update_job(self.job.id, result={"progress": {"stage": what, "done": done, "total": total}})
            except StorageError as exc:  # progress is a courtesy; the work goes on
                log.warning("job %d: progress not recorded (%s)", self.job.id, exc)

        return record

    def finish(self, status: str, *, result: dict, version: int | None = None) -> None:
        self.store.jobs.update_job(self.job.id, status=status, version=version, result=result)
        # The job's reason is left out: a client may write anything there, a name too.
        event(
            f"{self.job.kind}_finished", job=self.job.id, status=status, outcome=result.get("status"),
            version=version, parent=result.get("parent", result.get("previous")),
            why="; ".join(result.get("reasons") or []) or None, seconds=time.monotonic() - self.started,
        )


@contextmanager
def running_job(store: Store, kind: str, reason: str, *, dry_run: bool = False) -> Iterator[RunningJob]:
    """Run a ``kind`` job under the lock; :class:`~voiceprint.engine.errors.RefreshBusy` if it is taken.
    ``dry_run`` jobs take only queued dry-run requests, other jobs only the others.

    Any exception from the body (KeyboardInterrupt too: a job must not stay "running"
    after a clean stop) marks the job failed with the error and is re-raised. When even
    that cannot be recorded (a full disk), the body's error is still the one raised: the
    job reads "running" with the lock free, and :func:`recover_interrupted` fails it.
    """
    with store.exclusive(LOCK):
        job, interrupted = store.jobs.start_job(kind, reason, owner=job_owner(), dry_run=dry_run)
        for old in interrupted:
            log.warning("job %d was interrupted (its process stopped); marked failed", old.id)
        run = RunningJob(store, job)
        event(f"{kind}_started", job=job.id, owner=job.owner)
        try:
            yield run
        except BaseException as exc:
            event(f"{kind}_failed", logging.WARNING, job=job.id, error=getattr(exc, "code", type(exc).__name__))
            try:
                store.jobs.fail_job(job.id, result={**run.snapshot(), "error": str(exc) or type(exc).__name__})
            except StorageError as unrecorded:
                log.warning("job %d failed (%s), and the failure could not be recorded: %s", job.id, exc, unrecorded)
            raise


def unfinished(version: ModelVersion) -> bool:
    """A candidate no refresh finished promoting: still "candidate" (its refresh runs, or
    stopped and was not cleaned up yet), or rejected as unfinished once it was."""
    return version.status == "candidate" or (version.status == "rejected" and version.note == UNFINISHED)


def recover_interrupted(store: Store) -> list[Job]:
    """Fail the jobs that stopped processes left running; returns them.

    A job is only running while its process holds the lock, so a running job with the
    lock free is a dead one: a killed process, or one whose last update failed. The lock
    is taken only when a job reads running (a look costs one read, and a refresh starting
    meanwhile is not told "busy" for nothing), and held for the one write. Nothing changes
    while a live process holds it, nor when the write fails (a full disk): then the job
    is left for the next look, and a warning says why.
    """
    if not store.jobs.list_jobs(limit=1, status="running"):
        return []
    try:
        with store.exclusive(LOCK):
            return store.jobs.recover_interrupted_jobs()
    except RefreshBusy:
        return []
    except StorageError as exc:
        log.warning("a stopped job still reads running: %s", exc)
        return []
