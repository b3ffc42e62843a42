"""New speakers in the unlabeled stream: stored apart, clustered, proposed, named through
the normal enrollment path, erased without a trace (real speech of librispeech-test-other)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from voiceprint.engine import Engine
from voiceprint.engine.config import Config
from voiceprint.engine.errors import DuplicateUtterance, NoSpeech, UnknownCluster
from voiceprint.service import create_app

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_privacy import every_value, traces  # noqa: E402

pytestmark = pytest.mark.data

SET = "librispeech-test-other"


def _speakers(by_speaker) -> tuple[dict[str, list[Path]], list[str]]:
    files = by_speaker(SET)
    return files, sorted(files)


def _stream(eng: Engine, by_speaker) -> dict[str, list[int]]:
    """Five speakers enrolled; then unlabeled: five files of a sixth speaker (new), two of
    a seventh (new, too few to propose) and two more of the first enrolled speaker.
    Returns the unlabeled ids by true speaker."""
    files, names = _speakers(by_speaker)
    list(eng.enroll_stream([(s, p, None) for s in names[:5] for p in files[s][:3]]))
    stream = [(names[5], p) for p in files[names[5]][:5]] + [(names[6], p) for p in files[names[6]][:2]]
    stream += [(names[0], p) for p in files[names[0]][3:5]]
    ids: dict[str, list[int]] = {}
    for (speaker, _), result in zip(stream, eng.enroll_stream([(None, p, None) for _, p in stream])):
        assert result.feedback == "UNLABELED", result
        ids.setdefault(speaker, []).append(result.utterance_id)
    return ids


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_new_speaker_is_proposed_named_through_enrollment_and_an_erased_cluster_leaves_nothing(
    backend, tmp_path, by_speaker, request
):
    home = tmp_path / "home"
    db = request.getfixturevalue("fresh_pg_url") if backend == "postgresql" else f"sqlite:///{home / 'voiceprint.db'}"
    files, names = _speakers(by_speaker)
    with Engine.init(home=home, db=db) as eng:
        ids = _stream(eng, by_speaker)
        assert [s.name for s in eng.speakers()] == names[:5]  # nothing unlabeled joined a profile
        assert eng.status()["unlabeled_utterances"] == 9

        clusters = {c.number: c for c in eng.clusters()}
        new, small, known = (ids[names[5]], ids[names[6]], ids[names[0]])
        assert [list(c.utterances) for c in clusters.values()] == [new, small, known]
        assert clusters[new[0]].status == "proposed" and clusters[new[0]].candidate in names[:5]
        assert clusters[small[0]].status == "small"
        assert clusters[known[0]].status == "known" and clusters[known[0]].candidate == names[0]

        before = {r.id: r for r in eng.unlabeled()}
        kept_before = eng.store.unlabeled.kept(new)
        named = eng.name_cluster(new[0], "carol")
        assert [r["unlabeled"] for r in named["enrolled"]] == new and not named["held"] and not named["refused"]
        carol = eng.speaker_utterances("carol")
        assert [u.content_sha256 for u in carol] == [before[i].content_sha256 for i in new]
        assert [u.source for u in carol] == [before[i].source for i in new]
        for utterance, unlabeled_id in zip(carol, new):  # what was kept moved as it was
            assert eng.store.profiles.utterance_audio(utterance.id) == kept_before[unlabeled_id]
        assert eng.store.profiles.centroid("carol", 1).count == 5
        assert [r.id for r in eng.unlabeled()] == small + known
        with pytest.raises(UnknownCluster):
            eng.name_cluster(new[0], "carol")
        assert eng.identify(files[names[5]][6]).decision == "carol"  # a file never streamed

        # Erasing the small cluster: kept speech, embeddings and hashes leave the database.
        needles = [before[i].content_sha256.encode() for i in small]
        for data, _, _ in eng.store.unlabeled.kept(small).values():
            needles.append(data[len(data) // 2 : len(data) // 2 + 64])
        stored_ids, vectors = eng.store.unlabeled.embeddings(1)
        needles += [v.astype("<f4").tobytes()[:64] for i, v in zip(stored_ids, vectors) if i in small]
        assert len(traces(every_value(db), needles)) == len(needles)
        erased = eng.delete_cluster(small[0])
        assert erased["unlabeled_utterances"] == 2 and erased["embeddings"] == 2
        assert erased["files_scrubbed"] is (backend == "sqlite")
        entry = next(e for e in eng.store.keys.audit_log() if e.action == "erase_unlabeled")
        assert entry.detail == {"unlabeled_utterances": 2, "embeddings": 2}
        assert [r.id for r in eng.unlabeled()] == known
    assert traces(every_value(db), needles) == []
    for path in home.rglob("*"):
        if path.is_file():
            assert not [n[:16] for n in needles if n in path.read_bytes()], path


def test_naming_applies_the_enrollment_checks_and_refused_utterances_stay_unlabeled(tmp_path, by_speaker):
    home = tmp_path / "home"
    _, names = _speakers(by_speaker)
    with Engine.init(home=home) as eng:
        ids = _stream(eng, by_speaker)
    new = ids[names[5]]
    # The quality check runs again on what was measured on arrival: a stricter setting refuses them all.
    strict = Config.from_dict({"enrollment": {"min_snr_db": 100.0}})
    with Engine.open(home=home, config=strict) as eng:
        named = eng.name_cluster(new[0], "carol")
        assert [r["unlabeled"] for r in named["refused"]] == new and {r["error"] for r in named["refused"]} == {"too_noisy"}
        assert not eng.store.profiles.has_speaker("carol") and len(eng.unlabeled()) == 9
    # Named after an enrolled speaker they do not sound like: the consistency check holds them.
    with Engine.open(home=home) as eng:
        named = eng.name_cluster(new[0], names[1])
        assert not named["refused"] and len(named["held"]) >= 4, named
        assert eng.store.profiles.centroid(names[1], 1).count == 3 + len(named["enrolled"])
        assert {u.id for u in eng.utterances(names[1], status="pending")} == {r["utterance"] for r in named["held"]}


def test_bad_unlabeled_input_is_refused_and_stores_nothing(tmp_path, by_speaker):
    files, names = _speakers(by_speaker)
    with Engine.init(home=tmp_path / "home") as eng:
        silence = tmp_path / "silence.wav"
        import soundfile as sf

        sf.write(silence, np.zeros(16000 * 3, dtype=np.float32), 16000)
        with pytest.raises(NoSpeech):
            eng.add_unlabeled(silence)
        first = eng.add_unlabeled(files[names[0]][0])
        with pytest.raises(DuplicateUtterance):
            eng.add_unlabeled(files[names[0]][0])
        assert [r.id for r in eng.unlabeled()] == [first.utterance_id]
        assert eng.store.counts()["unlabeled_embeddings"] == 1 and eng.store.counts()["utterances"] == 0


def test_unlabeled_utterances_are_embedded_under_a_newly_active_version(tmp_path, by_speaker):
    with Engine.init(home=tmp_path / "home") as eng:
        ids = _stream(eng, by_speaker)
        v1 = eng.active_version()
        v2 = eng.store.registry.create_version(
            encoder=v1.encoder, config=v1.config, checkpoint=v1.checkpoint, checkpoint_sha256=v1.checkpoint_sha256,
            parent=1, note="test copy",
        )
        eng.rollback(v2.number, force=True)
        assert eng.store.unlabeled.missing(v2.number) == sorted(i for group in ids.values() for i in group)
        clusters = eng.clusters()
        assert eng.store.unlabeled.missing(v2.number) == []
        assert sorted(len(c.utterances) for c in clusters) == [2, 2, 5]
        (_, before), (_, after) = eng.store.unlabeled.embeddings(1), eng.store.unlabeled.embeddings(v2.number)
        # The same weights: the kept FLAC embeds as the original speech did, to its quantisation.
        assert np.min(np.sum(before * after, axis=1)) > 0.999


def test_stream_rows_without_a_speaker_and_the_cluster_commands(tmp_path, by_speaker):
    files, names = _speakers(by_speaker)
    home = tmp_path / "home"

    def cli(*argv, input=None):
        return subprocess.run([sys.executable, "-m", "voiceprint.cli", "--home", str(home), *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=600, input=input,
                              stdin=subprocess.DEVNULL if input is None else None)

    assert cli("init").returncode == 0
    rows = [f"{s},{p}" for s in names[:5] for p in files[s][:3]] + [f",{p}" for p in files[names[5]][:5]]
    (tmp_path / "rows.csv").write_text("speaker,path\n" + "\n".join(rows) + "\n")
    streamed = cli("stream", str(tmp_path / "rows.csv"))
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.count("unlabeled: ") == 5 and "20 of 20 rows stored" in streamed.stderr

    listed = cli("--json", "clusters")
    found = json.loads(listed.stdout)
    assert [(c["utterances"], c["status"]) for c in found] == [([1, 2, 3, 4, 5], "proposed")]
    assert "proposed" in cli("clusters").stdout
    named = cli("--json", "name-cluster", "1", "carol")
    assert named.returncode == 0, named.stderr
    assert len(json.loads(named.stdout)["enrolled"]) == 5
    gone = cli("name-cluster", "1", "carol")
    assert gone.returncode == 2 and "no cluster 1" in gone.stderr

    assert cli("stream", "-", input=f'{{"path": "{files[names[6]][0]}"}}\n').returncode == 0
    refused = cli("delete-cluster", "6")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    deleted = cli("--json", "delete-cluster", "6", "--yes")
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["unlabeled_utterances"] == 1
    assert json.loads(cli("--json", "clusters").stdout) == []


def test_the_unlabeled_routes_and_their_roles(tmp_path, by_speaker):
    files, names = _speakers(by_speaker)
    home = tmp_path / "home"
    with Engine.init(home=home) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
        list(eng.enroll_stream([(s, p, None) for s in names[:5] for p in files[s][:3]]))
    db = f"sqlite:///{home / 'voiceprint.db'}"

    def call(method, route, role, path=None, **params):
        headers = {"X-API-Key": keys[role]} | ({"Content-Type": "audio/flac"} if path else {})
        return client.request(method, route, content=path.read_bytes() if path else None, params=params, headers=headers)

    with TestClient(create_app(str(home), db, background=False)) as client:
        assert call("POST", "/v1/unlabeled", "query", files[names[5]][0]).status_code == 403
        stored = [call("POST", "/v1/unlabeled", "enroll", p) for p in files[names[5]][:5]]
        assert [r.status_code for r in stored] == [201] * 5 and stored[0].json()["feedback"] == "UNLABELED"
        assert call("POST", "/v1/unlabeled", "enroll", files[names[5]][0]).status_code == 409
        assert call("GET", "/v1/clusters", "query").status_code == 403
        clusters = call("GET", "/v1/clusters", "enroll").json()
        assert [(c["number"], c["status"]) for c in clusters] == [(1, "proposed")]
        assert call("POST", "/v1/clusters/1/name", "enroll", speaker="carol", force="true").status_code == 403
        assert call("DELETE", "/v1/clusters/1", "enroll").status_code == 403
        assert call("POST", "/v1/clusters/9/name", "enroll", speaker="carol").json()["error"] == "unknown_cluster"
        named = call("POST", "/v1/clusters/1/name", "enroll", speaker="carol")
        assert named.status_code == 200 and len(named.json()["enrolled"]) == 5
        assert call("POST", "/v1/identify", "query", files[names[5]][6]).json()["decision"] == "carol"
        call("POST", "/v1/unlabeled", "enroll", files[names[6]][0])
        assert call("DELETE", "/v1/clusters/6", "admin").json()["unlabeled_utterances"] == 1
        assert call("GET", "/v1/clusters", "enroll").json() == []
