"""Load test of a running `voiceprint serve` on loopback: enroll and identify requests
per second and their latency, on SQLite and on PostgreSQL.

    .venv/bin/python bench/service_load.py [--clients 1 8] [--enrollments 400] [--identifies 400]
                                            [--streams 16] [--max-seconds 300] [--postgres URL] [--out NAME]

For each database and each client count a fresh home is made, one server process
started (port chosen by the OS), and that many threads send requests over keep-alive
connections: first
``--enrollments`` enrollments of speechocean762-train files (each speaker's files dealt
over several clients), then ``--identifies`` identify calls on those files, then
``--streams`` live identify sessions over WebSocket (enrolled files spread over the
speakers, sent in real time; latency from the end of the audio to the final decision). The first two
phases stop early at ``--max-seconds``. Latency is the client's wall time per request. After
each server stops, the same identify calls are timed in-process (``Engine.identify``,
one at a time), so the cost of the HTTP layer can be read off.
PostgreSQL runs in a database created for the run and dropped after it (default URL:
the local test server); ``--postgres ""`` skips it. Writes bench/results/service.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, read_manifest, write_result  # noqa: E402

from voiceprint.engine import Engine  # noqa: E402

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def start_server(home: Path, db: str) -> tuple[subprocess.Popen, str]:
    log = open(home.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voiceprint.cli", "--home", str(home), "--db", db, "serve", "--port", "0"],
        cwd=ROOT, stdout=log, stderr=log,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.findall(r"http://127\.0\.0\.1:(\d+)", (home.parent / "server.log").read_text())
        if found:
            url = f"http://127.0.0.1:{found[-1]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{(home.parent / 'server.log').read_text()}")


def phase(url: str, key: str, requests: list[tuple[str, Path]], clients: int, max_seconds: float) -> dict:
    """Send ``(route, file)`` requests from ``clients`` threads; latency and throughput."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + max_seconds

    def client(share: list[tuple[str, Path]]) -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "audio/flac"}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as http:
            for route, path in share:
                if time.perf_counter() > deadline:
                    return
                body = path.read_bytes()
                t0 = time.perf_counter()
                status = http.post(route, content=body).status_code
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(requests[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def stream_phase(url: str, key: str, paths: list[Path], clients: int) -> dict:
    """Live identify sessions from ``clients`` threads, each file sent in 0.1 s frames at
    real time (as a microphone would); the latency is from the last frame (the end of
    speech) to the final decision."""
    latencies: list[float] = []
    partials: list[int] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    ws_url = url.replace("http://", "ws://") + "/v1/stream/identify"

    def client(share: list[Path]) -> None:
        for path in share:
            samples, rate = sf.read(path, dtype="int16")
            data, step = samples.astype("<i2").tobytes(), int(rate * 0.1) * 2
            with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=60) as ws:
                ws.send(json.dumps({"type": "start", "rate": rate}))
                started = time.perf_counter()
                for sent in range(0, len(data), step):
                    ws.send(data[sent:sent + step])
                    time.sleep(max(0.0, started + (sent + step) / 2 / rate - time.perf_counter()))
                ended = time.perf_counter()
                ws.send(json.dumps({"type": "end"}))
                events = []
                with contextlib.suppress(ConnectionClosed):
                    for message in ws:
                        events.append(json.loads(message))
                took = time.perf_counter() - ended
            with lock:
                codes[ws.close_code] = codes.get(ws.close_code, 0) + 1
                if events and events[-1]["event"] == "result":
                    latencies.append(took)
                    partials.append(sum(e["event"] == "partial" for e in events))

    threads = [threading.Thread(target=client, args=(paths[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000
    return {
        "streams": len(latencies),
        "end_to_decision_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "end_to_decision_p99_ms": round(float(np.percentile(ms, 99)), 1),
        "partials_per_stream": round(float(np.mean(partials)), 2),
        "close_codes": {str(k): v for k, v in sorted(codes.items())},
    }


def run(db: str | None, clients: int, args: argparse.Namespace, items) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        db = db or f"sqlite:///{home / 'voiceprint.db'}"
        with Engine.init(home=home, db=db) as eng:
            key = eng.create_key("admin", by="bench")[1]
        proc, url = start_server(home, db)
        try:
            chosen = items[: args.enrollments]
            # Dealt round-robin, so clients enroll the same speakers at the same time.
            enroll = [(f"/v1/speakers/{it.speaker}/utterances", it.path) for it in chosen]
            identify = [("/v1/identify", chosen[i % len(chosen)].path) for i in range(args.identifies)]
            result = {
                "clients": clients,
                "enroll": phase(url, key, enroll, clients, args.max_seconds),
                "identify": phase(url, key, identify, clients, args.max_seconds),
            }
            if args.streams:  # enrolled files spread over the speakers, as the identify phase uses
                paths = [it.path for it in chosen[:: max(1, len(chosen) // args.streams)][: args.streams]]
                result["live_identify"] = stream_phase(url, key, paths, clients)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        # The same identify calls in-process, one at a time: what HTTP adds to a request.
        with Engine.open(home=home, db=db) as eng:
            took = []
            for item in chosen[:100]:
                t0 = time.perf_counter()
                try:
                    eng.identify(item.path)
                except Exception:
                    continue
                took.append(time.perf_counter() - t0)
        result["in_process_identify_p50_ms"] = round(float(np.percentile(took, 50)) * 1000, 1)
        result["speech_s_per_file"] = round(float(np.mean([it.duration_s for it in chosen])), 2)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="client counts to run (default 1 8)")
    parser.add_argument("--enrollments", type=int, default=400)
    parser.add_argument("--identifies", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per phase")
    parser.add_argument("--postgres", default=DEFAULT_PG, help='admin URL of a PostgreSQL server; "" skips it')
    parser.add_argument("--streams", type=int, default=16, help="live identify sessions per run, in real time (0: none)")
    parser.add_argument("--out", default="service", help="result name under bench/results/ (default service)")
    args = parser.parse_args()
    items = read_manifest("speechocean762-train")
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "postgres"}, "sqlite": [], "postgresql": []}
    for clients in args.clients:
        results["sqlite"].append(run(None, clients, args, items))
        print("sqlite", results["sqlite"][-1], flush=True)
    if args.postgres:
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        for clients in args.clients:
            name = f"vp_bench_{uuid.uuid4().hex[:8]}"
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            try:
                url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
                results["postgresql"].append(run(url, clients, args, items))
                print("postgresql", results["postgresql"][-1], flush=True)
            finally:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    print(write_result(args.out, results))


if __name__ == "__main__":
    main()
