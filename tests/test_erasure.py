"""Erasure is final: a refresh running meanwhile cannot promote weights trained on the
erased audio, and the bytes leave the SQLite files even when a reader held them back.

On real speech (vctk-4, speechocean762-train) and real databases; the refresh is paused
through its own progress callback, the reader is a second SQLite connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from voiceprint.engine import Engine
from voiceprint.engine.errors import TrainingDataErased, TooShort
from voiceprint.engine.refresh import ERASED_MEANWHILE
from voiceprint.service.metrics import Metrics
from voiceprint.service.worker import JobWorker

pytestmark = pytest.mark.data

REFRESH = "[refresh]\nsteps = 3\nspeakers_per_batch = 4\nholdout_fraction = 0.3\n"


def enroll(eng: Engine, speaker: str, paths: list[Path]) -> list[int]:
    results = eng.enroll_many([(speaker, path, None) for path in paths], force=True)
    assert all(isinstance(r, TooShort) or not isinstance(r, Exception) for r in results), results
    return [r.utterance_id for r in results if not isinstance(r, Exception)]


def vctk_home(tmp_path: Path, by_speaker, extra: str = "") -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(REFRESH + extra)
    with Engine.init(home=home) as eng:
        for speaker, paths in by_speaker("vctk-4").items():
            enroll(eng, speaker, paths)
    return home


def refresh_paused_in_training(home: Path, while_paused):
    """Run a refresh in a thread; at its first training step (its audio loaded), the
    refresh waits in its progress callback while ``while_paused()`` runs, then finishes.
    Returns (the refresh's report, what ``while_paused`` returned)."""
    training, resume, out = threading.Event(), threading.Event(), {}

    def on_progress(done: int, total: int, what: str) -> None:
        if what == "training" and not training.is_set():
            training.set()
            resume.wait(600)

    def run() -> None:
        try:
            with Engine.open(home=home) as eng:
                out["report"] = eng.refresh(on_progress=on_progress)
        except BaseException as exc:  # surfaced below, in the test's thread
            out["error"] = exc
        finally:
            training.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert training.wait(600)
        assert "error" not in out, out
        paused = while_paused()
    finally:
        resume.set()
        thread.join(900)
    assert "error" not in out, out["error"]
    return out["report"], paused


@pytest.mark.parametrize("gate", ["off", "rejects"])
def test_a_speaker_erased_while_a_refresh_trains_on_them_is_never_promoted(gate, tmp_path, by_speaker):
    # gate off: the candidate reaches the promotion; a wrecking learning rate: the gate
    # rejects it, and its weights must go all the same.
    extra = "gate = false\n" if gate == "off" else "lr = 0.1\n"
    home = vctk_home(tmp_path, by_speaker, extra)
    with Engine.open(home=home) as eng:
        erased_ids = {u.id for u in eng.utterances("p225")}

        def erase():
            running = eng.jobs(status="running")
            assert len(running) == 1
            return running[0].id, eng.erase_speaker("p225")

        report, (job_id, erasure) = refresh_paused_in_training(home, erase)
        # The candidate did not exist yet: the erasure names the refresh instead.
        assert erasure["trained_into"] == [] and erasure["running_refresh"] == [job_id]
        assert report.job == job_id and report.status == "rejected", report
        assert ERASED_MEANWHILE in report.reasons
        assert eng.active_version().number == 1
        assert [move.version for move in eng.store.registry.alias_history()] == [1]
        candidate = eng.version(report.version)
        assert candidate.status == "rejected" and ERASED_MEANWHILE in candidate.note
        assert not (home / candidate.checkpoint).exists()  # the weights that learned from p225
        assert eng.store.checkpoints.blob(candidate.checkpoint_sha256) is None  # nor their copy in the database
        assert eng.store.embeddings.version_embeddings(report.version)[0].size == 0
        job = eng.job(job_id)
        assert job.status == "rejected" and ERASED_MEANWHILE in job.result["reasons"]
        assert erased_ids and not erased_ids & {u.id for u in eng.utterances(status=None)}


def test_an_erasure_outside_the_training_data_does_not_block_the_promotion(tmp_path, by_speaker):
    home = vctk_home(tmp_path, by_speaker, "gate = false\n")
    late = list(by_speaker("speechocean762-train").items())[0][1][:3]
    name = f"late-{uuid.uuid4().hex[:8]}"
    with Engine.open(home=home) as eng:

        def enroll_then_erase():
            # Enrolled after the refresh took its snapshot: never in its training data.
            assert enroll(eng, name, late)
            return eng.erase_speaker(name)

        report, erasure = refresh_paused_in_training(home, enroll_then_erase)
        assert erasure["running_refresh"] == [report.job]  # it may have, so it is named
        assert report.status == "promoted" and ERASED_MEANWHILE not in report.reasons, report
        active = eng.active_version()
        assert active.number == report.version and (home / active.checkpoint).exists()
        assert name not in eng.store.embeddings.version_embeddings(active.number)[1]
        assert eng.store.embeddings.missing_embeddings(active.number) == []


def test_the_alias_move_refuses_a_version_whose_training_data_is_gone(store):
    """The check inside the promotion's transaction, on both backends: by id, and by
    content hash (SQLite gives a deleted highest id to the next utterance)."""
    v1 = store.registry.create_version(encoder="ge2e", config={}, checkpoint="a.pt", checkpoint_sha256="0" * 64)
    store.registry.set_alias("active", v1.number, actor="test", reason="init")
    v2 = store.registry.create_version(
        encoder="ge2e", config={}, checkpoint="b.pt", checkpoint_sha256="0" * 64, parent=v1.number, trained_through=10
    )
    ids = {}
    for speaker, sha in (("ann", "a" * 64), ("bob", "b" * 64)):
        ids[speaker] = store.profiles.enroll(
            speaker=speaker, version=v1.number, source="x.wav", content_sha256=sha, duration_s=1.0, speech_s=1.0,
            quality={}, audio=b"\0" * 8, codec="flac", sample_rate=16000, embedding=[1.0, 0.0],
        ).utterance.id
    trained = {ids["ann"]: "a" * 64, ids["bob"]: "b" * 64}
    assert store.registry.deleted_training_data(trained) == 0
    erasure = store.profiles.erase_speaker("bob", actor="test")
    assert erasure["trained_into"] == [v2.number]  # v2 existed: it is named
    assert store.registry.deleted_training_data(trained) == 1
    assert store.registry.deleted_training_data({ids["ann"]: "c" * 64}) == 1  # same id, other audio
    with pytest.raises(TrainingDataErased):
        store.registry.set_alias("active", v2.number, actor="test", reason="promote", require_trained=trained)
    assert store.registry.active_version().number == v1.number
    assert [move.version for move in store.registry.alias_history()] == [v1.number]
    trained.pop(ids["bob"])
    store.registry.set_alias("active", v2.number, actor="test", reason="promote", require_trained=trained)
    assert store.registry.active_version().number == v2.number


# -- the scrub of the SQLite files ------------------------------------------------------


def files_holding(home: Path, needles: list[bytes]) -> list[str]:
    """The database files (database and write-ahead log) that still hold any needle."""
    return sorted(
        path.name
        for path in home.glob("voiceprint.db*")
        if path.is_file() and any(needle in path.read_bytes() for needle in needles)
    )


def enrolled_to_erase(eng: Engine, by_speaker) -> tuple[str, list[bytes]]:
    name = f"erase-me-{uuid.uuid4().hex[:8]}"
    files = by_speaker("vctk-4")
    ids = enroll(eng, name, files["p225"][:3])
    enroll(eng, "keeper", files["p226"][:2])
    needles = [name.encode()]
    for uid in ids:
        data, _, _ = eng.store.profiles.utterance_audio(uid)
        needles.append(data[len(data) // 2 : len(data) // 2 + 64])
    return name, needles


def held_reader(home: Path) -> sqlite3.Connection:
    """A second connection holding a read transaction open (a snapshot from before)."""
    reader = sqlite3.connect(home / "voiceprint.db", isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM speakers").fetchone()[0] == 2
    return reader


def test_a_reader_holds_the_scrub_back_until_the_next_write(tmp_path, by_speaker):
    home = tmp_path / "home"
    with Engine.init(home=home) as eng:
        name, needles = enrolled_to_erase(eng, by_speaker)
        reader = held_reader(home)
        started = time.monotonic()
        erasure = eng.erase_speaker(name)
        assert time.monotonic() - started < 10  # waits a moment for the reader, not 30 s
        assert erasure["files_scrubbed"] is False and erasure["scrub"] == "pending"
        assert "voiceprint.db-wal" in files_holding(home, needles[:1])
        status = eng.status()["scrub"]  # status retries too: the reader still holds it back
        assert status["scrub"] == "pending" and status["pending_since"]
        reader.execute("COMMIT")
        reader.close()
        assert files_holding(home, needles)  # nothing has retried yet
        enroll(eng, "keeper", by_speaker("vctk-4")["p226"][2:3])  # the next write retries
        assert eng.store.scrub.state() == {"scrub": "done", "pending_since": None}
        assert files_holding(home, needles) == []
        audit = eng.store.keys.audit_log()
        erased = next(e for e in audit if e.action == "erase_speaker")
        assert audit[0].action == "scrub_files" and audit[0].detail == {"through": erased.id}
        assert eng.status()["scrub"]["scrub"] == "done"


def test_the_service_worker_finishes_a_scrub_another_process_left_pending(tmp_path, by_speaker):
    home = tmp_path / "home"
    with Engine.init(home=home) as eng:
        name, needles = enrolled_to_erase(eng, by_speaker)
    with Engine.open(home=home) as service:
        service.status()  # the service's engine has its connections open
        reader = held_reader(home)
        with Engine.open(home=home) as cli:  # a `voiceprint delete-speaker` beside the service
            assert cli.erase_speaker(name)["scrub"] == "pending"
        reader.execute("COMMIT")
        reader.close()
        # Checkpointed into the database file when the first engine closed; the erasure's
        # zeroed pages wait in the log for the checkpoint the reader held back.
        assert files_holding(home, needles[:1]) == ["voiceprint.db"]
        assert service.store.scrub.state()["scrub"] == "pending"  # seen by every process
        worker = JobWorker(service, str(home), f"sqlite:///{home / 'voiceprint.db'}", check_s=0.2, metrics=Metrics())
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while service.store.scrub.state()["scrub"] == "pending" and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            worker.stop()
        assert service.store.scrub.state()["scrub"] == "done"
        assert files_holding(home, needles) == []


@pytest.mark.postgres
def test_postgresql_says_the_server_keeps_what_it_keeps(fresh_pg_url, tmp_path, by_speaker):
    with Engine.init(home=tmp_path / "home", db=fresh_pg_url) as eng:
        name, _ = enrolled_to_erase(eng, by_speaker)
        erasure = eng.erase_speaker(name)
        assert erasure["files_scrubbed"] is False and erasure["scrub"] == "server"
        assert eng.status()["scrub"] == {"scrub": "server", "pending_since": None}
