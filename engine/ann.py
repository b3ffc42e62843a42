"""Approximate nearest-neighbour search for large galleries: FAISS's inverted-file index.

Above ``[index] approximate_from`` speakers an exact matrix product reads every profile
for each probe (1 GiB at a million speakers, ~30 ms on two cores). An inverted-file
index (``faiss.IndexIVFScalarQuantizer``, inner product on unit rows held as 8-bit
codes) clusters the profiles into ``2 * sqrt(N)`` lists and scans only the ``NPROBE``
lists nearest the probe; the candidates it returns are rescored exactly by the caller. Rows are added and removed in
place by speaker id (IVF lists keep their own ids), so a live gallery never waits for a
rebuild. ``bench/ann.py`` measured it against usearch's HNSW (README, "The 1:N index").

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> rows = rng.standard_normal((2000, 16)).astype(np.float32)
>>> rows /= np.linalg.norm(rows, axis=1, keepdims=True)
>>> ann = ApproximateSearch(np.arange(2000), rows)
>>> int(ann.search(rows[5], 4)[0]), len(ann)
(5, 2000)
>>> ann.remove([5]); int(ann.search(rows[5], 4)[0]) != 5
True
"""

from __future__ import annotations

import faiss
import numpy as np

LISTS_PER_ROOT = 2  # inverted lists per square root of the gallery size: 2,000 at a million
NPROBE = 192  # lists scanned per probe (10 % at a million): recall@1 0.994 at 128 there (bench/ann.py)
TRAINING_PER_LIST = 50  # k-means sees this many profiles per list (FAISS asks for 39 at least)


class ApproximateSearch:
    """An inverted-file index over unit rows keyed by speaker id. Not thread-safe: a
    search must not run beside a change (the owning index locks)."""

    def __init__(self, keys, vectors, *, threads: int = 2) -> None:
        """``vectors``: the unit rows ``[N, D]``, or consecutive blocks of them (added one at
        a time, never copied into one array)."""
        blocks = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
        starts = np.cumsum([0] + [len(b) for b in blocks])
        keys = np.asarray(keys, dtype=np.int64)
        n, dim = int(starts[-1]), blocks[0].shape[1]
        lists = max(1, min(int(LISTS_PER_ROOT * np.sqrt(n)), n // 39))  # FAISS wants 39 training rows per list
        # Rows held as 8-bit codes, a quarter of float32: a scan reads less memory, and
        # the caller rescores the candidates on the float32 rows it keeps anyway.
        self._index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        sample = np.sort(np.random.default_rng(0).permutation(n)[: TRAINING_PER_LIST * lists])
        training = np.concatenate([
            block[sample[(sample >= lo) & (sample < hi)] - lo] for block, lo, hi in zip(blocks, starts, starts[1:])
        ])
        # OpenMP's thread count belongs to the calling thread: a build (in the background)
        # uses the cores, a search runs on its request's one thread.
        faiss.omp_set_num_threads(threads)
        self._index.train(np.ascontiguousarray(training, dtype=np.float32))
        for block, lo, hi in zip(blocks, starts, starts[1:]):
            self._index.add_with_ids(np.ascontiguousarray(block, dtype=np.float32), keys[lo:hi])
        self._index.nprobe = min(NPROBE, lists)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        """Memory of the lists: each row's 8-bit code and 8-byte id, and the list centroids."""
        return len(self) * (self._index.code_size + 8) + self._index.nlist * self._index.d * 4

    def put(self, keys, vectors: np.ndarray) -> None:
        """Add rows, or move rows already held (removed first: IVF keeps duplicates)."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys):
            self._index.remove_ids(keys)
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)

    def remove(self, keys) -> None:
        keys = np.asarray(list(keys), dtype=np.int64)
        if len(keys):
            self._index.remove_ids(keys)

    def search(self, probe: np.ndarray, n: int) -> np.ndarray:
        """Keys of (about) the ``n`` rows nearest ``probe``, best first; fewer if fewer are found."""
        faiss.omp_set_num_threads(1)
        _, keys = self._index.search(np.ascontiguousarray(probe, dtype=np.float32)[None, :], n)
        keys = keys[0]
        return keys[keys >= 0]
