"""Jobs that change which version is active (refresh, rollback) run one at a time.

:func:`running_job` is the one wrapper around them: take the database-wide lock, start
the job (which also fails the jobs of processes that died holding it), and record the
outcome, or the failure of whatever the body raised.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine.errors import RefreshBusy
from storage import Job, Store

log = logging.getLogger(__name__)

LOCK = "refresh"  # refreshes and rollbacks share one lock: both move the "active" alias


def job_owner() -> str:
    """``host:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RunningJob:
    """A started job; the body reports its outcome with :meth:`finish`."""

    def __init__(self, store: Store, job: Job) -> None:
        self.store, self.job = store, job
        self.snapshot: Callable[[], dict] = dict  # what is known so far, recorded if the body fails

    @property
    def id(self) -> int:
        return self.job.id

    def attach(self, version: int) -> None:
        """Name the candidate version this job is building (a crash then rejects it)."""
        self.store.jobs.update_job(self.job.id, version=version)

    def finish(self, status: str, *, result: dict, version: int | None = None) -> None:
        self.store.jobs.update_job(self.job.id, status=status, version=version, result=result)


@contextmanager
def running_job(store: Store, kind: str, reason: str) -> Iterator[RunningJob]:
    """Run a ``kind`` job under the lock; :class:`~engine.errors.RefreshBusy` if it is taken.

    Any exception from the body (KeyboardInterrupt too: a job must not stay "running"
    after a clean stop) marks the job failed with the error and is re-raised.
    """
    with store.exclusive(LOCK):
        job, interrupted = store.jobs.start_job(kind, reason, owner=job_owner())
        for old in interrupted:
            log.warning("job %d was interrupted (its process stopped); marked failed", old.id)
        run = RunningJob(store, job)
        try:
            yield run
        except BaseException as exc:
            store.jobs.update_job(job.id, status="failed", result={**run.snapshot(), "error": str(exc) or type(exc).__name__})
            raise


def recover_interrupted(store: Store) -> list[Job]:
    """Fail the jobs that dead processes left running, unless a live process holds the
    lock (then its running job is real and nothing is changed)."""
    try:
        with store.exclusive(LOCK):
            return store.jobs.recover_interrupted_jobs()
    except RefreshBusy:
        return []
