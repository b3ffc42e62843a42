"""Identification at scale: the 1:N index held per process, kept current from the
database's centroid change feed and changed in place, exact below ``[index]
approximate_from`` speakers and approximate (FAISS) from there, with SYNTHETIC profiles
inserted into the real store.

    .venv/bin/python bench/scale.py [--sizes 1000,10000,100000,1000000] [--postgres URL] [--out scale]

No data set here has that many speakers: profiles are drawn from a Gaussian fitted to
the pretrained encoder's real embeddings of speechocean762 (``common.SyntheticSpeakers``),
and probes are a profile plus a real-sized within-speaker deviation. The first
``COHORT_SPEAKERS`` speakers also get ``UTTERANCES`` stored utterance embeddings each
(drawn the same way), which give AS-norm its cohort and the calibration its trials.
Profiles are inserted in bulk through the store's own write sessions (so the feed stamps
them), not one enrollment at a time: a million enrollments would take hours and measure
the inserts, not the index.

For each gallery size, in a fresh home (SQLite, or an empty PostgreSQL database), with a
second engine on the same database answering:

* build: that engine's first identify reads every centroid and builds its index (timed,
  with the process memory it adds); with asnorm+calibrated this includes every profile's
  cohort statistics, timed apart as well;
* identify latency, p50 / p99: search, normalisation and decision for one probe embedding
  (``Recognizer.identify_embedding``), for cosine and for asnorm+calibrated;
* recall@1 of the index against exact search, on the synthetic genuine probes and (as
  ``voiceprint index status`` reports it) on stored utterances;
* calibration: ``voiceprint calibrate``'s fit, timed;
* visibility: the writer inserts a new profile; the time until the other engine's
  identify, asked every 5 ms, ranks it first (``[index] refresh_s`` = 0.5 s, the write
  landing anywhere in it), p50 / max of 20.

The embedding of a real 3 s probe is timed once, apart.
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
from common import SyntheticSpeakers, data_dir, write_result  # noqa: E402

from voiceprint.engine import Engine  # noqa: E402
from voiceprint.storage import feed, models as m  # noqa: E402
from voiceprint.storage.db import now  # noqa: E402
from voiceprint.storage.vectors import f32, f64  # noqa: E402

DIM = 256
CHUNK = 10_000  # profiles per insert transaction
COHORT_SPEAKERS, UTTERANCES = 2500, 2  # speakers with stored utterances: a 5,000-row cohort, as [scoring] cohort_size


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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


def insert_utterances(eng: Engine, version: int, voices: SyntheticSpeakers, centroids: np.ndarray) -> None:
    """Stored utterance embeddings for the first speakers: the AS-norm cohort and the
    calibration's trials."""
    database = eng.store._db
    with database.session("insert synthetic utterances", write=True) as s:
        at = now()
        names = [f"synthetic-{i:07d}" for i in range(len(centroids))]
        ids = dict(s.execute(
            m.Speaker.__table__.select().with_only_columns(m.Speaker.name, m.Speaker.id).where(m.Speaker.name.in_(names))
        ).all())
        for k in range(UTTERANCES):
            vectors = voices.probes(centroids)
            rows = [{"speaker_id": ids[name], "source": "synthetic", "content_sha256": f"{k}{i:063d}", "duration_s": 3.0,
                     "speech_s": 3.0, "quality": {}, "created_at": at} for i, name in enumerate(names)]
            utterance_ids = s.scalars(insert(m.Utterance).returning(m.Utterance.id), rows).all()
            s.execute(insert(m.Embedding), [{"utterance_id": u, "version": version, "vector": f32(v), "created_at": at}
                                            for u, v in zip(utterance_ids, vectors)])


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def answering(home: Path, url: str, backend: str, version, probes: np.ndarray) -> dict:
    """Open an engine on ``home`` deciding with ``backend``; time its first build and its
    identify latency, and measure the recall of its index."""
    (home / "config.toml").write_text(f'[index]\nrefresh_s = 0.5\n[scoring]\nbackend = "{backend}"\n')
    eng = Engine.open(home=home, db=url)
    before = rss_mib()
    start = time.perf_counter()
    served = eng.recognizer.indexes.index(version.number, eng.recognizer.scoring(version.number))
    build_s = time.perf_counter() - start
    grown = rss_mib() - before
    stats_s = None
    if served.scoring.cohort is not None:
        _, names, means, _ = eng.recognizer.indexes.gallery(version.number).snapshot()
        start = time.perf_counter()
        served.scoring.cohort.enrollment_stats(names, served.scoring.centred(means))
        stats_s = round(time.perf_counter() - start, 2)
    for probe in probes[:5]:
        eng.recognizer.identify_embedding(probe, version)
    times = []
    for probe in probes:
        start = time.perf_counter()
        answer = eng.recognizer.identify_embedding(probe, version)
        times.append(time.perf_counter() - start)
    status = eng.index_status()[0]
    return {
        "engine": eng,
        "row": {
            "backend": answer.backend,
            "index_kind": served.index.kind,
            "index_build_s": round(build_s, 2),
            "cohort_stats_s": stats_s,
            "index_rss_mib": round(grown, 1),
            "identify": percentiles(times),
            "recall_at_1_probes": served.index.recall(served.scoring.centred(probes)),
            "recall_at_1_stored": status["recall_at_1"],
        },
    }


