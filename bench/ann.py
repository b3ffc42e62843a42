"""Which approximate-nearest-neighbour library the 1:N index uses above ``[index]
approximate_from``: FAISS (``faiss-cpu``) or ``usearch``, measured side by side on one gallery.

    .venv/bin/pip install usearch    # the rival, not a dependency of voiceprint
    .venv/bin/python bench/ann.py [--sizes 100000,1000000] [--probes 2000] [--out ann]

The gallery is SYNTHETIC (no data set here has enough speakers): speakers drawn from a
Gaussian fitted to the encoder's real embeddings (``common.SyntheticSpeakers``), centred
on the gallery's mean and scaled to unit length as the engine's index holds them. Genuine
probes are a gallery speaker plus a within-speaker deviation; impostor probes are speakers
drawn from the same distribution who are not enrolled. For each library and size: build time, one in-place update (remove + add of
100 rows), query latency p50 / p99 for one probe (one thread, as a request is served),
recall@1 against exact search for genuine and impostor probes, and memory.

The two candidates: the engine's own index (:mod:`voiceprint.engine.ann`: FAISS inverted
lists over 8-bit codes, ``--nprobe`` lists searched) and usearch's HNSW (``connectivity``
16, ``--expansion`` as its ``expansion_search``, float32). Each returns ``--candidates``
rows, rescored exactly as the engine does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SyntheticSpeakers, write_result  # noqa: E402

DIM = 256
NPROBE, EXPANSION, CANDIDATES = 128, 128, 32  # set from the command line


def unit(rows: np.ndarray, centre: np.ndarray) -> np.ndarray:
    rows = rows - centre
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class Faiss:
    """The engine's own approximate index (``voiceprint.engine.ann``), as it runs there."""

    name = "faiss IVF-SQ8"

    def __init__(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        from voiceprint.engine import ann

        ann.NPROBE = NPROBE
        self.index = ann.ApproximateSearch(keys, vectors)

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.put(keys, vectors)

    def search(self, probe: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(probe, k)


class USearch:
    name = "usearch HNSW"

    def __init__(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        from usearch.index import Index

        self.index = Index(ndim=DIM, metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=EXPANSION)
        self.index.add(keys, vectors, threads=2)

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.remove(keys)
        self.index.add(keys, vectors, threads=1)

    def search(self, probe: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(probe, k, threads=1).keys


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(kind, n: int, probes: int) -> dict:
    voices = SyntheticSpeakers(seed=n)
    raw = voices.speakers(n)
    centre = raw.mean(axis=0)
    vectors = unit(raw, centre)
    keys = np.arange(n, dtype=np.int64)
    rng = voices.rng
    before = rss_mib()
    start = time.perf_counter()
    index = kind(vectors, keys)
    build_s = time.perf_counter() - start
    grown = rss_mib() - before
    moved = rng.choice(n, 100, replace=False)
    raw[moved] = voices.speakers(100)
    vectors[moved] = unit(raw[moved], centre)
    start = time.perf_counter()
    index.update(keys[moved], vectors[moved])
    update_ms = (time.perf_counter() - start) * 1000
    out = {"library": kind.name, "speakers": n, "build_s": round(build_s, 2), "update_100_ms": round(update_ms, 2),
           "memory_mib": round(grown, 1)}
    chosen = rng.choice(n, probes)
    batches = (("genuine", unit(voices.probes(raw[chosen]), centre)), ("impostor", unit(voices.speakers(probes), centre)))
    for label, batch in batches:
        exact = np.argmax(batch @ vectors.T, axis=1)
        found, times = [], []
        for probe in batch:
            start = time.perf_counter()
            top = index.search(probe, CANDIDATES)
            times.append(time.perf_counter() - start)
            # Rescored exactly, as the engine does: recall@1 is whether exact's best is in the candidates.
            found.append(top[np.argmax(vectors[top[top >= 0]] @ probe)] if (top >= 0).any() else -1)
        ms = np.array(times) * 1000
        out[label] = {"recall_at_1": round(float(np.mean(np.array(found) == exact)), 4),
                      "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}
    return out


def main() -> None:
    global NPROBE, EXPANSION, CANDIDATES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="gallery sizes, comma-separated")
    parser.add_argument("--probes", type=int, default=2000, help="probes of each kind per size")
    parser.add_argument("--libraries", default="faiss,usearch", help="faiss, usearch or both")
    parser.add_argument("--out", default="ann", help="name of the JSON result under bench/results/")
    parser.add_argument("--nprobe", type=int, default=NPROBE, help="faiss: inverted lists searched per probe")
    parser.add_argument("--expansion", type=int, default=EXPANSION, help="usearch: expansion_search")
    parser.add_argument("--candidates", type=int, default=CANDIDATES, help="rows each search returns for exact rescoring")
    args = parser.parse_args()
    NPROBE, EXPANSION, CANDIDATES = args.nprobe, args.expansion, args.candidates
    kinds = {"faiss": Faiss, "usearch": USearch}
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for name in args.libraries.split(","):
            row = measure(kinds[name], n, args.probes)
            rows.append(row)
            print(f"{row['library']:14s} {n:>9,d}  build {row['build_s']:7.1f} s  update(100) {row['update_100_ms']:7.1f} ms  "
                  f"mem {row['memory_mib']:7.0f} MiB  genuine r@1 {row['genuine']['recall_at_1']:.4f} "
                  f"p50/p99 {row['genuine']['p50_ms']:.2f}/{row['genuine']['p99_ms']:.2f} ms  "
                  f"impostor r@1 {row['impostor']['recall_at_1']:.4f}", flush=True)
    write_result(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
