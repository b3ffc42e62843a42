"""Live audio over WebSocket, against a real `voiceprint serve` process and real speech:
progress, the stored result against the upload's, disconnects, limits, bad frames,
answers while speaking, concurrent sessions and the `voiceprint listen` client."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from test_service import REPO, Server, make_home
from voiceprint.service.listen import file_frames, stream
from voiceprint.storage import Store

pytestmark = pytest.mark.data

# Short limits, so that the idle and size cases take seconds; 8 s of speech completes a profile.
CONFIG = """
[enrollment]
required_speech_s = 8.0
[service]
max_audio_s = 30.0
[live]
idle_timeout_s = 2.0
max_sessions = 8
partial_every_s = 1.0
"""


@pytest.fixture(scope="module")
def vctk(by_speaker) -> dict[str, list[Path]]:
    return by_speaker("vctk-4")


@pytest.fixture(scope="module")
def server(tmp_path_factory, vctk):
    """One server over a home with the four vctk-4 speakers enrolled (three files each)."""
    home, db, keys = make_home(tmp_path_factory.mktemp("live"), config=CONFIG)
    from voiceprint.engine import Engine

    with Engine.open(home, db) as eng:
        for speaker, files in vctk.items():
            for path in files[:3]:
                eng.enroll(speaker, path)
    srv = Server(home, db, keys, home.parent / "server.log").start()
    yield srv
    srv.stop()


def ws_url(srv: Server, route: str) -> str:
    return srv.url.replace("http://", "ws://") + route


def pcm16(path: Path) -> tuple[int, bytes]:
    samples, rate = sf.read(path, dtype="int16")
    return rate, samples.astype("<i2").tobytes()


def session(srv: Server, route: str, start: dict | None, frames: list[bytes], *, role: str = "admin",
            end: bool = True, headers: dict | None = None) -> tuple[list[dict], int | None, str]:
    """Run one session by hand: the start message (None: none), frames, then end; the
    events received, the close code and its reason."""
    headers = {"Authorization": f"Bearer {srv.keys[role]}"} if headers is None else headers
    events = []
    with connect(ws_url(srv, route), additional_headers=headers, open_timeout=30) as ws:
        try:
            if start is not None:
                ws.send(start if isinstance(start, str) else json.dumps(start))
            for frame in frames:
                ws.send(frame)
            if end:
                ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass  # the server closed first: what it said before is still read below
        return received(ws), ws.close_code, ws.close_reason


def received(ws) -> list[dict]:
    """The events still to be read, up to the close (whatever its code)."""
    events = []
    with contextlib.suppress(ConnectionClosed):
        for message in ws:
            events.append(json.loads(message))
    return events


def stored(srv: Server) -> tuple[int, int]:
    """Utterances and speakers stored, read from the database itself."""
    with Store(srv.db) as store:
        speakers = store.profiles.speakers()
        return sum(s.utterances + s.pending for s in speakers), len(speakers)


def test_a_streamed_enrollment_rises_monotonically_and_stores_what_the_upload_stores(server, vctk):
    path = vctk["p225"][5]
    rate, data = pcm16(path)
    frames = [data[i:i + 3200] for i in range(0, len(data), 3200)]  # 0.1 s each
    events, code, _ = session(server, "/v1/stream/enroll/streamed", {"type": "start", "rate": rate, "format": "s16le"},
                              frames)
    assert code == 1000, events[-1]
    assert events[0]["event"] == "ready" and events[0]["required_speech_s"] == 8.0
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) > 10
    values = [e["progress"] for e in progress]
    assert values == sorted(values) and 0 < values[-1] < 1
    assert {e["feedback"] for e in progress if e["speech_s"] > 0} == {"OK"}  # clean studio speech
    # The recording opens with about 1.7 s of silence: NO_SPEECH until the voice starts.
    quiet = [e["feedback"] for e in progress if e["speech_s"] == 0 and e["received_s"] >= 1.25]
    assert quiet and set(quiet) == {"NO_SPEECH"}
    result = events[-1]["result"]
    assert events[-1]["event"] == "result" and result["feedback"] == "OK" and result["count"] == 1

    # The same audio as one WAV upload, for another name.
    wav = io.BytesIO()
    sf.write(wav, np.frombuffer(data, "<i2"), rate, subtype="PCM_16", format="WAV")
    upload = server.client.post("/v1/speakers/uploaded/utterances", content=wav.getvalue(),
                                headers={"Authorization": f"Bearer {server.keys['admin']}"})
    assert upload.status_code == 201, upload.text
    assert upload.json()["speech_s"] == result["speech_s"] and upload.json()["quality"] == result["quality"]
    with Store(server.db) as store:
        live = store.profiles.centroid("streamed", result["version"])
        uploaded = store.profiles.centroid("uploaded", result["version"])
    assert live.count == uploaded.count == 1
    np.testing.assert_allclose(live.mean, uploaded.mean, atol=1e-6)


def test_an_enrollment_ends_by_itself_when_the_profile_reaches_the_required_speech(server, vctk):
    first, second = vctk["p226"][5], vctk["p226"][6]
    rate, data = file_frames(first)
    final, code = stream(ws_url(server, ""), "enroll", server.keys["enroll"], data, rate, speaker="complete", pace=0)
    assert code == 1000 and final["result"]["progress"] < 1
    before = final["result"]["profile_speech_s"]
    seen: list[dict] = []
    rate, data = file_frames(second)
    sent = []
    final, code = stream(ws_url(server, ""), "enroll", server.keys["enroll"], (sent.append(f) or f for f in data), rate,
                         speaker="complete", pace=4, on_event=seen.append)
    assert code == 1000
    assert seen[0]["profile_speech_s"] == round(before, 3)
    assert seen[1]["progress"] >= before / 8.0 - 1e-3  # counts what the profile already holds
    result = final["result"]
    assert result["progress"] == 1.0 and result["count"] == 2
    # It stopped before the file did: the second utterance is a prefix of the recording.
    assert result["quality"]["duration_s"] < sf.info(second).duration - 0.5
    assert len(sent) < -(-sf.info(second).frames // int(rate * 0.1))


def test_a_disconnect_before_the_end_stores_nothing(server, vctk):
    rate, data = pcm16(vctk["p227"][5])
    before = stored(server)
    # A polite close without "end", then a dropped TCP connection mid-stream.
    with connect(ws_url(server, "/v1/stream/enroll/leaver"),
                 additional_headers={"Authorization": f"Bearer {server.keys['admin']}"}) as ws:
        ws.send(json.dumps({"type": "start", "rate": rate}))
        ws.send(data[:64000])
        assert json.loads(ws.recv())["event"] == "ready"
    with contextlib.suppress(ConnectionClosed, OSError), connect(
            ws_url(server, "/v1/stream/enroll/leaver"), additional_headers={"Authorization": f"Bearer {server.keys['admin']}"}) as ws:
        ws.send(json.dumps({"type": "start", "rate": rate}))
        ws.send(data)
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame at all: the connection is simply gone
    time.sleep(2)
    assert stored(server) == before
    assert server.get("/v1/speakers/leaver").status_code == 404


@pytest.mark.parametrize("case, start, frames, code, error", [
    ("PCM before the start message", None, [b"\x00\x00" * 100], 4400, "malformed_stream"),
    ("start is not JSON", "start", [], 4400, "malformed_stream"),
    ("no rate", {"type": "start"}, [], 4400, "malformed_stream"),
    ("a rate that is no rate", {"type": "start", "rate": 7}, [], 4400, "malformed_stream"),
    ("an unknown format", {"type": "start", "rate": 16000, "format": "mp3"}, [], 4400, "malformed_stream"),
    ("an unknown field", {"type": "start", "rate": 16000, "speed": 2}, [], 4400, "malformed_stream"),
    ("half a sample at the end", {"type": "start", "rate": 16000}, [b"\x01\x00" * 16000 + b"\x01"], 4400, "malformed_stream"),
    ("NaN in float frames", {"type": "start", "rate": 16000, "format": "f32le"},
     [np.full(1600, np.nan, "<f4").tobytes()], 4422, "non_finite_audio"),
    ("silence only", {"type": "start", "rate": 16000}, [b"\x00\x00" * 32000], 4422, "no_speech"),
    ("more audio than allowed", {"type": "start", "rate": 8000}, [b"\x01\x00" * 8000] * 31, 4413, "too_long"),
])
def test_bad_frames_get_a_close_code_a_reason_and_store_nothing(server, case, start, frames, code, error):
    before = stored(server)
    events, got, reason = session(server, "/v1/stream/enroll/fuzzed", start, frames)
    assert (got, reason) == (code, error), (case, events)
    assert events[-1]["event"] == "error" and events[-1]["error"] == error and events[-1]["message"]
    assert stored(server) == before


def test_keys_and_roles_as_on_the_http_routes(server, vctk):
    rate, data = pcm16(vctk["p228"][5])
    start = {"type": "start", "rate": rate}
    assert session(server, "/v1/stream/identify", start, [], headers={})[1:] == (4401, "unauthorized")
    assert session(server, "/v1/stream/enroll/x", start, [], role="query")[1:] == (4403, "forbidden")
    assert session(server, "/v1/stream/enroll/x", {**start, "force": True}, [], role="enroll")[1:] == (4403, "forbidden")
    # The key in the start message (what a browser does), never in the URL.
    events, code, _ = session(server, "/v1/stream/verify/p228", {**start, "key": server.keys["query"]}, [data], headers={})
    assert code == 1000 and events[-1]["result"]["accepted"] and events[-1]["result"]["score"] is None  # query: no scores
    assert session(server, f"/v1/stream/identify?key={server.keys['query']}", start, [], headers={})[1:] == (4400, "key_in_url")
    log = server.log.read_text()
    assert server.keys["query"] not in log and server.keys["admin"] not in log


def test_an_idle_client_is_closed(server):
    started = time.monotonic()
    events, code, reason = session(server, "/v1/stream/identify", {"type": "start", "rate": 16000}, [], end=False)
    assert (code, reason) == (4408, "idle") and 1.5 < time.monotonic() - started < 10


def test_identify_and_verify_answer_while_the_person_speaks_and_decide_as_the_upload(server, vctk):
    path = vctk["p227"][7]
    rate, frames = file_frames(path)
    seen: list[dict] = []
    final, code = stream(ws_url(server, ""), "identify", server.keys["query"], frames, rate, pace=2, on_event=seen.append)
    assert code == 1000
    partial = [e for e in seen if e["event"] == "partial"]
    assert len(partial) >= 2 and [e["speech_s"] for e in partial] == sorted(e["speech_s"] for e in partial)
    assert all(e["result"]["candidates"] for e in partial)
    assert final["result"]["decision"] == "p227"
    wav = io.BytesIO()
    sf.write(wav, sf.read(path, dtype="int16")[0], rate, subtype="PCM_16", format="WAV")
    upload = server.client.post("/v1/identify", content=wav.getvalue(), headers={"X-API-Key": server.keys["query"]}).json()
    assert upload["candidates"] == final["result"]["candidates"] and upload["decision"] == "p227"

    for claimed in ("p227", "p225"):
        rate, frames = file_frames(path)
        final, code = stream(ws_url(server, ""), "verify", server.keys["admin"], frames, rate, speaker=claimed, pace=0)
        upload = server.client.post(f"/v1/verify/{claimed}", content=wav.getvalue(),
                                    headers={"X-API-Key": server.keys["admin"]}).json()
        assert code == 1000 and {**final["result"], "source": "upload"} == upload and final["result"]["score"] is not None
        assert final["result"]["accepted"] is (claimed == "p227")


def test_eight_streams_at_once_and_the_ninth_is_refused(server, vctk):
    files = [f for s in sorted(vctk) for f in vctk[s][8:10]]  # 8 files, 2 per speaker
    assert len(files) == 8
    results: list = [None] * 8
    opened = threading.Barrier(9)
    release = threading.Event()

    def client(i: int) -> None:
        rate, data = pcm16(files[i])
        with connect(ws_url(server, "/v1/stream/identify"),
                     additional_headers={"Authorization": f"Bearer {server.keys['query']}"}) as ws:
            ws.send(json.dumps({"type": "start", "rate": rate}))
            assert json.loads(ws.recv())["event"] == "ready"
            opened.wait(timeout=60)
            release.wait(timeout=60)
            for k in range(0, len(data), 8000):
                ws.send(data[k:k + 8000])
            ws.send(json.dumps({"type": "end"}))
            events = received(ws)  # read up to the close first: then the close code is known
            results[i] = (ws.close_code, events[-1])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    opened.wait(timeout=60)
    events, code, reason = session(server, "/v1/stream/identify", {"type": "start", "rate": 16000}, [])
    assert (code, reason) == (4503, "busy")
    release.set()
    for t in threads:
        t.join(timeout=120)
    for i, (code, last) in enumerate(results):
        assert code == 1000 and last["event"] == "result", (i, last)
        assert last["result"]["decision"] == files[i].parent.name


def test_the_listen_command_streams_a_file_and_stdin(server, vctk, tmp_path):
    env = {**os.environ, "VOICEPRINT_KEY": server.keys["admin"]}
    url = ws_url(server, "")
    path = vctk["p228"][9]
    run = subprocess.run([sys.executable, "-m", "voiceprint.cli", "listen", "verify", "p228", str(path), "--url", url,
                          "--pace", "0", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    last = json.loads(run.stdout.splitlines()[-1])
    assert last["event"] == "result" and last["result"]["accepted"] is True

    rate, data = pcm16(vctk["p225"][9])  # a microphone's raw PCM, as arecord -t raw writes it
    run = subprocess.run([sys.executable, "-m", "voiceprint.cli", "listen", "identify", "-", "--rate", str(rate),
                          "--url", url, "--pace", "0"], cwd=REPO, env=env, input=data, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().startswith("decision: p225")

    run = subprocess.run([sys.executable, "-m", "voiceprint.cli", "listen", "identify", str(path), "--url",
                          "ws://127.0.0.1:9"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "cannot open ws://127.0.0.1:9" in run.stderr


def test_a_voice_unlike_the_profile_is_flagged_while_speaking_and_held_at_the_end(server, vctk):
    """p227 streamed as p225 (three utterances enrolled): the consistency check of the
    commit, run on the speech so far every [live] check_every_s, says INCONSISTENT_SPEAKER
    before the end, and the final enrollment is held for review as an upload would be."""
    rate, frames = file_frames(vctk["p227"][4])
    seen: list[dict] = []
    final, code = stream(ws_url(server, ""), "enroll", server.keys["enroll"], frames, rate, speaker="p225", pace=1,
                         on_event=seen.append)
    assert code == 1000 and final["result"]["feedback"] == "INCONSISTENT_SPEAKER"
    flagged = [e for e in seen if e["event"] == "progress" and e["feedback"] == "INCONSISTENT_SPEAKER"]
    assert flagged and flagged[0]["speech_s"] >= 3.0
    with Store(server.db) as store:
        assert [u.id for u in store.profiles.utterances("p225", status="pending")] == [final["result"]["utterance_id"]]
