"""Who spoke when: the pure pieces on synthetic vectors, and `voiceprint diarize` on
simulated conversations of real speech (bench/conversations.py builds them from vctk-4)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceprint.cli import main
from voiceprint.engine import Engine, diarization
from voiceprint.engine.errors import InvalidInput, NoSpeech, TooLong
from voiceprint.engine.metrics import diarization_error

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from conversations import simulate  # noqa: E402

from test_cli import fingerprint  # noqa: E402


# --- the pure pieces ------------------------------------------------------------------


def _speakers(rng, n: int, per: int, dim: int = 64, spread: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(n, dim))
    truth = np.repeat(np.arange(n), per)
    return centres[truth] + spread * rng.normal(size=(n * per, dim)), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_long_recordings_are_clustered_in_chunks_to_the_same_partition():
    rng = np.random.default_rng(3)
    x, truth = _speakers(rng, 4, 150)
    order = rng.permutation(len(x))  # speakers interleaved along the "recording"
    x, truth = x[order], truth[order]
    whole = diarization.cluster(x, threshold=0.5)
    chunked = diarization.cluster(x, threshold=0.5, chunk_windows=100)  # 6 chunks, then their centroids
    assert _same_partition(whole, truth) and _same_partition(chunked, truth)
    assert _same_partition(diarization.cluster(x, threshold=0.5, speakers=4, chunk_windows=100), truth)
    assert _same_partition(diarization.cluster(x, threshold=0.5, method="spectral"), truth)


def test_a_cluster_too_short_to_be_a_speaker_joins_its_nearest():
    rng = np.random.default_rng(4)
    x, _ = _speakers(rng, 2, 20)
    stray = x[0] + 3.0 * rng.normal(size=x.shape[1])  # far from both: its own cluster at this threshold
    x = np.vstack([x, stray])
    durations = np.full(len(x), 0.5)
    assert len(set(diarization.cluster(x, threshold=0.3).tolist())) == 3
    folded = diarization.cluster(x, threshold=0.3, durations=durations, min_speaker_s=2.0)
    assert len(set(folded.tolist())) == 2


def test_clustering_refuses_what_it_cannot_do():
    x = np.random.default_rng(0).normal(size=(5, 8))
    with pytest.raises(InvalidInput, match="valid names: ahc, spectral"):
        diarization.cluster(x, threshold=0.3, method="kmeans")
    with pytest.raises(InvalidInput, match="at least 1"):
        diarization.cluster(x, threshold=0.3, speakers=0)


def test_diarization_error_with_a_collar_and_a_missing_speaker():
    ref = [(0.0, 10.0, "a"), (10.0, 20.0, "b"), (20.0, 30.0, "c")]
    hyp = [(0.0, 10.0, "x"), (10.0, 30.0, "y")]  # b and c heard as one person
    e = diarization_error(ref, hyp)
    assert round(e["confusion"], 2) == 10.0 and e["missed"] == 0.0 and round(e["der"], 4) == round(10 / 30, 4)
    collared = diarization_error(ref, [(0.3, 10.0, "x"), (10.0, 20.0, "y"), (20.0, 30.0, "z")], collar_s=0.5)
    assert collared["der"] == 0.0  # the 0.3 s late start lies inside the collar


# --- real speech ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vctk(dev_data) -> dict[str, list[Path]]:
    return {s: sorted((dev_data / "vctk-4" / s).glob("*.flac")) for s in ("p225", "p226", "p227", "p228")}


def _conversation(vctk, speakers, tmp: Path, seed: int = 7, turns: int = 9):
    talk = {s: vctk[s][3:] for s in speakers}  # the first three of each are for enrollment
    conv = simulate(talk, turns=turns, rng=np.random.default_rng(seed))
    path = tmp / "conversation.wav"
    sf.write(path, conv.samples, 16000)
    return conv, path


@pytest.fixture(scope="module")
def two_enrolled(tmp_path_factory, vctk) -> Path:
    home = tmp_path_factory.mktemp("diarize-home")
    with Engine.init(home=home) as eng:
        for s in ("p225", "p226"):
            for path in vctk[s][:3]:
                eng.enroll(s, path)
    return home


def test_two_enrolled_speakers_are_named_and_the_third_is_unknown(two_enrolled, vctk, tmp_path, capsys):
    conv, path = _conversation(vctk, ["p225", "p226", "p228"], tmp_path)
    rttm = tmp_path / "out.rttm"
    assert main(["--home", str(two_enrolled), "--json", "diarize", str(path), "--rttm", str(rttm)]) == 0
    doc = json.loads(capsys.readouterr().out)
    found = {s["speaker"]: s for s in doc["speakers"]}
    assert set(found) == {"p225", "p226", "unknown-1"}, found
    assert found["p225"]["enrolled"] and not found["unknown-1"]["enrolled"]
    hypothesis = [(s["start"], s["end"], s["speaker"]) for s in doc["segments"]]
    error = diarization_error(conv.reference, hypothesis)
    assert error["der"] < 0.15, error
    # Names, not just clusters: most of each enrolled speaker's speech carries the name.
    for name in ("p225", "p226"):
        own = [(a, b) for a, b, s in conv.reference if s == name]
        named = sum(max(0.0, min(b, e) - max(a, s)) for a, b in own for s, e, who in hypothesis if who == name)
        assert named > 0.85 * sum(b - a for a, b in own), name
    lines = rttm.read_text().splitlines()
    assert len(lines) == len(doc["segments"]) and lines[0].startswith("SPEAKER conversation 1 ")
    assert {line.split()[7] for line in lines} == {"p225", "p226", "unknown-1"}


def test_one_speaker_gives_one_speaker_and_a_known_count_is_kept(two_enrolled, vctk, tmp_path):
    _, path = _conversation(vctk, ["p227"], tmp_path, turns=4)
    with Engine.open(home=two_enrolled) as eng:
        alone = eng.diarize(path)
        assert [s.speaker for s in alone.speakers] == ["unknown-1"]
        assert {s.speaker for s in alone.segments} == {"unknown-1"}
        _, path = _conversation(vctk, ["p227", "p228"], tmp_path, turns=6)
        two = eng.diarize(path, speakers=2)
        assert len(two.speakers) == 2
        with pytest.raises(InvalidInput, match="1..20"):
            eng.diarize(path, speakers=21)


def test_silence_and_noise_alone_are_no_speech_and_store_nothing(two_enrolled, dev_data, tmp_path, capsys):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 30, dtype=np.float32), 16000)
    rain = next((dev_data / "esc10-noise" / "002_-_Rain").glob("*.ogg"))
    url = f"sqlite:///{two_enrolled / 'voiceprint.db'}"
    before = fingerprint(url)
    for path in (silent, rain):
        assert main(["--home", str(two_enrolled), "--json", "diarize", str(path)]) == 2
        doc = json.loads(capsys.readouterr().out)
        assert doc["error"] == "no_speech", doc
    assert fingerprint(url) == before


def test_a_recording_over_the_limit_is_refused_from_its_header(two_enrolled, tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16000 * 12, dtype=np.float32), 16000)
    monkeypatch.setenv("VOICEPRINT_DIARIZATION__MAX_DURATION_S", "10")
    with Engine.open(home=two_enrolled) as eng, pytest.raises(TooLong, match="longer than the limit of 10 s"):
        eng.diarize(path)


PEAK_RSS = """
import resource, sys
from voiceprint.engine import Engine
with Engine.open(home=sys.argv[1]) as eng:
    result = eng.diarize(sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(result.segments), result.duration_s)
