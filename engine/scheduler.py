"""When refreshes run: APScheduler 3.x, its schedules persisted in the voiceprint database.

Two jobs at most, with stable ids, so setting a schedule again replaces it:

``voiceprint-refresh-timed``
    ``--every 6h`` or ``--cron "0 3 * * *"``: refresh at those times, provided at least
    ``min_new`` utterances (default 1) arrived since the active version was trained.
``voiceprint-refresh-poll``
    Stored only when ``--min-new`` is given: refresh as soon as that many utterances
    are pending, looked at every ``check_every`` (default 1 minute). It is stored
    paused, so APScheduler never fires it: the service's job worker, which watches the
    queue of refresh requests anyway, reads it (:meth:`StoredSchedule.min_new`) and does
    the counting. One poller, and no Engine opened just to look.

Schedules live in APScheduler's ``apscheduler_jobs`` table next to ours, so they survive
restarts and every server process sharing the database sees the same ones. Running them
needs a ``voiceprint serve`` process, which reads a changed schedule without a restart.
Two processes firing at once is harmless: the refresh itself takes a database-wide lock,
and the loser logs that it was busy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from engine.bounds import interval_problem
from engine.errors import InvalidInput, RefreshBusy, VoiceprintError
from storage import Store

log = logging.getLogger(__name__)

TIMED_JOB = "voiceprint-refresh-timed"
POLL_JOB = "voiceprint-refresh-poll"
MISFIRE_GRACE_S = 3600  # a run missed while no server was up still happens within the hour


def parse_every(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"6h"``, ``"2d"`` -> a positive timedelta.

    >>> parse_every("6h")
    datetime.timedelta(seconds=21600)
    """
    seconds, problem = interval_problem(text)
    if problem is not None:
        raise InvalidInput(f"interval {problem}")
    return timedelta(seconds=seconds)