def one_size(n: int, db: str | None, probe_count: int) -> dict:
    voices = SyntheticSpeakers(seed=n)
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / name for name in ("writer", "cosine", "calibrated")]
        for home in homes:
            home.mkdir()
            (home / "config.toml").write_text("[index]\nrefresh_s = 0.5\n")
        url = db or f"sqlite:///{homes[0] / 'voiceprint.db'}"
        with Engine.init(home=homes[0], db=url) as writer:
            version = writer.active_version()
            start = time.perf_counter()
            for lo in range(0, n, 100_000):  # drawn in slices: a million rows of float64 at once is 2 GiB
                block = voices.speakers(min(100_000, n - lo))
                insert_profiles(writer, version.number, lo, block)
                if lo == 0:
                    probes = voices.probes(block[voices.rng.choice(len(block), probe_count)])
                    insert_utterances(writer, version.number, voices, block[: min(COHORT_SPEAKERS, len(block))])
            insert_s = time.perf_counter() - start
            for home in homes[1:]:
                (home / "checkpoints").symlink_to(homes[0] / "checkpoints")
            cosine = answering(homes[1], url, "cosine", version, probes)
            reader = cosine.pop("engine")
            seen = []
            for k in range(20):
                vector = voices.speakers(1)
                time.sleep(voices.rng.uniform(0, 0.5))  # the write lands anywhere in the reader's refresh_s
                start = time.perf_counter()
                insert_profiles(writer, version.number, n + k, vector)
                while reader.recognizer.identify_embedding(vector[0], version).candidates[0].speaker != f"synthetic-{n + k:07d}":
                    time.sleep(0.005)
                seen.append(time.perf_counter() - start)
            reader.close()
            start = time.perf_counter()
            writer.calibrate()
            calibrate_s = time.perf_counter() - start
            calibrated = answering(homes[2], url, "asnorm+calibrated", version, probes)
            calibrated.pop("engine").close()
        if db:
            from voiceprint.storage import Store

            with Store(db) as store:
                store.schema.downgrade("base")
    return {
        "speakers": n,
        "synthetic": True,
        "insert_s": round(insert_s, 2),
        "cosine": cosine["row"],
        "asnorm+calibrated": calibrated["row"],
        "calibrate_s": round(calibrate_s, 2),
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
    parser.add_argument("--probes", type=int, default=300, help="probes timed per size and back-end")
    parser.add_argument("--postgres", help="an empty PostgreSQL database to use instead of SQLite")
    parser.add_argument("--out", default="scale", help="result name under bench/results/")
    args = parser.parse_args()
    rows = []
    result = {"db": "postgresql" if args.postgres else "sqlite", "probe_embedding_3s_ms": probe_embedding_ms(), "sizes": rows}
    for n in args.sizes.split(","):
        rows.append(one_size(int(n), args.postgres, args.probes))
        path = write_result(args.out, result)  # after each size: a million takes a while
        print(f"{n} speakers done", flush=True)
    print(f"{'speakers':>9} {'backend':>17} {'kind':>11} {'build':>8} {'stats':>7} {'RSS':>8} {'p50/p99':>14} "
          f"{'recall (probes/stored)':>22}")
    for r in rows:
        for backend in ("cosine", "asnorm+calibrated"):
            b = r[backend]
            stored = "-" if b["recall_at_1_stored"] is None else f"{b['recall_at_1_stored']:.4f}"
            probes = "-" if b["recall_at_1_probes"] is None else f"{b['recall_at_1_probes']:.4f}"
            print(f"{r['speakers']:>9} {b['backend']:>17} {b['index_kind']:>11} {b['index_build_s']:>7.2f}s "
                  f"{b['cohort_stats_s'] if b['cohort_stats_s'] is not None else '-':>6}s {b['index_rss_mib']:>6.0f}Mi "
                  f"{b['identify']['p50_ms']:>6.2f}/{b['identify']['p99_ms']:<6.2f}ms {probes:>10}/{stored:<10}")
        print(f"{'':>9} calibrate {r['calibrate_s']:.2f} s; seen elsewhere p50/max "
              f"{r['visible_elsewhere_s']['p50']:.2f}/{r['visible_elsewhere_s']['max']:.2f} s")
    print(f"probe embedding (3 s of speech, CPU): {result['probe_embedding_3s_ms']} ms; {path}")


if __name__ == "__main__":
    main()
