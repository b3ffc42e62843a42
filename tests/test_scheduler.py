"""Refresh scheduling: persisted schedules, the due-or-not decision, the service's job
worker as the one poller, and `voiceprint serve`."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voiceprint.engine import Engine, scheduler
from voiceprint.engine.errors import InvalidInput
from voiceprint.service.metrics import Metrics
from voiceprint.service.worker import JobWorker
from voiceprint.storage import Store

REPO = Path(__file__).resolve().parents[1]
SMALL_REFRESH = "[refresh]\nsteps = 2\nspeakers_per_batch = 4\nholdout_fraction = 0.3\n"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voiceprint.cli", *argv], cwd=REPO, capture_output=True, text=True, timeout=600)


def vctk_items(dev_data: Path, per_speaker: int) -> list:
    files: dict[str, list] = {}
    with open(dev_data / "vctk-4" / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            files.setdefault(row["speaker"], []).append(dev_data / "vctk-4" / row["path"])
    return [(s, p, None) for s, paths in files.items() for p in paths[:per_speaker]]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def home_db(request, tmp_path) -> tuple[Path, str]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(SMALL_REFRESH)
    db = request.getfixturevalue("fresh_pg_url") if request.param == "postgresql" else f"sqlite:///{home / 'voiceprint.db'}"
    Engine.init(home=home, db=db).close()
    return home, db


def test_intervals_and_cron_are_checked():
    assert scheduler.parse_every("90s").total_seconds() == 90
    assert scheduler.parse_every(" 2d ").total_seconds() == 2 * 86400
    for bad in ("", "6", "0h", "6w", "-1m", "1.5h"):
        with pytest.raises(InvalidInput):
            scheduler.parse_every(bad)
    with pytest.raises(InvalidInput, match="five fields"):
        scheduler.parse_cron("0 3 * *")


def test_schedules_persist_across_processes(home_db):
    home, db = home_db
    base = ["--home", str(home), "--db", db, "--json"]
    set_ = cli(*base, "schedule", "--every", "6h", "--min-new", "50")
    assert set_.returncode == 0, set_.stderr
    jobs = json.loads(set_.stdout)["jobs"]
    assert [(j["id"], j["trigger"], j["min_new"]) for j in jobs] == [
        (scheduler.POLL_JOB, "every 1m", 50),
        (scheduler.TIMED_JOB, "every 6h", 50),
    ]
    # The --min-new condition is stored paused: APScheduler never fires it, the
    # service's job worker counts (test_only_the_service_worker_polls).
    assert jobs[0]["next_run"] is None and jobs[1]["next_run"] is not None
    # Another process (and a restarted server) reads the same schedule back.
    listed = json.loads(cli(*base, "schedule", "--list").stdout)["jobs"]
    assert listed == jobs
    # Setting again replaces the timed trigger only: the --min-new given before stays.
    cron = json.loads(cli(*base, "schedule", "--cron", "0 3 * * *").stdout)["jobs"]
    assert [(j["id"], j["trigger"], j["min_new"]) for j in cron] == [
        (scheduler.POLL_JOB, "every 1m", 50),
        (scheduler.TIMED_JOB, "cron 0 3 * * *", 50),
    ]
    assert cron[1]["next_run"].endswith("03:00:00+00:00")
    status = json.loads(cli(*base, "status").stdout)
    assert status["active_version"] == 1 and status["pending_utterances"] == 0
    assert [j["id"] for j in status["schedule"]] == [scheduler.POLL_JOB, scheduler.TIMED_JOB]
    # Clearing one part leaves the other as it was; the timed job then needs one new utterance.
    cleared = json.loads(cli(*base, "schedule", "--clear", "min-new").stdout)
    assert cleared["removed"] == 1
    assert [(j["id"], j["trigger"], j["min_new"], j["next_run"]) for j in cleared["jobs"]] == [
        (scheduler.TIMED_JOB, "cron 0 3 * * *", 1, cron[1]["next_run"])
    ]
    count_only = json.loads(cli(*base, "schedule", "--clear", "timed").stdout)
    assert count_only["removed"] == 1 and count_only["jobs"] == []
    count_only = json.loads(cli(*base, "schedule", "--min-new", "5", "--check-every", "30s").stdout)["jobs"]
    assert [(j["id"], j["trigger"], j["min_new"], j["next_run"]) for j in count_only] == [(scheduler.POLL_JOB, "every 30s", 5, None)]
    cleared = cli(*base, "schedule", "--clear")
    assert json.loads(cleared.stdout)["removed"] == 1 and scheduler.list_schedule(db) == []


def test_each_schedule_setting_changes_only_itself(home_db):
    """--cron after --min-new keeps the count, --min-new keeps the trigger and its next run,
    --check-every keeps both; a --check-every with no count to check is refused."""
    home, db = home_db
    with pytest.raises(InvalidInput, match="no --min-new"):
        scheduler.set_schedule(str(home), db, check_every="10s")
    assert scheduler.list_schedule(db) == []
    scheduler.set_schedule(str(home), db, min_new=7, check_every="20s")
    timed = scheduler.set_schedule(str(home), db, every="6h")
    shape = lambda jobs: [(j["id"], j["trigger"], j["min_new"]) for j in jobs]  # noqa: E731
    assert shape(timed) == [(scheduler.POLL_JOB, "every 20s", 7), (scheduler.TIMED_JOB, "every 6h", 7)]
    time.sleep(1.1)  # a recomputed interval run would land a second later
    counted = scheduler.set_schedule(str(home), db, min_new=3)
    assert shape(counted) == [(scheduler.POLL_JOB, "every 20s", 3), (scheduler.TIMED_JOB, "every 6h", 3)]
    assert counted[1]["next_run"] == timed[1]["next_run"]
    checked = scheduler.set_schedule(str(home), db, check_every="5m")
    assert shape(checked) == [(scheduler.POLL_JOB, "every 5m", 3), (scheduler.TIMED_JOB, "every 6h", 3)]
    assert scheduler.clear_schedule(db, "timed") == 1
    assert shape(scheduler.list_schedule(db)) == [(scheduler.POLL_JOB, "every 5m", 3)]
    assert scheduler.clear_schedule(db, "timed") == 0
    with pytest.raises(InvalidInput, match="--clear takes"):
        scheduler.clear_schedule(db, "everything")


def test_bad_schedules_are_refused_and_store_nothing(home_db):
    home, db = home_db
    base = ["--home", str(home), "--db", db]
    for args in (["--every", "5x"], ["--cron", "bad"], ["--min-new", "0"], ["--every", "1h", "--cron", "0 3 * * *"],
                 ["--check-every", "1m"], ["--clear", "--min-new", "3"], ["--clear", "everything"]):
        result = cli(*base, "schedule", *args)
        assert result.returncode == 2 and "error: " in result.stderr, (args, result.stderr)
    assert scheduler.list_schedule(db) == []


def test_scheduled_job_refreshes_only_when_due(home_db, dev_data):
    home, db = home_db
    with Engine.open(home=home, db=db) as eng:
        eng.enroll_many(vctk_items(dev_data, 10))
        pending = eng.pending_utterances()
    assert pending == 40
    assert scheduler.run_scheduled_refresh(str(home), db, min_new=41, why="test") == "not due"
    with Engine.open(home=home, db=db) as eng:
        assert eng.jobs() == []
    with Store(db) as store, store.exclusive("refresh"):  # someone else is refreshing
        assert scheduler.run_scheduled_refresh(str(home), db, min_new=40, why="test") == "busy"
    outcome = scheduler.run_scheduled_refresh(str(home), db, min_new=40, why="test")
    assert outcome.startswith("refreshed: "), outcome
    with Engine.open(home=home, db=db) as eng:
        job = eng.jobs()[0]
        assert job.reason == "test; 40 pending" and job.status in {"succeeded", "rejected"}
        # A queued request makes the job due even without enough new utterances.
        eng.request_refresh("drift: test")
    outcome = scheduler.run_scheduled_refresh(str(home), db, min_new=None, why="poll")
    assert outcome.startswith("refreshed: ")


def test_only_the_service_worker_polls(home_db, dev_data):
    """Nothing APScheduler fires looks at the queue or counts new utterances: the service's
    job worker does both, through the service's own engine."""
    home, db = home_db
    with Engine.open(home=home, db=db) as eng:
        eng.enroll_many(vctk_items(dev_data, 2))
    scheduler.set_schedule(str(home), db, min_new=8, check_every="1s")
    schedule = scheduler.StoredSchedule(db)
    schedule.start()
    try:
        time.sleep(3)  # three --check-every periods: a poll job fired by APScheduler would have started a refresh
        assert schedule.min_new() == scheduler.MinNew(8, 1.0, "enough new utterances")
    finally:
        schedule.stop()
    with Engine.open(home=home, db=db) as eng:
        assert eng.jobs() == [] and eng.pending_utterances() == 8
        worker = JobWorker(eng, str(home), db, check_s=3600, metrics=Metrics())
        worker.start()  # its own round waits an hour: only the calls below look
        try:
            assert worker.due() == (8, "enough new utterances")
            assert worker.due() is None  # counted again only after --check-every
            time.sleep(1.1)
            scheduler.set_schedule(str(home), db, min_new=9, check_every="1s")
            assert worker.due() is None  # the changed schedule is read: 8 pending, 9 wanted
            eng.request_refresh("drift: test")
            assert worker.due() == (None, "requested over HTTP")
        finally:
            worker.stop()
        assert [j.status for j in eng.jobs()] == ["queued"]  # asking what is due runs nothing


def test_serve_runs_the_schedule_until_sigterm(tmp_path, dev_data):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(SMALL_REFRESH)
    with Engine.init(home=home) as eng:
        eng.enroll_many(vctk_items(dev_data, 10))
    assert cli("--home", str(home), "schedule", "--min-new", "1", "--check-every", "1s").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "voiceprint.cli", "--home", str(home), "serve", "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        with Engine.open(home=home) as eng:
            while not [j for j in eng.jobs() if j.finished_at]:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "serve did not run the scheduled refresh"
                time.sleep(0.5)
            job = eng.jobs()[-1]
        assert job.reason.startswith("enough new utterances")
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "http://127.0.0.1:" in err and "stopped" in err
    finally:
        proc.kill()
