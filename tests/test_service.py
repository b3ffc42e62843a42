"""The HTTP service, tested against real `voiceprint serve` processes on SQLite and PostgreSQL:
keys and roles, concurrent clients, kill -9 during enrollments and refreshes, fuzzed input."""

from __future__ import annotations

import io
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import create_engine

from voiceprint.engine import Engine
from voiceprint.service import create_app
from voiceprint.storage import Store

REPO = Path(__file__).resolve().parents[1]
SMALL_REFRESH = "[refresh]\nsteps = 400\nspeakers_per_batch = 4\nholdout_fraction = 0.3\n"

pytestmark = pytest.mark.data


@dataclass
class Server:
    """One `voiceprint serve` process, its keys and its log."""

    home: Path
    db: str
    keys: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    url: str = ""
    client: httpx.Client = field(default=None)  # type: ignore[assignment]

    def start(self, timeout: float = 120) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voiceprint.cli", "--home", str(self.home), "--db", self.db, "serve", "--port", "0"],
            cwd=REPO, stdout=log, stderr=log, text=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            found = re.findall(r"http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                self.url = f"http://127.0.0.1:{found[-1]}"
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut or the OOM killer."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.client is not None:
            self.client.close()

    def post_audio(self, route: str, path: Path, role: str = "admin", **params) -> httpx.Response:
        return self.client.post(
            route, content=path.read_bytes(), params=params,
            headers={"Authorization": f"Bearer {self.keys[role]}", "Content-Type": "audio/flac"},
        )

    def get(self, route: str, role: str = "admin") -> httpx.Response:
        return self.client.get(route, headers={"X-API-Key": self.keys[role]})


def make_home(root: Path, db: str | None = None, config: str = "") -> tuple[Path, str, dict[str, str]]:
    home = root / "home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(config)
    db = db or f"sqlite:///{home / 'voiceprint.db'}"
    with Engine.init(home=home, db=db) as eng:
        keys = {role: eng.create_key(role, by="test")[1] for role in ("admin", "enroll", "query")}
    return home, db, keys


@pytest.fixture
def servers(request):
    """Starts servers and makes sure every one is stopped after the test."""
    started: list[Server] = []

    def start(home: Path, db: str, keys: dict[str, str], name: str = "server") -> Server:
        server = Server(home, db, keys, home.parent / f"{name}.log").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def centroids_match_embeddings(db: str) -> dict[str, int]:
    """Every centroid equals the mean of its speaker's enrolled embeddings; returns the counts."""
    with Store(db) as store:
        version = store.registry.active_version().number
        names, means = store.profiles.centroid_matrix(version)
        counts = {}
        for name, mean in zip(names, means):
            vectors = store.profiles.embeddings(name, version)
            np.testing.assert_allclose(mean, vectors.mean(axis=0), atol=1e-5, err_msg=name)
            counts[name] = len(vectors)
        return counts


# -- API keys and roles --------------------------------------------------------------


def test_keys_and_roles_guard_every_route(tmp_path, by_speaker, servers):
    home, db, keys = make_home(tmp_path)
    server = servers(home, db, keys)
    wav = by_speaker("vctk-4")["p225"][0]
    body = {"content": wav.read_bytes(), "headers": {"Content-Type": "audio/flac"}}
    c = server.client
    # No key, a wrong key, a wrong role: nothing is done.
    assert c.post("/v1/speakers/ann/utterances", **body).status_code == 401
    wrong = c.post("/v1/speakers/ann/utterances", content=body["content"],
                   headers={"Content-Type": "audio/flac", "Authorization": "Bearer vp_not-a-key"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    forbidden = server.post_audio("/v1/speakers/ann/utterances", wav, role="query")
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
    assert server.post_audio("/v1/identify", wav, role="enroll").status_code == 403
    assert server.client.post("/v1/refresh", headers={"X-API-Key": keys["enroll"]}).status_code == 403
    assert server.client.delete("/v1/speakers/ann", headers={"X-API-Key": keys["query"]}).status_code == 403
    with Store(db) as store:
        assert store.counts()["utterances"] == 0 and store.counts()["jobs"] == 0

    # The right roles work; admin may do everything.
    enrolled = server.post_audio("/v1/speakers/ann/utterances", wav, role="enroll")
    assert enrolled.status_code == 201 and enrolled.json()["feedback"] == "OK"
    identified = server.post_audio("/v1/identify", wav, role="query")
    assert identified.status_code == 200 and identified.json()["decision"] == "ann"
    verified = server.post_audio("/v1/verify/ann", wav, role="admin")
    assert verified.status_code == 200 and verified.json()["accepted"] is True
    assert server.get("/v1/speakers", role="enroll").json()[0]["name"] == "ann"
    assert server.get("/v1/speakers/bob", role="enroll").status_code == 404

    # A revoked key stops working at once; the keys table holds digests, never keys.
    with Engine.open(home=home, db=db) as eng:
        query_id = next(k.id for k in eng.list_keys() if k.role == "query")
        eng.revoke_key(query_id, by="test")
    raw = create_engine(db)
    try:
        with raw.connect() as conn:
            stored = json.dumps([list(row) for row in conn.exec_driver_sql("SELECT * FROM api_keys")], default=str)
    finally:
        raw.dispose()
    assert server.post_audio("/v1/identify", wav, role="query").status_code == 401
    assert not any(key in stored or key[3:] in stored for key in keys.values())

    metrics = server.client.get("/metrics").text
    assert 'voiceprint_enrollments_total{outcome="OK"} 1.0' in metrics
    assert "voiceprint_active_version 1.0" in metrics
    assert 'route="/v1/speakers/{speaker}/utterances"' in metrics and "ann" not in metrics

    admin = {"X-API-Key": keys["admin"]}
    activated = server.client.post("/v1/versions/1/activate", headers=admin)
    assert activated.status_code == 200 and activated.json()["changed"] is False
    assert server.client.post("/v1/versions/7/activate", headers=admin).json()["error"] == "unknown_version"
    # Erasure over HTTP: the profile is gone, and the audit log names the key, not the speaker.
    erased = server.client.delete("/v1/speakers/ann", headers=admin)
    assert erased.status_code == 200 and erased.json()["utterances"] == 1
    assert server.client.delete("/v1/speakers/ann", headers=admin).status_code == 404
    assert server.post_audio("/v1/verify/ann", wav).status_code == 404
    with Store(db) as store:
        assert store.counts()["utterances"] == store.counts()["embeddings"] == store.counts()["centroids"] == 0
        entry = next(e for e in store.keys.audit_log() if e.action == "erase_speaker")
    assert entry.actor.startswith("key:") and "ann" not in json.dumps(entry.detail)


def test_the_log_has_one_line_per_request_by_route_template_and_the_lifecycle_events(tmp_path, by_speaker, servers):
    from voiceprint.engine.events import parse

    home, db, keys = make_home(tmp_path, config="[scoring]\nmin_calibration_speakers = 2\n")
    server = servers(home, db, keys)
    secret, file_name = "zelda-secret-name", "private-recording-77.flac"
    files = by_speaker("vctk-4")
    for speaker, name in (("p225", secret), ("p226", "p226"), ("p227", "p227")):
        for path in files[speaker][:2]:
            r = server.client.post(f"/v1/speakers/{name}/utterances", headers={"X-API-Key": keys["enroll"]},
                                   files={"file": (file_name, path.read_bytes(), "audio/flac")})
            assert r.status_code == 201, r.text
    assert server.get(f"/v1/speakers/{secret}", role="enroll").status_code == 200
    assert server.get("/v1/speakers/nobody-else", role="enroll").status_code == 404
    assert server.client.get(f"/v1/speakers/{secret}").status_code == 401
    calibrated = server.client.post("/v1/calibrate", headers={"X-API-Key": keys["admin"]})
    assert calibrated.status_code == 200, calibrated.text
    assert server.client.post("/v1/versions/1/activate", headers={"X-API-Key": keys["admin"]}).status_code == 200
    server.stop()
    text = server.log.read_text()
    assert secret not in text and file_name not in text and "nobody-else" not in text

    def fields(logger: str) -> list[dict]:
        return [parse(line.split(f"{logger}: ", 1)[1]) for line in text.splitlines() if f" {logger}: " in line]

    access = fields("voiceprint.access")
    enrolls = [a for a in access if a["route"] == "/v1/speakers/{speaker}/utterances"]
    assert len(enrolls) == 6 and all(a["method"] == "POST" and a["status"] == "201" and a["role"] == "enroll" for a in enrolls)
    assert all(a["key"].isdigit() and float(a["ms"]) > 0 for a in enrolls)
    profile = "/v1/speakers/{speaker:path}"
    assert [(a["status"], a["role"]) for a in access if a["route"] == profile] == [("200", "enroll"), ("404", "enroll"), ("401", "-")]
    events = [e["event"] for e in fields("voiceprint.events")]
    assert events[0] == "server_started" and events[-1] == "server_stopped", events
    assert {"calibrated", "rollback_started", "rollback_finished"} <= set(events), events


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_everything_from_the_server_itself(tmp_path, page):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(str(tmp_path / "home"), f"sqlite:///{tmp_path / 'none.db'}", background=False))
    html = client.get(page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    pattern = r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)|(?:url|oauth2RedirectUrl)['"]?\s*:\s*['"]([^'"]+)"""
    urls = [a or b for a, b in re.findall(pattern, html.text)]
    assert any(u.endswith(".js") for u in urls) and "/openapi.json" in urls, urls
    assert not re.search(r"https?://|//[a-z]", html.text.replace("http://www.w3.org", "")), "a URL off this server"
    for url in urls:
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url


def test_an_uploads_format_comes_from_its_bytes_never_its_declared_type(tmp_path, by_speaker):
    from fastapi.testclient import TestClient

    home, db, keys = make_home(tmp_path)
    files = by_speaker("vctk-4")["p225"]

    def encoded(path: Path, fmt: str, subtype: str) -> bytes:
        samples, rate = sf.read(path, dtype="float32")
        out = io.BytesIO()
        sf.write(out, samples, rate, format=fmt, subtype=subtype)
        return out.getvalue()

    uploads = [  # (body, declared type or None): each a different recording, so none is a duplicate
        (files[0].read_bytes(), "audio/wav"),  # FLAC said to be WAV
        (encoded(files[1], "WAV", "PCM_16"), None),  # no type at all
        (encoded(files[2], "MP3", "MPEG_LAYER_III"), "text/plain"),
        (encoded(files[3], "OGG", "VORBIS"), "audio/mpeg"),
    ]
    auth = {"X-API-Key": keys["admin"]}
    with TestClient(create_app(str(home), db, background=False)) as client:
        for body, kind in uploads:
            headers = {**auth, **({"Content-Type": kind} if kind else {})}
            r = client.post("/v1/speakers/ann/utterances", content=body, headers=headers)
            assert r.status_code == 201, (kind, r.text)
        probe = client.post("/v1/identify", content=encoded(files[4], "MP3", "MPEG_LAYER_III"), headers=auth)
        assert probe.status_code == 200 and probe.json()["candidates"][0]["speaker"] == "ann"
        for kind in ("audio/flac", "audio/wav", None):
            headers = {**auth, **({"Content-Type": kind} if kind else {})}
            bad = client.post("/v1/speakers/ann/utterances", content=b"RIFF not really audio" * 50, headers=headers)
            assert bad.status_code == 422 and bad.json()["error"] == "undecodable_audio", bad.text
    with Store(db) as store:
        assert store.counts()["utterances"] == 4


def test_cli_creates_lists_and_revokes_keys(tmp_path, db_url):
    home, db, _ = make_home(tmp_path, db_url)

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "voiceprint.cli", "--home", str(home), "--db", db, "--json", *argv],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    created = cli("keys", "create", "--role", "enroll", "--note", "kiosk")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    with Engine.open(home=home, db=db) as eng:
        record = eng.authenticate(key)
        assert record is not None and record.role == "enroll" and record.note == "kiosk"
    assert cli("keys", "create").returncode == 2  # a role is required
    assert cli("keys", "revoke", "--id", str(record.id)).returncode == 0
    listed = json.loads(cli("keys", "list").stdout)
    assert [k["revoked_at"] is not None for k in listed if k["id"] == record.id] == [True]
    with Engine.open(home=home, db=db) as eng:
        assert eng.authenticate(key) is None  # revoked
    with Store(db) as store:
        assert [e.action for e in store.keys.audit_log()][:2] == ["revoke_key", "create_key"]


def test_openapi_schema_is_committed():
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert create_app("unused-home").openapi() == committed, "run: voiceprint openapi > docs/openapi.json"


# -- concurrency -----------------------------------------------------------------------


CLIENTS, PER_CLIENT = 16, 50


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_concurrent_clients_lose_nothing(backend, tmp_path, by_speaker, servers, request):
    """16 clients x 50 enrollments to overlapping speakers, with identify calls between
    them. On PostgreSQL the clients share two server processes on one database."""
    db = request.getfixturevalue("fresh_pg_url") if backend == "postgresql" else None
    home, db, keys = make_home(tmp_path, db)
    pool = servers(home, db, keys, "a")
    fleet = [pool] if backend == "sqlite" else [pool, servers(home, db, keys, "b")]
    files = by_speaker("speechocean762-train")
    work = [(s, p) for s, paths in sorted(files.items()) for p in paths][: CLIENTS * PER_CLIENT]
    # Dealt round-robin: every speaker's files are spread over several clients at once.
    jobs = [work[i::CLIENTS] for i in range(CLIENTS)]
    acknowledged: list[tuple[str, int]] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        server = fleet[i % len(fleet)]
        rng = random.Random(i)
        for n, (speaker, path) in enumerate(jobs[i]):
            r = server.post_audio(f"/v1/speakers/{speaker}/utterances", path, role="enroll")
            with lock:
                statuses.append(r.status_code)
                if r.status_code == 201:
                    acknowledged.append((speaker, r.json()["utterance_id"]))
            if n % 5 == 4:
                probe = rng.choice(work)[1]
                with lock:
                    statuses.append(server.post_audio("/v1/identify", probe, role="query").status_code)

    with ThreadPoolExecutor(CLIENTS) as executor:
        list(executor.map(client, range(CLIENTS)))

    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    # Only speech the engine refuses (too short after VAD, too noisy...) may fail.
    assert len(acknowledged) >= 0.9 * len(work)
    with Store(db) as store:
        stored = {u.id: u.speaker for u in store.profiles.utterances(status=None)}
    assert all(stored.get(uid) == speaker for speaker, uid in acknowledged)
    assert len(stored) == len(acknowledged)
    counts = centroids_match_embeddings(db)
    assert sum(counts.values()) == len(acknowledged) - _held(db)  # held ones are stored, outside the profile


def _held(db: str) -> int:
    with Store(db) as store:
        return len(store.profiles.utterances(status="pending"))


@pytest.mark.postgres
def test_two_servers_on_one_postgresql_database_refresh_one_at_a_time(fresh_pg_url, tmp_path, by_speaker, servers):
    home, db, keys = make_home(tmp_path, fresh_pg_url, SMALL_REFRESH.replace("400", "3"))
    a, b = servers(home, db, keys, "a"), servers(home, db, keys, "b")
    for n, (speaker, paths) in enumerate(by_speaker("vctk-4").items()):
        for path in paths:
            assert (a if n % 2 else b).post_audio(f"/v1/speakers/{speaker}/utterances", path).status_code == 201
    jobs = [s.client.post("/v1/refresh", headers={"X-API-Key": keys["admin"]}) for s in (a, b)]
    assert [j.status_code for j in jobs] == [202, 202]
    ids = [j.json()["id"] for j in jobs]
    deadline = time.monotonic() + 300
    while True:
        states = [a.get(f"/v1/jobs/{i}").json() for i in ids]
        if all(s["finished_at"] for s in states):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    with Store(db) as store:
        ran = sorted((j.started_at, j.finished_at) for j in store.jobs.list_jobs() if j.started_at and j.status != "skipped")
    assert ran, states
    assert all(earlier[1] <= later[0] for earlier, later in zip(ran, ran[1:])), ran  # never two at once
    assert {s["status"] for s in states} <= {"succeeded", "rejected", "skipped"}


# -- crashes ---------------------------------------------------------------------------


def test_kill_9_during_enrollments_loses_no_acknowledged_enrollment(tmp_path, by_speaker, servers):
    home, db, keys = make_home(tmp_path)
    server = servers(home, db, keys)
    work = [(s, p) for s, paths in sorted(by_speaker("speechocean762-train").items())[:20] for p in paths]
    acknowledged: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for speaker, path in work[i::4]:
            try:
                r = server.post_audio(f"/v1/speakers/{speaker}/utterances", path)
            except httpx.TransportError:
                return  # the server died mid-request: that enrollment was never acknowledged
            if r.status_code == 201:
                with lock:
                    acknowledged.append(r.json()["utterance_id"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 30:
        assert any(t.is_alive() for t in threads)
        time.sleep(0.05)
    server.kill()
    for t in threads:
        t.join()
    assert len(acknowledged) < len(work), "the kill came too late to interrupt anything"

    restarted = servers(home, db, keys, "restarted")
    with Store(db) as store:
        stored = {u.id for u in store.profiles.utterances(status=None)}
    assert set(acknowledged) <= stored
    centroids_match_embeddings(db)
    # The restarted server carries on where the killed one stopped.
    speaker, path = work[-1]
    assert restarted.post_audio(f"/v1/speakers/{speaker}/utterances", path).status_code in (201, 409)


def test_kill_9_during_a_refresh_keeps_the_active_version_and_fails_the_job(tmp_path, by_speaker, servers):
    home, db, keys = make_home(tmp_path, config=SMALL_REFRESH)
    server = servers(home, db, keys)
    for speaker, paths in by_speaker("vctk-4").items():
        for path in paths:
            assert server.post_audio(f"/v1/speakers/{speaker}/utterances", path).status_code == 201
    before = centroids_match_embeddings(db)
    job = server.client.post("/v1/refresh", headers={"X-API-Key": keys["admin"]}).json()
    deadline = time.monotonic() + 120
    while server.get(f"/v1/jobs/{job['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2)  # into the training
    server.kill()

    restarted = servers(home, db, keys, "restarted")
    after = restarted.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "failed" and "interrupted" in after["result"]["error"]
    versions = restarted.get("/v1/versions").json()
    assert [v["number"] for v in versions if v["active"]] == [1]
    assert all(v["status"] != "candidate" for v in versions)
    assert restarted.client.get("/readyz").json()["active_version"] == 1
    assert centroids_match_embeddings(db) == before


# -- hostile input -----------------------------------------------------------------------


def _wav(samples: np.ndarray, subtype: str = "FLOAT") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_fuzzed_requests_get_4xx_and_store_nothing(tmp_path, by_speaker, servers):
    home, db, keys = make_home(tmp_path)
    (home / "config.toml").write_text("[service]\nmax_request_bytes = 2000000\nmax_audio_s = 30\n")
    server = servers(home, db, keys)
    good = by_speaker("vctk-4")["p225"][0].read_bytes()
    assert server.client.post("/v1/speakers/ann/utterances", content=good,
                              headers={"X-API-Key": keys["admin"], "Content-Type": "audio/flac"}).status_code == 201
    with Store(db) as store:
        counts = store.counts()
    rng = np.random.default_rng(0)
    nan = rng.normal(0, 0.1, 32000).astype(np.float32)
    nan[1000:1100] = np.nan
    bodies = [rng.bytes(n) for n in (1, 44, 1000, 100_000)] + [
        b"", good[:100], good[: len(good) // 2], b"RIFF" + rng.bytes(200), _wav(nan),
        _wav(np.zeros(32000, np.float32)), _wav(rng.normal(0, 0.1, 16000 * 40).astype(np.float32)),  # 40 s > 30 s
        b"\x00" * 2_100_000,  # over the body limit
    ]
    routes = ["/v1/speakers/bob/utterances", "/v1/identify", "/v1/verify/ann"]
    auth = {"X-API-Key": keys["admin"]}
    answers = []
    for body in bodies:
        for route in routes:
            for kind in ("audio/wav", "application/octet-stream"):
                answers.append(server.client.post(route, content=body, headers={**auth, "Content-Type": kind}))
    for route in routes:
        answers += [
            server.client.post(route, content=b"plain text, not audio", headers={**auth, "Content-Type": "text/plain"}),
            server.client.post(route, json={"audio": "x"}, headers=auth),
            server.client.post(route, files={"not-file": ("a.wav", good)}, headers=auth),
            server.client.post(route, content=b"--x\r\nbroken", headers={**auth, "Content-Type": "multipart/form-data; boundary=x"}),
            server.client.post(route, content=good, headers={**auth, "Content-Type": "audio/flac", "X-Junk": "a" * 200_000}),
            server.client.post(route, content=iter([good[:1000]] * 2500), headers={**auth, "Content-Type": "audio/flac"}),  # chunked, over the limit
        ]
    answers += [
        server.client.post("/v1/identify", params={"top": "-3"}, content=good, headers={**auth, "Content-Type": "audio/flac"}),
        server.client.post("/v1/identify", params={"top": "many"}, content=good, headers={**auth, "Content-Type": "audio/flac"}),
        server.client.post(f"/v1/speakers/{'x' * 300}/utterances", content=good, headers={**auth, "Content-Type": "audio/flac"}),
        server.client.post("/v1/speakers/%00%01/utterances", content=good, headers={**auth, "Content-Type": "audio/flac"}),
        server.client.get("/v1/jobs/999", headers=auth),
        server.client.get("/v1/jobs/NaN", headers=auth),
        server.client.post("/v1/versions/99/activate", headers=auth),
        server.client.delete("/v1/speakers/nobody", headers=auth),
        server.client.get("/v1/../../etc/passwd", headers=auth),
        server.client.request("PATCH", "/v1/identify", headers=auth),
    ]
    statuses = sorted({r.status_code for r in answers})
    wrong = [(r.request.method, str(r.request.url), dict(r.request.headers).get("content-type"), r.status_code) for r in answers if not 400 <= r.status_code < 500]
    assert not wrong, wrong
    assert all("error" in r.json() for r in answers if r.headers.get("content-type") == "application/json")
    assert {413, 422, 400, 404} <= set(statuses)
    assert server.proc.poll() is None and server.client.get("/healthz").status_code == 200
    with Store(db) as store:
        assert store.counts() == counts  # nothing stored by any of them


# -- refresh requests over HTTP --------------------------------------------------------


def _wait_for_jobs(client, auth: dict, ids: list[int], timeout: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [client.get(f"/v1/jobs/{i}", headers=auth).json() for i in ids]
        if all(j["finished_at"] for j in jobs):
            return jobs
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)


def test_a_dry_run_queued_over_http_runs_as_one_and_covers_no_real_request(tmp_path, by_speaker):
    """{"dry_run": true} is honoured by the service's worker: the candidate is trained and
    evaluated, no version is stored, the job says it was a dry run; the real request queued
    beside it is run on its own. A body key the route does not know is a 422."""
    from fastapi.testclient import TestClient

    home, db, keys = make_home(tmp_path, config="[refresh]\nsteps = 2\nspeakers_per_batch = 4\nholdout_fraction = 0.3\n")
    with Engine.open(home=home, db=db) as eng:
        eng.enroll_many([(s, p, None) for s, paths in by_speaker("vctk-4").items() for p in paths[:10]])
    auth = {"X-API-Key": keys["admin"]}
    with TestClient(create_app(str(home), db)) as client:
        for body in ({"dry_run": True, "dryrun": True}, {"dry_run": "yes"}, {"reason": 3}, [1]):
            refused = client.post("/v1/refresh", json=body, headers=auth)
            assert refused.status_code == 422 and refused.json()["error"] == "invalid_request", (body, refused.text)
        assert client.get("/v1/status", headers=auth).json()["queued"] == 0  # a refused request queues nothing
        dry = client.post("/v1/refresh", json={"dry_run": True, "reason": "try the new loss"}, headers=auth)
        real = client.post("/v1/refresh", headers=auth)  # no body: a real refresh, as before
        assert dry.status_code == real.status_code == 202, (dry.text, real.text)
        assert (dry.json()["dry_run"], real.json()["dry_run"]) == (True, False)
        assert dry.json()["reason"] == "try the new loss"
        dry_job, real_job = _wait_for_jobs(client, auth, [dry.json()["id"], real.json()["id"]])
        versions = client.get("/v1/versions", headers=auth).json()
    assert dry_job["dry_run"] and dry_job["status"] == "succeeded", dry_job
    assert dry_job["result"]["status"] == "dry-run" and dry_job["version"] is None
    assert dry_job["result"]["metrics"]["candidate"]["overall"]["probes"] > 0  # it was evaluated
    assert not real_job["dry_run"] and real_job["status"] in ("succeeded", "rejected"), real_job
    assert "covered_by" not in real_job["result"] and real_job["result"]["status"] in ("promoted", "rejected")
    # The real refresh stored its candidate; the dry run stored none.
    assert [v["number"] for v in versions] == [1, real_job["version"]]


# -- several probes in one request -----------------------------------------------------


def test_identify_batch_answers_each_file_in_its_slot(tmp_path, by_speaker):
    """Answers in order; a bad file carries its error in its own slot; the count of files
    and ``top`` are bounded as configured; nothing is stored."""
    from fastapi.testclient import TestClient

    home, db, keys = make_home(tmp_path, config="[service]\nmax_top = 2\nmax_batch_files = 3\n")
    voices = by_speaker("vctk-4")
    a, b = sorted(voices)[:2]
    with Engine.open(home=home, db=db) as eng:
        eng.enroll_many([(s, p, None) for s, paths in voices.items() for p in paths[:3]])
    with Store(db) as store:
        counts = store.counts()
    files = [("file", ("a.flac", voices[a][5].read_bytes())), ("file", ("junk.wav", b"RIFF junk")),
             ("file", ("b.flac", voices[b][5].read_bytes()))]
    auth = {"X-API-Key": keys["query"]}
    with TestClient(create_app(str(home), db, background=False)) as client:
        answered = client.post("/v1/identify/batch", files=files, params={"top": 2}, headers=auth)
        assert answered.status_code == 200, answered.text
        slots = answered.json()
        assert [(s["file"], s["ok"]) for s in slots] == [("a.flac", True), ("junk.wav", False), ("b.flac", True)]
        assert [s["result"]["candidates"][0]["speaker"] for s in slots if s["ok"]] == [a, b]
        assert all(len(s["result"]["candidates"]) == 2 for s in slots if s["ok"])
        assert slots[1]["error"] == "undecodable_audio" and slots[1]["message"] and slots[1]["result"] is None
        single = client.post("/v1/identify", content=voices[a][5].read_bytes(), params={"top": 2},
                             headers={**auth, "Content-Type": "audio/flac"}).json()
        assert slots[0]["result"]["candidates"] == single["candidates"]  # the same answer as one call
        too_many = client.post("/v1/identify/batch", files=files + files[:1], headers=auth)
        assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_files"
        assert client.post("/v1/identify/batch", files=files, params={"top": 3}, headers=auth).status_code == 422
        raw = client.post("/v1/identify/batch", content=files[0][1][1], headers={**auth, "Content-Type": "audio/flac"})
        assert raw.status_code == 415
        assert client.post("/v1/identify/batch", data={"file": "not a file"}, headers=auth).status_code in (400, 415)
        empty = client.post("/v1/identify/batch", files=[("other", ("a.flac", b"x"))], headers=auth)
        assert empty.status_code == 400 and empty.json()["error"] == "invalid_input"
    with Store(db) as store:
        assert store.counts() == counts
