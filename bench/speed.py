"""Speed on this machine: embedding, enrollment, identification, refresh and rollback,
with the original Resemblyzer package measured side by side in the same run.

    .venv/bin/python bench/speed.py [--files 300] [--postgres URL]

* RTF (compute seconds per second of audio) of the embedder alone, for 1 s, 3 s and
  10 s cuts of real speech, one utterance at a time and batched; on the CPU, and on
  CUDA too when a GPU is present.
* End-to-end enrollment: a CSV of speechocean762-train files streamed through
  ``voiceprint stream`` in-process (decode, resample, VAD, embed, commit to SQLite;
  also PostgreSQL with --postgres). Utterances per second including every commit.
* Enrollment latency: single ``Engine.enroll`` calls, p50 / p99 (SQLite; PostgreSQL
  with --postgres).
* Identification latency, p50 / p99: ``Engine.identify`` end to end with the
  speechocean speakers enrolled; and the 1:N search alone against 1e3, 1e4 and 1e5
  SYNTHETIC centroids (random unit vectors; no data set here has that many speakers).
* Refresh seconds per training step, re-embedding throughput and rollback time, on the
  enrolled files.
* Resemblyzer end to end on the same files: ``preprocess_wav`` + ``embed_utterance``
  (what its README shows), after a warm-up on other files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Resemblyzer, read_manifest, write_result  # noqa: E402

from voiceprint import cli  # noqa: E402
from voiceprint.engine.embedder import Embedder  # noqa: E402
from voiceprint.engine.encoders import create_encoder  # noqa: E402

WARMUP = 20


def rtf(files: list[Path], device: str = "cpu") -> dict:
    """Embedder real-time factor on cuts of real speech (audio already decoded)."""
    embedder = Embedder(create_encoder("ge2e-lstm", pretrained=True), device=device)
    speech = np.concatenate([sf.read(f, dtype="float32")[0] for f in files])
    out = {}
    for seconds in (1, 3, 10):
        n = seconds * 16000
        cuts = [speech[i * n : (i + 1) * n] for i in range(min(32, len(speech) // n))]
        embedder.embed(cuts[:2])  # warm-up
        start = time.perf_counter()
        for cut in cuts:
            embedder.embed([cut])
        single = (time.perf_counter() - start) / (len(cuts) * seconds)
        start = time.perf_counter()
        embedder.embed(cuts)
        batched = (time.perf_counter() - start) / (len(cuts) * seconds)
        out[f"{seconds}s"] = {"one_at_a_time": round(single, 5), f"batch_of_{len(cuts)}": round(batched, 5)}
    return out


def voiceprint_enroll(items, db: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        url = db or f"sqlite:///{home / 'voiceprint.db'}"
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            cli.main(["--home", str(home), "--db", url, "init"])
        manifest = Path(tmp) / "rows.csv"
        warm, timed = items[:WARMUP], items[WARMUP:]
        for rows, name in ((warm, "warm.csv"), (timed, "rows.csv")):
            (Path(tmp) / name).write_text("speaker,path\n" + "".join(f"{it.speaker},{it.path}\n" for it in rows))
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(io.StringIO()):
            cli.main(["--home", str(home), "--db", url, "stream", str(Path(tmp) / "warm.csv")])
            start = time.perf_counter()
            code = cli.main(["--home", str(home), "--db", url, "--json", "stream", str(manifest)])
            elapsed = time.perf_counter() - start
        acks = [json.loads(line) for line in quiet.getvalue().splitlines() if line.startswith('{"row"')][-len(timed):]
        enrolled = sum(a["ok"] for a in acks)
        if db:  # leave the shared database as we found it
            from voiceprint.storage import Store

            with Store(url) as store:
                store.schema.downgrade("base")
    return {
        "db": "postgresql" if db else "sqlite",
        "utterances": len(timed),
        "enrolled": enrolled,
        "rejected_by_quality_checks": len(timed) - enrolled,
        "exit_code": code,
        "seconds": round(elapsed, 3),
        "utterances_per_s": round(len(timed) / elapsed, 2),
        "audio_seconds_per_s": round(sum(it.duration_s for it in timed) / elapsed, 1),
    }


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def engine_latencies(items, db: str | None, refresh_steps: int) -> dict:
    """Single enrollments, then identify, refresh and rollback on what was enrolled."""
    from voiceprint.engine import Engine
    from voiceprint.engine.errors import AudioError

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(f"[refresh]\nsteps = {refresh_steps}\n")
        out: dict = {"db": "postgresql" if db else "sqlite"}
        with Engine.init(home=home, db=db) as eng:
            for item in items[:WARMUP]:
                _enroll_quietly(eng, item)
            times = []
            for item in items[WARMUP:]:
                start = time.perf_counter()
                if _enroll_quietly(eng, item):
                    times.append(time.perf_counter() - start)
            out["enroll_one"] = percentiles(times)
            times = []
            for item in items[:105]:
                start = time.perf_counter()
                try:
                    eng.identify(item.path)
                except AudioError:  # a probe with too little speech: not an identification
                    continue
                times.append(time.perf_counter() - start)
            times = times[5:]  # the first calls warm up caches
            out["identify_end_to_end"] = {"speakers": len(eng.speakers()), **percentiles(times)}
            report = eng.refresh()
            out["refresh"] = {
                "status": report.status,
                "utterances": report.metrics["data"]["utterances"],
                "steps": report.metrics["training"]["steps"],
                "seconds_per_step": report.metrics["training"]["seconds_per_step"],
                "reembed_utterances_per_s": report.timings["embed_utterances_per_s"],
                "wall_s": round(sum(report.timings.get(k, 0.0) for k in ("load_s", "train_s", "embed_s", "store_s", "promote_s")), 2),
            }
            if report.status == "promoted":
                start = time.perf_counter()
                moved = eng.rollback(1, reason="benchmark")
                out["rollback"] = {"utterances": out["refresh"]["utterances"], "embedded": moved["embedded"],
                                   "seconds": round(time.perf_counter() - start, 3)}
        if db:
            from voiceprint.storage import Store

            with Store(db) as store:
                store.schema.downgrade("base")
    return out


def _enroll_quietly(eng, item) -> bool:
    from voiceprint.engine.errors import AudioError

    try:
        eng.enroll(item.speaker, item.path)
        return True
    except AudioError:
        return False


def search_latency(probe: np.ndarray) -> list[dict]:
    """The 1:N search alone against synthetic centroids (random unit vectors)."""
    from voiceprint.engine.index import CentroidIndex

    rng = np.random.default_rng(0)
    out = []
    for n in (1_000, 10_000, 100_000):
        centroids = rng.standard_normal((n, probe.size)).astype(np.float32)
        index = CentroidIndex([f"s{i}" for i in range(n)], centroids)
        for _ in range(5):
            index.search(probe, 5)
        times = []
        for _ in range(200):
            start = time.perf_counter()
            index.search(probe, 5)
            times.append(time.perf_counter() - start)
        out.append({"speakers": n, "synthetic": True, **percentiles(times)})
    return out


def resemblyzer_enroll(items) -> dict:
    model = Resemblyzer()
    for item in items[:WARMUP]:
        model.embed_file(item.path)
    timed = items[WARMUP:]
    start = time.perf_counter()
    for item in timed:
        model.embed_file(item.path)
    elapsed = time.perf_counter() - start
    return {
        "utterances": len(timed),
        "seconds": round(elapsed, 3),
        "utterances_per_s": round(len(timed) / elapsed, 2),
        "audio_seconds_per_s": round(sum(it.duration_s for it in timed) / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="speechocean762-train files to enroll")
    parser.add_argument("--postgres", help="also measure enrollment into this (empty) PostgreSQL database")
    parser.add_argument("--refresh-steps", type=int, default=30, help="training steps of the timed refresh (default 30)")
    args = parser.parse_args()
    items = read_manifest("speechocean762-train")[: args.files + WARMUP]
    import torch

    result = {"embedding_rtf_cpu": rtf([it.path for it in items[:60]])}
    if torch.cuda.is_available():
        result["embedding_rtf_cuda"] = rtf([it.path for it in items[:60]], device="cuda")
    runs = [voiceprint_enroll(items, None)]
    if args.postgres:
        runs.append(voiceprint_enroll(items, args.postgres))
    result["voiceprint_enroll"] = runs
    result["latency"] = [engine_latencies(items, None, args.refresh_steps)]
    if args.postgres:
        result["latency"].append(engine_latencies(items, args.postgres, args.refresh_steps))
    probe = Embedder(create_encoder("ge2e-lstm", pretrained=True)).embed([sf.read(items[0].path, dtype="float32")[0]])[0]
    result["search_only"] = search_latency(probe)
    result["resemblyzer_end_to_end"] = resemblyzer_enroll(items)
    result["speedup_vs_resemblyzer_sqlite"] = round(
        runs[0]["utterances_per_s"] / result["resemblyzer_end_to_end"]["utterances_per_s"], 2
    )
    path = write_result("speed", result)
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
