"""A `voiceprint refresh` killed with SIGKILL: its job must not read running for ever, and
the candidate it left half promoted must not become active by accident.

Real processes on a real home (vctk-4 enrolled): the refresh runs as `python -m cli`, and
the kill comes from outside, as from the OOM killer or a power cut.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from voiceprint.engine import Engine
from voiceprint.engine.errors import TooShort, UnfinishedVersion
from voiceprint.service import create_app

REPO = Path(__file__).resolve().parents[1]
SMALL = "[refresh]\nspeakers_per_batch = 4\nholdout_fraction = 0.3\ngate = false\nsteps = {steps}\n"

pytestmark = pytest.mark.data


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "voiceprint.cli", "--home", str(home), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def enroll(eng: Engine, files: dict[str, list[Path]]) -> None:
    results = eng.enroll_many([(s, p, None) for s, paths in files.items() for p in paths])
    assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, TooShort)]


def start_refresh(home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "voiceprint.cli", "--home", str(home), "refresh"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for(proc: subprocess.Popen, db: sqlite3.Connection, query: str, timeout: float = 300) -> None:
    """Poll the database (plain reads: WAL never blocks the refresh) until ``query`` returns a row."""
    deadline = time.monotonic() + timeout
    while db.execute(query).fetchone() is None:
        if proc.poll() is not None:
            pytest.fail(f"the refresh ended before it was killed: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for: {query}"
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_killed_refresh_reads_interrupted_and_its_candidate_needs_force(tmp_path, dev_data, by_speaker):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(SMALL.format(steps=10_000))
    with Engine.init(home=home) as eng:
        enroll(eng, by_speaker("vctk-4"))
        admin = eng.create_key("admin", by="test")[1]
    db = sqlite3.connect(home / "voiceprint.db", isolation_level=None, timeout=30)

    # 1. Killed mid-training: `status` knows at once, no server needed.
    proc = start_refresh(home)
    wait_for(proc, db, "SELECT id FROM jobs WHERE status = 'running'")
    time.sleep(2)  # into training
    kill(proc)
    status = json.loads(cli(home, "status", "--json").stdout)
    assert status["running_job"] is None
    assert status["last_job"]["status"] == "failed" and "interrupted" in status["last_job"]["result"]["error"]

    # 2. A new refresh runs; killed during promotion, after its candidate was stored.
    (home / "config.toml").write_text(SMALL.format(steps=3))
    proc = start_refresh(home)
    wait_for(proc, db, "SELECT id FROM jobs WHERE status = 'running' AND version IS NOT NULL")
    # Hold the write lock: the refresh blocks at its next write, before the alias moves.
    db.execute("BEGIN IMMEDIATE")
    try:
        candidate, state = db.execute("SELECT number, status FROM model_versions ORDER BY number DESC").fetchone()
        assert (candidate, state) == (2, "candidate"), "the refresh finished before it could be killed"
        kill(proc)
    finally:
        db.execute("ROLLBACK")
        db.close()
    status = json.loads(cli(home, "status", "--json").stdout)
    assert status["running_job"] is None and status["active_version"] == 1
    with Engine.open(home=home) as eng:
        assert eng.version(2).status == "rejected"  # the half-built candidate, cleaned up

    # 3. Rolling back to it is refused without the override: library, CLI, HTTP.
    with Engine.open(home=home) as eng, pytest.raises(UnfinishedVersion):
        eng.rollback(2)
    refused = cli(home, "rollback", "2")
    assert refused.returncode == 2 and refused.stderr.startswith("voiceprint: error: version 2 is a candidate"), refused.stderr
    with TestClient(create_app(str(home), background=False)) as client:
        answer = client.post("/v1/versions/2/activate", headers={"X-API-Key": admin})
        assert answer.status_code == 409 and answer.json()["error"] == "unfinished_version", answer.text
        with Engine.open(home=home) as eng:
            assert eng.active_version().number == 1
        forced = client.post("/v1/versions/2/activate", params={"force": "true"}, headers={"X-API-Key": admin})
        assert forced.status_code == 200, forced.text
    with Engine.open(home=home) as eng:
        assert eng.active_version().number == 2
        assert len(eng.store.embeddings.version_embeddings(2)[0]) == len(eng.utterances())
        # And a refresh after all this runs to its end.
        enroll(eng, dict(list(by_speaker("speechocean762-train").items())[:3]))
        assert eng.refresh().status == "promoted"


def test_rollback_refuses_a_candidate_from_the_command_line_unless_forced(tmp_path, dev_data):
    """The CLI's override: --force."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(SMALL.format(steps=3))
    with Engine.init(home=home) as eng:
        v1 = eng.active_version()
        eng.store.registry.create_version(
            encoder=v1.encoder, config={}, checkpoint=v1.checkpoint, checkpoint_sha256=v1.checkpoint_sha256, parent=1
        )
    refused = cli(home, "rollback", "2")
    assert refused.returncode == 2, refused.stderr
    forced = cli(home, "rollback", "2", "--force")
    assert forced.returncode == 0, forced.stderr
    with Engine.open(home=home) as eng:
        assert eng.active_version().number == 2