def parse_cron(text: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(text, timezone=UTC)
    except ValueError as exc:
        raise InvalidInput(f"cron {text!r}: {exc} (five fields: minute hour day month weekday)") from None


@dataclass(frozen=True)
class MinNew:
    """The stored ``--min-new`` condition: refresh once ``count`` utterances are pending."""

    count: int
    every_s: float  # how often to count
    why: str  # recorded as the refresh job's reason


def new_scheduler(store: Store) -> BackgroundScheduler:
    return BackgroundScheduler(
        jobstores={"default": store.jobs.scheduler_jobstore()},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=UTC,
    )


def set_schedule(
    home: str,
    db: str,
    *,
    every: str | None = None,
    cron: str | None = None,
    min_new: int | None = None,
    check_every: str = "1m",
) -> list[dict]:
    """Store the refresh schedule (replacing any previous one) and return it."""
    if every and cron:
        raise InvalidInput("give --every or --cron, not both")
    if not (every or cron or min_new):
        raise InvalidInput("nothing to schedule: give --every, --cron or --min-new")
    if min_new is not None and min_new < 1:
        raise InvalidInput("--min-new must be at least 1")
    timed = IntervalTrigger(seconds=parse_every(every).total_seconds(), timezone=UTC) if every else None
    timed = parse_cron(cron) if cron else timed
    poll = IntervalTrigger(seconds=parse_every(check_every).total_seconds(), timezone=UTC)
    now = datetime.now(UTC)
    jobs = []
    if timed is not None:
        why = f"schedule ({_describe(timed)})"
        kwargs = {"home": str(home), "db": db, "min_new": min_new or 1, "why": why}
        jobs.append((TIMED_JOB, timed, kwargs, timed.get_next_fire_time(None, now)))
    if min_new is not None:
        # Paused (no next run time): the service's job worker counts, not APScheduler.
        jobs.append((POLL_JOB, poll, {"home": str(home), "db": db, "min_new": min_new, "why": "enough new utterances"}, None))
    with _jobstore(db) as (scheduler, store):
        _remove_ours(store)
        for job_id, trigger, kwargs, next_run in jobs:
            # Written straight to the job store: starting a scheduler only to add jobs
            # would let its thread fire overdue jobs while it shuts down.
            store.add_job(
                Job(
                    scheduler, id=job_id, name=job_id, func=run_scheduled_refresh, trigger=trigger,
                    executor="default", args=(), kwargs=kwargs, coalesce=True, max_instances=1,
                    misfire_grace_time=MISFIRE_GRACE_S, next_run_time=next_run,
                )
            )
        return _listing(store)


def clear_schedule(db: str) -> int:
    """Remove the refresh schedule; returns how many jobs were removed."""
    with _jobstore(db) as (_, store):
        return _remove_ours(store)


def list_schedule(db: str) -> list[dict]:
    with _jobstore(db) as (_, store):
        return _listing(store)


@contextmanager
def _jobstore(db: str) -> Iterator[tuple[BackgroundScheduler, Any]]:
    """The job store of ``db``, opened without running a scheduler."""
    with Store(db) as store:
        scheduler = new_scheduler(store)
        jobstore = store.jobs.scheduler_jobstore()
        jobstore.start(scheduler, "default")
        try:
            yield scheduler, jobstore
        finally:
            jobstore.shutdown()


def _remove_ours(jobstore: Any) -> int:
    removed = 0
    for job_id in (TIMED_JOB, POLL_JOB):
        if jobstore.lookup_job(job_id) is not None:
            jobstore.remove_job(job_id)
            removed += 1
    return removed


def _listing(jobstore: Any) -> list[dict]:
    return [
        {
            "id": job.id,
            "trigger": _describe(job.trigger),
            "min_new": job.kwargs.get("min_new"),
            "next_run": job.next_run_time.astimezone(UTC).isoformat() if job.next_run_time else None,
        }
        for job in sorted(jobstore.get_all_jobs(), key=lambda job: job.id)
    ]


def _describe(trigger) -> str:
    if isinstance(trigger, IntervalTrigger):
        seconds = int(trigger.interval.total_seconds())
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"every {seconds // size}{unit}"
        return f"every {seconds}s"
    if isinstance(trigger, CronTrigger):
        fields = {f.name: str(f) for f in trigger.fields}
        return "cron " + " ".join(fields[n] for n in ("minute", "hour", "day", "month", "day_of_week"))
    return str(trigger)


def run_scheduled_refresh(home: str, db: str, min_new: int | None, why: str) -> str:
    """The scheduled job: refresh if it is due, and never raise into the scheduler.

    Returns what it did ("refreshed: promoted", "not due", "busy", "failed: ...") for the
    log and the tests.
    """
    from engine import Engine

    try:
        with Engine.open(home=home, db=db) as eng:
            queued = eng.queued_refresh()
            pending = eng.pending_utterances()
            if not queued and (min_new is None or pending < min_new):
                log.debug("scheduled refresh not due: %d pending, min_new %s, nothing queued", pending, min_new)
                return "not due"
            report = eng.refresh(reason=f"{why}; {pending} pending")
            log.info("scheduled refresh job %d: %s (version %s)", report.job, report.status, report.version)
            return f"refreshed: {report.status}"
    except RefreshBusy:
        log.info("scheduled refresh skipped: another process is refreshing")
        return "busy"
    except VoiceprintError as exc:
        log.error("scheduled refresh failed: %s", exc)
        return f"failed: {exc}"
    except Exception as exc:  # the scheduler thread must survive anything a refresh throws
        log.exception("scheduled refresh crashed")
        return f"failed: {exc}"


class StoredSchedule:
    """The stored schedule of ``db``, run while ``voiceprint serve`` is up.

    APScheduler fires the timed job; :meth:`min_new` hands the ``--min-new`` condition to
    the service's job worker, which calls :meth:`look` on each of its rounds so that a
    schedule another process stored takes effect without a restart.
    """

    def __init__(self, db: str) -> None:
        self.store = Store(db)
        self.scheduler = new_scheduler(self.store)

    def start(self) -> None:
        self.scheduler.start(paused=True)
        stored = self.scheduler.get_job(POLL_JOB)
        if stored is not None and stored.next_run_time is not None:
            stored.pause()  # stored live by a version that let APScheduler poll; the worker does now
        self.scheduler.resume()
        log.info("scheduler running with %d job(s)", len(self.scheduler.get_jobs()))

    def look(self) -> None:
        # APScheduler sleeps until the next run time it knows of, so a timed job stored
        # meanwhile by another process would wait for that; waking makes it read the store.
        self.scheduler.wakeup()

    def min_new(self) -> MinNew | None:
        """The stored ``--min-new`` condition, read from the job store now."""
        job = self.scheduler.get_job(POLL_JOB)
        if job is None or not job.kwargs.get("min_new"):
            return None
        return MinNew(job.kwargs["min_new"], job.trigger.interval.total_seconds(), job.kwargs["why"])

    def stop(self) -> None:
        # Don't wait for a refresh in progress: its job row stays "running" and the
        # next refresh marks it failed, exactly as after a crash.
        if self.scheduler.running:  # not when start() failed (a full disk)
            self.scheduler.shutdown(wait=False)
        self.store.close()
