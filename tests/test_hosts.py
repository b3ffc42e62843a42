"""Several hosts on one PostgreSQL database, sharing nothing but its URL: two real
`voiceprint serve` processes, each with a home folder of its own (the second one empty
but for its config.toml), answer for each other's enrollments, model versions, rollbacks
and erasures over HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_service import Server, make_home
from voiceprint.engine import Engine

pytestmark = [pytest.mark.data, pytest.mark.postgres]

REFRESH_S = 0.5
INDEX = f"[index]\nrefresh_s = {REFRESH_S}\n"
# The smallest refresh that promotes: two steps, the gate off (its verdict is not what is tested).
REFRESH = "[refresh]\nsteps = 2\nspeakers_per_batch = 4\nholdout_fraction = 0.3\ngate = false\n"


def identify(server: Server, probe: Path) -> dict:
    answer = server.post_audio("/v1/identify", probe, role="query")
    assert answer.status_code == 200, answer.text
    return answer.json()


def top(server: Server, probe: Path) -> str | None:
    candidates = identify(server, probe)["candidates"]
    return candidates[0]["speaker"] if candidates else None


def within(seconds: float, check) -> float:
    """Ask ``check()`` until it holds; the time from now to the start of the asking that
    found it so, which must be at most ``seconds``."""
    start = time.monotonic()
    while True:
        asked = time.monotonic() - start
        if check():
            return asked
        assert asked <= seconds, f"not seen within {seconds} s"
        time.sleep(0.05)


def test_two_hosts_on_one_database_serve_each_other_s_writes(fresh_pg_url, tmp_path, by_speaker) -> None:
    db = fresh_pg_url
    vctk = by_speaker("vctk-4")
    first, second = sorted(by_speaker("librispeech-test-other"))[:2]
    libri = by_speaker("librispeech-test-other")
    # Host A runs the queued refresh at once; host B never looks at the queue (it would
    # take A's job half the time), so the new version is one B has never had as a file.
    a_home, _, keys = make_home(tmp_path / "a", db, INDEX + REFRESH + "[service]\nrefresh_check_s = 0.5\n")
    b_home = tmp_path / "b" / "home"
    b_home.mkdir(parents=True)
    (b_home / "config.toml").write_text(INDEX + "[service]\nrefresh_check_s = 86400\n")
    with Engine.open(home=a_home, db=db) as eng:  # enough for a refresh to hold out its gate's slice
        eng.enroll_many([(s, p, None) for s, paths in vctk.items() for p in paths[:6]])

    a, b = Server(a_home, db, keys, tmp_path / "a.log"), Server(b_home, db, keys, tmp_path / "b.log")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Server.start, (a, b)))
        for server in (a, b):
            ready = server.client.get("/readyz")
            assert ready.status_code == 200, ready.text  # B's: version 1's weights came from the database
        assert sorted(p.name for p in (b_home / "checkpoints").iterdir()) == ["v0001.pt"]

        # An enrollment through one host is identified through the other within refresh_s.
        for writer, reader, speaker in ((a, b, first), (b, a, second)):
            probe = libri[speaker][-1]
            assert top(reader, probe) != speaker
            for path in libri[speaker][:3]:
                assert writer.post_audio(f"/v1/speakers/{speaker}/utterances", path, role="enroll").status_code == 201
            within(REFRESH_S + 1, lambda: top(reader, probe) == speaker)

        # A refresh run on A is served by B, from weights B reads from the database.
        queued = a.client.post("/v1/refresh", headers={"X-API-Key": keys["admin"]})
        assert queued.status_code == 202, queued.text
        deadline = time.monotonic() + 60
        while (job := a.get(f"/v1/jobs/{queued.json()['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded" and job["result"]["status"] == "promoted", job
        new = job["version"]
        probe = vctk[sorted(vctk)[0]][-1]
        assert identify(b, probe)["version"] == identify(a, probe)["version"] == new
        assert (b_home / "checkpoints" / f"v{new:04d}.pt").is_file()

        # A rollback on B is served by A.
        rolled = b.client.post("/v1/versions/1/activate", headers={"X-API-Key": keys["admin"]})
        assert rolled.status_code == 200 and rolled.json()["previous"] == new, rolled.text
        assert identify(a, probe)["version"] == 1

        # An erasure through B leaves no trace in A's answers (nor in B's own).
        probe = libri[first][-1]
        erased = b.client.delete(f"/v1/speakers/{first}", headers={"X-API-Key": keys["admin"]})
        assert erased.status_code == 200, erased.text
        assert first not in [c["speaker"] for c in identify(b, probe)["candidates"]]
        within(REFRESH_S + 1, lambda: first not in [c["speaker"] for c in identify(a, probe)["candidates"]])
        assert top(a, libri[second][-1]) == second  # the other host's enrollment stays
    finally:
        for server in (a, b):
            server.stop()
