"""Erasure leaves nothing of a speaker behind; audio is read only from the allowed folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import MetaData, create_engine, select

from voiceprint.engine import Engine
from voiceprint.engine.errors import PathNotAllowed, UnknownSpeaker
from voiceprint.storage import Store

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.data


def every_value(db: str) -> list:
    """Every value of every row of every table in the database (ours and the libraries')."""
    engine = create_engine(db)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return [value for table in meta.sorted_tables for row in conn.execute(select(table)) for value in row]
    finally:
        engine.dispose()


def traces(values: list, needles: list[bytes]) -> list:
    found = []
    for value in values:
        raw = value if isinstance(value, (bytes, memoryview)) else json.dumps(value, default=str).encode()
        found += [n[:16] for n in needles if n in bytes(raw)]
    return found


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_erasing_a_speaker_leaves_nothing_in_the_database_or_the_home_folder(backend, tmp_path, by_speaker, request):
    home = tmp_path / "home"
    home.mkdir()
    # Every utterance after the second is held for review, so held items are erased too.
    (home / "config.toml").write_text("[enrollment]\nconsistency_threshold = 0.999\n")
    db = request.getfixturevalue("fresh_pg_url") if backend == "postgresql" else f"sqlite:///{home / 'voiceprint.db'}"
    name = f"erase-me-{uuid.uuid4().hex[:8]}"
    files = by_speaker("vctk-4")
    with Engine.init(home=home, db=db) as eng:
        mine = [eng.enroll(name, p) for p in files["p225"][:4]]
        kept = [eng.enroll("keeper", p, force=True) for p in files["p226"][:3]]
        assert {r.feedback for r in mine} == {"OK", "INCONSISTENT_SPEAKER"}
        # A second version holding embeddings of every utterance (as a refresh leaves them).
        v1 = eng.active_version()
        v2 = eng.store.registry.create_version(
            encoder=v1.encoder, config=v1.config, checkpoint=v1.checkpoint,
            checkpoint_sha256=v1.checkpoint_sha256, parent=1, note="test copy",
            trained_through=max(r.utterance_id for r in mine + kept),
        )
        missing = eng.store.embeddings.missing_embeddings(v2.number)
        vectors = eng.embedder(v1).embed([np.zeros(16000, np.float32) + 0.01 * (i + 1) for i in range(len(missing))])
        eng.store.embeddings.add_embeddings(v2.number, [(uid, vec) for (uid, _), vec in zip(missing, vectors)])
        ids = [r.utterance_id for r in mine]
        needles = [name.encode()]
        for uid in ids:
            data, _, _ = eng.store.profiles.utterance_audio(uid)
            needles.append(data[len(data) // 2 : len(data) // 2 + 64])  # a stretch of the kept speech
        for version in (1, v2.number):
            needles += [vec.astype("<f4").tobytes()[:64] for vec in eng.store.profiles.embeddings(name, version)]
        needles += [u.content_sha256.encode() for u in eng.store.profiles.utterances(name, status=None)]
        assert traces(every_value(db), needles), "the needles must be found before the erasure"

        result = eng.erase_speaker(name)
        assert result["utterances"] == 4 and result["embeddings"] >= 4 + 2 and result["centroids"] == 2
        assert result["trained_into"] == [v2.number]  # fine-tuned on their audio: the caller is told

        with pytest.raises(UnknownSpeaker):
            eng.erase_speaker(name)
        assert not eng.store.profiles.has_speaker(name)
        assert [s.name for s in eng.speakers()] == ["keeper"]
        keeper = eng.store.profiles.centroid("keeper", 1)
        np.testing.assert_allclose(keeper.mean, eng.store.profiles.embeddings("keeper", 1).mean(axis=0), atol=1e-6)
        assert keeper.count == len(kept)
        audit = [e for e in eng.store.keys.audit_log() if e.action in ("erase_speaker", "scrub_files")]
        # One erasure (the failed second one left no entry); on SQLite, the scrub of the files after it.
        assert [e.action for e in audit] == ["scrub_files"] * (backend == "sqlite") + ["erase_speaker"]
        assert audit[-1].detail == {k: result[k] for k in ("utterances", "embeddings", "centroids")}
        assert result["files_scrubbed"] is (backend == "sqlite")

    assert traces(every_value(db), needles) == []
    # Nor in the files: the database file and its write-ahead log (SQLite), checkpoints, anything.
    for path in home.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [n[:16] for n in needles if n in content], path


def test_delete_speaker_command_asks_for_confirmation(tmp_path, by_speaker):
    home = tmp_path / "home"
    with Engine.init(home=home) as eng:
        eng.enroll("ann", by_speaker("vctk-4")["p225"][0])

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "voiceprint.cli", "--home", str(home), *argv],
                              cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    refused = cli("delete-speaker", "ann")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = cli("--json", "delete-speaker", "ann", "--yes")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["utterances"] == 1
    assert cli("delete-speaker", "ann", "--yes").returncode == 2  # unknown now
    with Store(f"sqlite:///{home / 'voiceprint.db'}") as store:
        assert store.counts()["utterances"] == store.counts()["speakers"] == 0


def test_audio_is_read_only_from_the_allowed_folders(tmp_path, by_speaker):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    outside = by_speaker("vctk-4")["p225"]
    inside = allowed / "inside.flac"
    shutil.copy(outside[0], inside)
    (allowed / "link.flac").symlink_to(outside[1])
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f"[audio]\nroots = \"{allowed}\"\n")
    with Engine.init(home=home) as eng:
        assert eng.enroll("ann", inside).feedback == "OK"
        for path in (outside[2], allowed / "link.flac", allowed / "sub" / ".." / ".." / outside[3].name):
            with pytest.raises(PathNotAllowed):
                eng.enroll("ann", path)
        with pytest.raises(PathNotAllowed):
            eng.identify(outside[2])
        assert eng.store.counts()["utterances"] == 1

    def stream(manifest: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "voiceprint.cli", "--home", str(home), "--json", "stream", str(manifest)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    # A manifest outside the roots is not read at all.
    (tmp_path / "outside.csv").write_text(f"speaker,path\nbob,{inside}\n")
    refused = stream(tmp_path / "outside.csv")
    assert refused.returncode == 2 and "path_not_allowed" in refused.stdout
    # Inside, each row pointing outside is refused and the others go on.
    shutil.copy(outside[4], allowed / "sub" / "b.flac")
    (allowed / "rows.csv").write_text(f"speaker,path\nbob,{outside[5]}\nbob,sub/b.flac\nbob,link.flac\n")
    rows = stream(allowed / "rows.csv")
    assert rows.returncode == 1
    errors = [json.loads(line).get("error") for line in rows.stdout.splitlines()]
    assert errors == ["path_not_allowed", None, "path_not_allowed"], rows.stdout
