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

from voiceprint.engine.bounds import interval_problem
from voiceprint.engine.errors import InvalidInput, RefreshBusy, VoiceprintError
from voiceprint.storage import Store

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


SCHEDULE_PARTS = ("all", "timed", "min-new")  # what ``clear_schedule`` may remove
DEFAULT_CHECK_EVERY = "1m"


def set_schedule(
    home: str,
    db: str,
    *,
    every: str | None = None,
    cron: str | None = None,
    min_new: int | None = None,
    check_every: str | None = None,
) -> list[dict]:
    """Change the stored refresh schedule and return it.

    Each setting given replaces its own part and nothing else: ``every``/``cron`` the
    timed trigger (its next run is kept when only the count changes), ``min_new`` the
    count (for the timed job and the ``--min-new`` condition alike), ``check_every`` how
    often that count is looked at. Remove a part with :func:`clear_schedule`.
    """
    if every and cron:
        raise InvalidInput("give --every or --cron, not both")
    if not (every or cron or min_new is not None or check_every):
        raise InvalidInput("nothing to schedule: give --every, --cron, --min-new or --check-every")
    if min_new is not None and min_new < 1:
        raise InvalidInput("--min-new must be at least 1")
    new_timed = parse_cron(cron) if cron else _interval(every) if every else None
    new_poll = _interval(check_every) if check_every else None
    with _jobstore(db) as (scheduler, store):
        timed_job, poll_job = store.lookup_job(TIMED_JOB), store.lookup_job(POLL_JOB)
        count = min_new if min_new is not None else poll_job.kwargs.get("min_new") if poll_job else None
        if count is None and new_poll is not None:
            raise InvalidInput("--check-every says how often --min-new is counted, and no --min-new is set")
        timed = new_timed or (timed_job.trigger if timed_job else None)
        next_run = timed_job.next_run_time if timed_job is not None and new_timed is None else None
        poll = new_poll or (poll_job.trigger if poll_job else _interval(DEFAULT_CHECK_EVERY))
        _write(scheduler, store, home, db, timed, next_run, count, poll)
        return _listing(store)


def clear_schedule(db: str, part: str = "all") -> int:
    """Remove the refresh schedule, or one part of it: ``"timed"`` (``--every``/``--cron``)
    or ``"min-new"`` (the count; a timed job left then refreshes whenever one utterance
    is new). Returns how many stored jobs were removed."""
    if part not in SCHEDULE_PARTS:
        raise InvalidInput(f"--clear takes {', '.join(SCHEDULE_PARTS)}, not {part!r}")
    with _jobstore(db) as (scheduler, store):
        if part == "all":
            return _remove_ours(store)
        timed_job, poll_job = store.lookup_job(TIMED_JOB), store.lookup_job(POLL_JOB)
        gone = timed_job if part == "timed" else poll_job
        if gone is None:
            return 0
        home = gone.kwargs["home"]
        if part == "timed":
            count, poll = (poll_job.kwargs["min_new"], poll_job.trigger) if poll_job else (None, None)
            _write(scheduler, store, home, db, None, None, count, poll)
        else:
            timed, next_run = (timed_job.trigger, timed_job.next_run_time) if timed_job else (None, None)
            _write(scheduler, store, home, db, timed, next_run, None, None)
        return 1


def _interval(text: str) -> IntervalTrigger:
    return IntervalTrigger(seconds=parse_every(text).total_seconds(), timezone=UTC)


def _write(scheduler, store: Any, home: str, db: str, timed, next_run, count: int | None, poll) -> None:
    """Replace our stored jobs with the timed trigger (``next_run`` kept, or computed) and
    the ``count`` condition looked at every ``poll``; either may be None (not stored)."""
    jobs = []
    if timed is not None:
        why = f"schedule ({_describe(timed)})"
        kwargs = {"home": str(home), "db": db, "min_new": count or 1, "why": why}
        jobs.append((TIMED_JOB, timed, kwargs, next_run or timed.get_next_fire_time(None, datetime.now(UTC))))
    if count is not None:
        # Paused (no next run time): the service's job worker counts, not APScheduler.
        jobs.append((POLL_JOB, poll, {"home": str(home), "db": db, "min_new": count, "why": "enough new utterances"}, None))
    _remove_ours(store)
    for job_id, trigger, kwargs, run_at in jobs:
        # Written straight to the job store: starting a scheduler only to add jobs
        # would let its thread fire overdue jobs while it shuts down.
        store.add_job(
            Job(
                scheduler, id=job_id, name=job_id, func=run_scheduled_refresh, trigger=trigger,
                executor="default", args=(), kwargs=kwargs, coalesce=True, max_instances=1,
                misfire_grace_time=MISFIRE_GRACE_S, next_run_time=run_at,
            )
        )


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
    from voiceprint.engine import Engine

    try:
        with Engine.open(home=home, db=db) as eng:
            pending = eng.pending_utterances()
            # Due by its own count: a real refresh (taking the real requests queued). Else
            # the request waiting longest runs as it was asked: a dry run stays a dry run.
            request = eng.next_refresh_request() if min_new is None or pending < min_new else None
            if request is None and (min_new is None or pending < min_new):
                log.debug("scheduled refresh not due: %d pending, min_new %s, nothing queued", pending, min_new)
                return "not due"
            report = eng.refresh(dry_run=request is not None and request.dry_run, reason=f"{why}; {pending} pending")
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
