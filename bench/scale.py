"""Identification at scale: the 1:N index held per process and kept current from the
database's centroid change feed, with SYNTHETIC profiles (random unit vectors; no data
set here has that many speakers) inserted into the real store.

    .venv/bin/python bench/scale.py [--sizes 1000,10000,100000] [--postgres URL] [--out scale]

For each gallery size, in a fresh home (SQLite, or an empty PostgreSQL database):

* build: a process's first identify builds its index from every centroid (timed), and
  what that costs in process memory (RSS);
* identify latency, p50 / p99: search, normalisation and decision for one probe
  embedding (``Recognizer.identify_embedding``, cosine: the synthetic profiles have no
  utterances, hence no AS-norm cohort), with the index current; beside it, the full read
  of every centroid that each identify paid before the change feed;
* visibility: another engine on the same database enrolls a new profile; the time until
  this one's identify, asked every 5 ms, ranks it first (``[index] refresh_s`` = 0.5 s, the
  write landing anywhere in it), p50 / max of 10.

The embedding of a real 3 s probe is timed once, apart. Profiles are inserted in bulk
through the store's own write sessions (so the feed stamps them), not one enrollment at a
time: a million enrollments would take hours and measure the inserts, not the index.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, write_result  # noqa: E402

from voiceprint.engine import Engine  # noqa: E402
from voiceprint.storage import feed, models as m  # noqa: E402
from voiceprint.storage.db import now  # noqa: E402
from voiceprint.storage.vectors import f32, f64  # noqa: E402

DIM = 256
CHUNK = 10_000  # profiles per insert transaction


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def insert_profiles(eng: Engine, version: int, start: int, vectors: np.ndarray) -> None:
    """Speakers and their one-vector centroids, in bulk, through the store's write sessions."""
    database = eng.store._db  # the bench's one reach past the repositories: a bulk insert
    for lo in range(0, len(vectors), CHUNK):
        block = vectors[lo : lo + CHUNK]
        with database.session("insert synthetic profiles", write=True) as s:
            at = now()
            first = start + lo
            s.execute(insert(m.Speaker), [{"name": f"synthetic-{first + i:07d}", "created_at": at} for i in range(len(block))])
            ids = dict(s.execute(
                m.Speaker.__table__.select().with_only_columns(m.Speaker.name, m.Speaker.id)
                .where(m.Speaker.name.in_([f"synthetic-{first + i:07d}" for i in range(len(block))]))
            ).all())
            rows = []
            for i, vector in enumerate(block):
                speaker_id = ids[f"synthetic-{first + i:07d}"]
                rows.append({"speaker_id": speaker_id, "version": version, "dim": DIM, "count": 1,
                             "sum": f64(vector.astype(np.float64)), "mean": f32(vector), "updated_at": at})
                feed.touched(s, version, speaker_id)
            s.execute(insert(m.Centroid), rows)


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def one_size(n: int, db: str | None, probes: np.ndarray) -> dict:
    rng = np.random.default_rng(n)
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / name for name in ("a", "b")]
        for home in homes:
            home.mkdir()
            (home / "config.toml").write_text("[index]\nrefresh_s = 0.5\n")
        url = db or f"sqlite:///{homes[0] / 'voiceprint.db'}"
        with Engine.init(home=homes[0], db=url) as writer:
            version = writer.active_version()
            start = time.perf_counter()
            insert_profiles(writer, version.number, 0, unit_rows(rng, n))
            insert_s = time.perf_counter() - start
            (homes[1] / "checkpoints").symlink_to(homes[0] / "checkpoints")  # checkpoints are still files
            with Engine.open(home=homes[1], db=url) as reader:
                before = rss_mib()
                start = time.perf_counter()
                reader.recognizer.gallery(version.number)
                build_s = time.perf_counter() - start
                grown = rss_mib() - before
                for probe in probes[:5]:
                    reader.recognizer.identify_embedding(probe, version)  # warm-up: the index is built here
                times = []
                for probe in probes:
                    start = time.perf_counter()
                    reader.recognizer.identify_embedding(probe, version)
                    times.append(time.perf_counter() - start)
                full_read = []
                for _ in range(3):
                    start = time.perf_counter()
                    reader.store.profiles.centroid_matrix(version.number)
                    full_read.append(time.perf_counter() - start)
                seen = []
                for k in range(10):
                    vector = unit_rows(rng, 1)
                    time.sleep(rng.uniform(0, 0.5))  # the write lands anywhere in the reader's refresh_s
                    start = time.perf_counter()
                    insert_profiles(writer, version.number, n + k, vector)
                    while reader.recognizer.identify_embedding(vector[0], version).candidates[0].speaker != f"synthetic-{n + k:07d}":
                        time.sleep(0.005)
                    seen.append(time.perf_counter() - start)
        if db:
            from voiceprint.storage import Store

            with Store(db) as store:
                store.schema.downgrade("base")
    return {
        "speakers": n,
        "synthetic": True,
        "backend": "cosine",
        "insert_s": round(insert_s, 2),
        "index_build_s": round(build_s, 3),
        "index_rss_mib": round(grown, 1),
        "identify": percentiles(times),
        "full_centroid_read_s": round(float(np.median(full_read)), 3),
        "visible_elsewhere_s": {"p50": round(float(np.median(seen)), 3), "max": round(max(seen), 3)},
    }


def probe_embedding_ms() -> float:
    from voiceprint.engine import audio
    from voiceprint.engine.config import Config
    from voiceprint.engine.embedder import Embedder
    from voiceprint.engine.encoders import create_encoder

    path = sorted((data_dir() / "librispeech-test-other").rglob("*.flac"))[0]
    speech = audio.load(path, Config().audio).samples[: 3 * 16000]
    embedder = Embedder(create_encoder("ge2e-lstm", pretrained=True), device="cpu")
    embedder.embed([speech])
    start = time.perf_counter()
    for _ in range(10):
        embedder.embed([speech])
    return round((time.perf_counter() - start) / 10 * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="gallery sizes, comma-separated (default 1000,10000,100000)")
    parser.add_argument("--postgres", help="an empty PostgreSQL database to use instead of SQLite")
    parser.add_argument("--out", default="scale", help="result name under bench/results/")
    args = parser.parse_args()
    probes = unit_rows(np.random.default_rng(1), 200)
    rows = [one_size(int(n), args.postgres, probes) for n in args.sizes.split(",")]
    result = {"db": "postgresql" if args.postgres else "sqlite", "probe_embedding_3s_ms": probe_embedding_ms(), "sizes": rows}
    path = write_result(args.out, result)
    print(f"{'speakers':>9} {'build':>8} {'RSS':>8} {'identify p50/p99':>18} {'full read (before)':>19} {'seen elsewhere p50/max':>23}")
    for r in rows:
        print(f"{r['speakers']:>9} {r['index_build_s']:>7.2f}s {r['index_rss_mib']:>6.0f}Mi "
              f"{r['identify']['p50_ms']:>8.2f}/{r['identify']['p99_ms']:<7.2f}ms {r['full_centroid_read_s']:>17.3f}s "
              f"{r['visible_elsewhere_s']['p50']:>10.2f}/{r['visible_elsewhere_s']['max']:.2f}s")
    print(f"probe embedding (3 s of speech, CPU): {result['probe_embedding_3s_ms']} ms; {path}")


if __name__ == "__main__":
    main()