"""


def test_two_hours_are_read_in_blocks_and_memory_stays_flat(two_enrolled, vctk, tmp_path):
    """A 2-hour recording (sparse speech: the cost of the test is the VAD over all of it)
    takes no more peak memory than a 2-minute one plus 150 MB. Read whole, its samples
    alone would be 460 MB as float32."""
    speech = np.concatenate([sf.read(p, dtype="float32")[0] for p in vctk["p227"][:3]])
    rate = 16000

    def write(path: Path, seconds: int) -> None:
        with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
            minute = np.zeros(60 * rate, dtype=np.float32)
            minute[: len(speech)] = speech[: 60 * rate] * 0.5
            for _ in range(seconds // 60):
                out.write(minute)

    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    write(short, 120)
    write(long, 7200)

    def peak(path: Path) -> tuple[int, int, float]:
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(two_enrolled), str(path)],
                              capture_output=True, text=True, timeout=1800, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        kib, segments, duration = done.stdout.split()
        return int(kib), int(segments), float(duration)

    small, _, _ = peak(short)
    big, segments, duration = peak(long)
    assert duration == 7200.0 and segments >= 120
    assert big - small < 150 * 1024, f"peak RSS {small / 1024:.0f} MiB for 2 minutes, {big / 1024:.0f} MiB for 2 hours"


def test_diarize_over_http_for_query_keys_with_the_cli_s_answer(two_enrolled, vctk, tmp_path):
    from fastapi.testclient import TestClient

    from voiceprint.service import create_app

    _, path = _conversation(vctk, ["p225", "p226", "p228"], tmp_path)
    with Engine.open(home=two_enrolled) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("query", "enroll")}
        direct = eng.diarize(path)
    body = path.read_bytes()
    with TestClient(create_app(str(two_enrolled), None, background=False)) as client:
        def post(key, **params):
            return client.post("/v1/diarize", content=body, params=params, headers={"X-API-Key": key, "Content-Type": "audio/wav"})

        assert post(keys["enroll"]).status_code == 403
        assert post("vp_not-a-key").status_code == 401
        refused = post(keys["query"], speakers=0)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_input", refused.text
        answered = post(keys["query"])
        assert answered.status_code == 200, answered.text
    doc = answered.json()
    assert [(s["start"], s["end"], s["speaker"]) for s in doc["segments"]] == [(s.start, s.end, s.speaker) for s in direct.segments]
    assert {s["speaker"] for s in doc["speakers"]} == {"p225", "p226", "unknown-1"}


# --- long uploads as jobs ---------------------------------------------------------------


def test_a_long_upload_is_diarized_as_a_job_with_the_answer_of_the_direct_route(two_enrolled, vctk, tmp_path):
    from fastapi.testclient import TestClient

    from voiceprint.service import create_app

    _, path = _conversation(vctk, ["p225", "p226", "p228"], tmp_path)
    with Engine.open(home=two_enrolled) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("query", "enroll")}
        uploads = eng.uploads
    query = {"X-API-Key": keys["query"]}
    db = f"sqlite:///{two_enrolled / 'voiceprint.db'}"
    with TestClient(create_app(str(two_enrolled), db, background=False)) as client:
        assert client.post("/v1/diarize/jobs", content=path.read_bytes(), headers={"X-API-Key": keys["enroll"]}).status_code == 403
        submitted = client.post("/v1/diarize/jobs", content=path.read_bytes(), headers=query, params={"speakers": 3})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        for _ in range(600):
            job = client.get(f"/v1/diarize/jobs/{job_id}", headers=query).json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        assert job["progress"]["done"] == job["progress"]["total"] >= 1
        direct = client.post("/v1/diarize", content=path.read_bytes(), headers=query, params={"speakers": 3}).json()
        assert job["result"]["segments"] == direct["segments"] and job["result"]["speakers"] == direct["speakers"]
        assert list(uploads.iterdir()) == []  # the upload is deleted once the job ends

        refused = client.post("/v1/diarize/jobs", content=b"not audio at all" * 100, headers=query)
        assert refused.status_code == 422 and refused.json()["error"] == "undecodable_audio"
        assert client.get(f"/v1/diarize/jobs/{job_id + 1}", headers=query).status_code == 404
        assert list(uploads.iterdir()) == []


def test_an_upload_over_the_limit_is_refused_and_nothing_is_kept(two_enrolled, vctk, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from voiceprint.service import create_app

    _, path = _conversation(vctk, ["p225", "p226"], tmp_path, turns=4)
    monkeypatch.setenv("VOICEPRINT_SERVICE__MAX_UPLOAD_BYTES", "100000")
    with Engine.open(home=two_enrolled) as eng:
        key = eng.create_key("query", by="test")[1]
        uploads = eng.uploads
        jobs_before = eng.store.counts()["diarization_jobs"]

    def chunks():  # no Content-Length: the limit is met while the body streams
        data = path.read_bytes()
        for begin in range(0, len(data), 16384):
            yield data[begin : begin + 16384]

    with TestClient(create_app(str(two_enrolled), f"sqlite:///{two_enrolled / 'voiceprint.db'}", background=False)) as client:
        declared = client.post("/v1/diarize/jobs", content=path.read_bytes(), headers={"X-API-Key": key})
        assert declared.status_code == 413, declared.text
        streamed = client.post("/v1/diarize/jobs", content=chunks(), headers={"X-API-Key": key})
        assert streamed.status_code == 413, streamed.text
    assert list(uploads.iterdir()) == []
    with Engine.open(home=two_enrolled) as eng:
        assert eng.store.counts()["diarization_jobs"] == jobs_before


def test_jobs_of_a_stopped_server_fail_and_their_uploads_are_deleted(two_enrolled, tmp_path):
    stopped = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = stopped.stdout.strip()
    host = socket.gethostname()
    with Engine.open(home=two_enrolled) as eng:
        orphan = eng.store.diarizations.submit(owner=f"{host}:{dead}", source="upload", speakers=None)
        elsewhere = eng.store.diarizations.submit(owner=f"another-host:{dead}", source="upload", speakers=None)
        left = [eng.uploads / f"job-{orphan.id}.upload", eng.uploads / f"{host}@{dead}@abc.partial"]
        kept = [eng.uploads / f"job-{elsewhere.id}.upload", eng.uploads / f"{host}@{os.getpid()}@def.partial"]
        for path in left + kept:
            path.write_bytes(b"RIFF")
        assert eng.recover_diarization_jobs() == [orphan.id]
        failed = eng.diarization_job(orphan.id)
        assert failed.status == "failed" and failed.result["error"] == "interrupted"
        assert eng.diarization_job(elsewhere.id).status == "queued"  # another host's: not known here
        assert sorted(eng.uploads.iterdir()) == sorted(kept)
