"""The service's one job worker: queued refresh requests and the stored schedule (and,
at each tick, the retry of an erasure's file scrub that a reader held back, and a new
calibration once the enrolled population has changed enough).

A refresh request (``POST /v1/refresh``, or a drift signal from an enrollment) is a
``queued`` job; the stored schedule (``voiceprint schedule``) has a timed job, which
APScheduler fires, and a ``--min-new`` condition, which this worker counts. The worker
is the only thing that looks at the queue, and it looks through the service's own
engine: a refresh opens an Engine of its own, too much to do every few seconds just to
look.
"""

from __future__ import annotations

import logging
import threading
import time

from voiceprint.engine import errors, scheduler
from voiceprint.engine.scheduler import run_scheduled_refresh
from voiceprint.service.metrics import Metrics

log = logging.getLogger(__name__)


class JobWorker:
    """Runs due refreshes in a thread of its own, off the event loop.

    It looks every ``check_s`` seconds (``[service] refresh_check_s``) and at once when
    :attr:`wake` is set; the stored ``--min-new`` is counted at most every
    ``--check-every``.
    """

    def __init__(self, engine, home: str, db: str, check_s: float, metrics: Metrics) -> None:
        self.engine, self.home, self.db, self.check_s, self.metrics = engine, home, db, check_s, metrics
        self.schedule: scheduler.StoredSchedule | None = None  # running once it could start
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="voiceprint-jobs", daemon=True)
        self._counted_at = float("-inf")

    def start(self) -> None:
        self._start_schedule()
        self.thread.start()

    def stop(self) -> None:
        # A refresh in progress is not waited for: its job stays "running" and the next
        # process to start marks it failed, exactly as after a crash.
        self.stopping.set()
        self.wake.set()
        if self.schedule is not None:
            self.schedule.stop()

    def _start_schedule(self) -> None:
        """Start the stored schedule; when it cannot start (starting writes to the
        database, and the disk may be full) the service still serves, and each round
        tries again."""
        schedule = None
        try:
            schedule = scheduler.StoredSchedule(self.db)
            schedule.start()
            self.schedule = schedule
        except Exception as exc:  # APScheduler raises SQLAlchemy's own errors, untranslated
            log.warning("job worker: the refresh schedule cannot start yet (tried again every round): %s", exc)
            if schedule is not None:
                schedule.stop()

    def due(self) -> tuple[int | None, str] | None:
        """``(min_new, why)`` for :func:`~voiceprint.engine.scheduler.run_scheduled_refresh` when a
        refresh is due now: a request is queued, or the stored ``--min-new`` is reached."""
        if self.engine.queued_refresh():
            return None, "requested over HTTP"
        condition = self.schedule.min_new() if self.schedule is not None else None
        now = time.monotonic()
        if condition is None or now - self._counted_at < condition.every_s:
            return None
        self._counted_at = now
        if self.engine.pending_utterances() < condition.count:
            return None
        return condition.count, condition.why

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.check_s)
            self.wake.clear()
            if self.stopping.is_set():
                break
            if self.schedule is None:
                self._start_schedule()
            recover_jobs(self.engine)  # a refresh whose last update failed (a full disk) reads running
            try:
                self.engine.scrub_files()  # an erasure's scrub left pending behind a reader (storage.scrub)
                recalibrate(self.engine)
                if self.schedule is not None:
                    self.schedule.look()
                due = self.due()
            except errors.StorageError as exc:  # the database is away: look again next time
                log.warning("job worker: cannot read queued jobs or the schedule: %s", exc)
                continue
            if due is None:
                continue
            outcome = run_scheduled_refresh(self.home, self.db, *due)
            if outcome != "not due":  # "refreshed: promoted", "busy", "failed: why", ...
                label = "failed" if outcome.startswith("failed") else outcome.removeprefix("refreshed: ")
                self.metrics.refreshes.labels(label).inc()
            if outcome.startswith("refreshed"):
                self.wake.set()  # a request of the other kind (dry run or not) may wait: look again now


def recalibrate(engine) -> None:
    """Calibrate again once the population changed by ``[scoring] recalibrate_change``.
    Never fatal: a fit that fails is logged, and the worker goes on refreshing."""
    try:
        engine.calibrate_if_needed()
    except errors.StorageError:
        raise  # the caller's "database is away" handling
    except Exception:  # a bug in a fit must not stop the one job worker
        log.exception("job worker: the automatic calibration failed")


def recover_jobs(engine) -> None:
    """Mark jobs a stopped process left running as failed (the engine leaves them alone
    while a live process holds the refresh lock: then its running job is real). Never
    fatal: a service that cannot write (a full disk) still identifies."""
    try:
        recovered = engine.recover_interrupted_jobs()
    except errors.StorageError as exc:
        log.warning("job worker: cannot look for interrupted jobs: %s", exc)
        return
    for job in recovered:
        log.warning("job %d (%s) was interrupted by a stopped process: marked failed", job.id, job.kind)
