"""Refresh scheduling: persisted schedules, the due-or-not decision, and `voiceprint serve`."""

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

from engine import Engine, scheduler
from engine.errors import InvalidInput

REPO = Path(__file__).resolve().parents[1]
SMALL_REFRESH = "[refresh]\nsteps = 2\nspeakers_per_batch = 4\nholdout_fraction = 0.3\n"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *argv], cwd=REPO, capture_output=True, text=True, timeout=600)


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
    # Another process (and a restarted server) reads the same schedule back.
    listed = json.loads(cli(*base, "schedule", "--list").stdout)["jobs"]
    assert listed == jobs
    # Setting again replaces, it does not add.
    cron = json.loads(cli(*base, "schedule", "--cron", "0 3 * * *").stdout)["jobs"]
    assert [(j["id"], j["trigger"]) for j in cron] == [(scheduler.POLL_JOB, "every 1m"), (scheduler.TIMED_JOB, "cron 0 3 * * *")]
    assert cron[1]["next_run"].endswith("03:00:00+00:00")
    status = json.loads(cli(*base, "status").stdout)
    assert status["active_version"] == 1 and status["pending_utterances"] == 0
    assert [j["id"] for j in status["schedule"]] == [scheduler.POLL_JOB, scheduler.TIMED_JOB]
    cleared = cli(*base, "schedule", "--clear")
    assert json.loads(cleared.stdout)["removed"] == 2 and scheduler.list_schedule(db) == []


def test_bad_schedules_are_refused_and_store_nothing(home_db):
    home, db = home_db
    base = ["--home", str(home), "--db", db]
    for args in (["--every", "5x"], ["--cron", "bad"], ["--min-new", "0"], ["--every", "1h", "--cron", "0 3 * * *"]):
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
        assert eng.store.list_jobs() == []
        with eng.store.exclusive("refresh"):  # someone else is refreshing
            assert scheduler.run_scheduled_refresh(str(home), db, min_new=40, why="test") == "busy"
    outcome = scheduler.run_scheduled_refresh(str(home), db, min_new=40, why="test")
    assert outcome.startswith("refreshed: "), outcome
    with Engine.open(home=home, db=db) as eng:
        job = eng.store.list_jobs()[0]
        assert job.reason == "test; 40 pending" and job.status in {"succeeded", "rejected"}
        # A queued request makes a poll job due even without enough new utterances.
        eng.request_refresh("drift: test")
    outcome = scheduler.run_scheduled_refresh(str(home), db, min_new=None, why="poll")
    assert outcome.startswith("refreshed: ")


def test_serve_runs_the_schedule_until_sigterm(tmp_path, dev_data):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(SMALL_REFRESH)
    with Engine.init(home=home) as eng:
        eng.enroll_many(vctk_items(dev_data, 10))
    assert cli("--home", str(home), "schedule", "--min-new", "1", "--check-every", "1s").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--home", str(home), "serve", "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        with Engine.open(home=home) as eng:
            while not [j for j in eng.store.list_jobs() if j.finished_at]:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "serve did not run the scheduled refresh"
                time.sleep(0.5)
            job = eng.store.list_jobs()[-1]
        assert job.reason.startswith("queued request or enough new utterances")
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "http://127.0.0.1:" in err and "stopped" in err
    finally:
        proc.kill()
