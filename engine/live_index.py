"""The 1:N index each process holds per model version, kept current from the database's
centroid change feed (:mod:`voiceprint.storage.feed`) instead of read again per query.

A version's :class:`~voiceprint.engine.gallery.Gallery` is built from every centroid on
first use, then brought up to date with only what changed: every ``[index] refresh_s`` by
the recognizer's follower thread (:meth:`LiveIndexes.follow`), so that an answer does not
wait on the database, and at once after this process's own writes. The same changes are written
into the version's :class:`~voiceprint.engine.index.CentroidIndex` in place (each moved
profile's cohort statistics computed for it alone), so one enrollment costs one row.

The index is built again only for a new scoring state (a calibration, an erasure that
changes the cohort or the centre) or a version this process has not served yet. From
``[index] background_from`` speakers that build runs in a background thread, and the
index it replaces keeps answering until it is ready: each answer names the version it
came from, and is scored with that index's own calibration and thresholds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from voiceprint.engine.config import Config
from voiceprint.engine.gallery import Gallery
from voiceprint.engine.index import CentroidIndex
from voiceprint.storage import Store

log = logging.getLogger(__name__)
RECALL_PROBES = 200  # real stored embeddings the approximate index is checked against exact search with
# An answer reads the feed itself only when the follower is this many refresh_s late (or
# this process wrote): a feed read costs 4-7 ms on SQLite and 10-17 ms on PostgreSQL,
# which, once every refresh_s, set the p99 of identify.
LATE = 2


@dataclass
class Served:
    """An index and the scoring state (a ``VersionScoring``) it was built with."""

    index: CentroidIndex
    scoring: object
    built_s: float


class LiveIndexes:
    """Galleries and search indexes of the versions this process answers for."""

    def __init__(self, store: Store, config: Config) -> None:
        # numpy's OpenBLAS splits even one probe's product with the profiles over every
        # core, then waits for the busiest: on two cores that are also embedding audio, a
        # 5,000-row cohort product took 8 ms instead of 0.2. One BLAS thread for the
        # process keeps each search on its own core (torch's encoder threads are apart).
        threadpool_limits(1, user_api="blas")
        self.store, self.config = store, config
        self._galleries: dict[int, _Feed] = {}
        self._served: dict[int, Served] = {}
        self._building: dict[int, int] = {}  # version -> serial of the scoring state being indexed in the background
        self._last: int | None = None  # the version answered for last
        self._lock = threading.Lock()  # guards the dicts above; each version's feed has its own

    def gallery(self, version: int) -> Gallery:
        """``version``'s centroids in this process, current to the database's change feed:
        built once, then kept current by :meth:`follow` (read here at once after this
        process's own writes, or when the follower is late), and only what changed; the
        changes go into the version's index as well."""
        feed = self._feed(version)
        with feed.lock:
            self._sync(version, feed)
        return feed.gallery

    def answering(self, version: int, scoring) -> int:
        """The version to answer with when ``version`` is the active one: itself, or while
        it is indexed in the background (a large gallery, newly promoted or rolled back
        to), the version this process answered with before."""
        with self._lock:
            last = self._last
            if version in self._served or last is None or last == version or last not in self._served:
                return version
            if scoring.prototypes or len(self._served[last].index) < self.config.index.background_from:
                return version
        self._start(version, scoring)
        return last

    def index(self, version: int, scoring) -> Served:
        """The 1:N index of ``version`` and the scoring state it answers with: built with
        ``scoring`` (a ``VersionScoring``) on first use; for a newer scoring state built
        again, in the background from ``[index] background_from`` speakers (the older
        index answering meanwhile)."""
        feed = self._feed(version)
        with feed.lock:
            self._sync(version, feed)
            with self._lock:
                self._last = version
                served = self._served.get(version)
            if served is not None and served.scoring.serial == scoring.serial:
                grown = len(served.index) >= self.config.index.approximate_from and not scoring.prototypes
                if served.index.kind == "exact" and grown:
                    self._start(version, scoring)  # grown past approximate_from by enrollments
                return served
            if served is None or scoring.prototypes or len(feed.gallery) < self.config.index.background_from:
                served = self._make(feed.gallery, scoring)[0]  # the feed's lock held: nothing can be missed
                with self._lock:
                    self._served[version] = served
                return served
        self._start(version, scoring)
        return served

    def status(self) -> list[dict]:
        """Each version this process holds an index of: its kind and size, memory, the
        revision it is current to and how far the database's feed has moved past it, and
        for an approximate index its recall@1 against exact search, measured now on up to
        ``RECALL_PROBES`` stored utterances of the version (its AS-norm cohort: real
        speech, centred as the profiles are)."""
        feed_revision = self.store.profiles.centroid_revision()
        with self._lock:
            held = sorted(self._galleries.items())
            served = dict(self._served)
            building = dict(self._building)
        out = []
        for version, feed in held:
            g, index = feed.gallery, served.get(version)
            probe = _recall_probes(index.scoring, version) if index is not None and index.index.kind != "exact" else None
            recall = index.index.recall(probe) if probe is not None else None
            out.append({
                "version": version,
                "kind": index.index.kind if index is not None else "exact",
                "speakers": len(g),
                "memory_bytes": g.nbytes + (index.index.nbytes if index is not None else 0),
                "revision": g.revision,
                "feed_revision": feed_revision,
                "behind": max(0, feed_revision - g.revision),
                "synced_s_ago": round(time.monotonic() - feed.synced, 3),
                "built_s": round(index.built_s, 3) if index is not None else None,
                "rebuilding": version in building,
                "recall_at_1": None if recall is None else round(recall, 4),
                "recall_probes": 0 if recall is None else len(probe),
            })
        return out

    def _feed(self, version: int) -> _Feed:
        with self._lock:
            return self._galleries.setdefault(version, _Feed())

    def follow(self, due_s: float) -> None:
        """Read the feed of each version held whose last read began ``due_s`` ago or more,
        and apply what changed. The read runs outside the version's lock, so an answer
        arriving meanwhile does not wait on the database."""
        with self._lock:
            held = list(self._galleries.items())
        for version, feed in held:
            writes, now, revision = self.store.writes, time.monotonic(), feed.gallery.revision
            if revision < 0 or now - feed.synced < due_s:
                continue
            changes = self.store.profiles.centroid_changes(version, revision)
            with feed.lock:
                if feed.gallery.revision == revision:  # else an answer read past it meanwhile
                    self._apply(version, feed, changes, now, writes)

    def _sync(self, version: int, feed: _Feed, force: bool = False) -> None:
        """Read the feed if an answer must (the caller holds ``feed.lock``): never read yet,
        this process wrote since, or the follower is ``LATE``."""
        writes, now = self.store.writes, time.monotonic()
        late = now - feed.synced >= LATE * self.config.index.refresh_s
        if force or feed.gallery.revision < 0 or writes != feed.seen or late:
            self._apply(version, feed, self.store.profiles.centroid_changes(version, feed.gallery.revision), now, writes)

    def _apply(self, version: int, feed: _Feed, changes, now: float, writes: int) -> None:
        """Write feed changes into the gallery and the served index (the caller holds
        ``feed.lock``); ``writes``: the store's write count before they were read."""
        feed.gallery.apply(changes)
        feed.synced, feed.seen = now, writes
        with self._lock:
            served = self._served.get(version)
        if served is None:
            return
        if served.scoring.prototypes:  # prototypes are rows per speaker: small galleries, built again
            with self._lock:
                self._served.pop(version, None)
            return
        _write(served, changes)

    def _make(self, gallery: Gallery, scoring) -> tuple[Served, int]:
        """An index of ``gallery`` under ``scoring``, and the feed revision it is current to."""
        start = time.perf_counter()
        ids, names, means, revision = gallery.snapshot()
        protos = None
        if scoring.prototypes:
            where = {name: i for i, name in enumerate(names)}
            rows = [(where[n], p) for n in names for p in scoring.prototypes.get(n, [])]
            if rows:
                protos = (np.array([i for i, _ in rows]), np.stack([p for _, p in rows]))
        index = CentroidIndex(
            names, scoring.centred(means), ids=ids, cohort=scoring.cohort, calibration=scoring.calibration,
            prototypes=protos, approximate=len(names) >= self.config.index.approximate_from,
        )
        return Served(index, scoring, time.perf_counter() - start), revision

    def _start(self, version: int, scoring) -> None:
        """Index ``version`` with ``scoring`` in a background thread (once per state); the
        index it replaces answers until then."""
        with self._lock:
            if self._building.get(version) == scoring.serial:
                return
            self._building[version] = scoring.serial

        def build() -> None:
            try:
                feed = self._feed(version)
                self.gallery(version)  # a version not served yet: its first read, outside every other lock
                served, revision = self._make(feed.gallery, scoring)
                with feed.lock:
                    self._sync(version, feed, force=True)
                    # What the feed brought while it was built: each changed row's current value.
                    _write(served, self.store.profiles.centroid_changes(version, revision))
                    with self._lock:
                        current = self._served.get(version)
                        if current is None or current.scoring.serial <= scoring.serial:
                            self._served[version] = served
                log.info("version %d indexed in the background in %.1f s", version, served.built_s)
            except Exception:  # the older index keeps answering; the next request tries again
                log.exception("indexing version %d in the background failed", version)
            finally:
                with self._lock:
                    if self._building.get(version) == scoring.serial:
                        del self._building[version]

        threading.Thread(target=build, name=f"index-v{version}", daemon=True).start()


class _Feed:
    """One version's gallery and when it last read the change feed."""

    def __init__(self) -> None:
        self.gallery = Gallery()
        self.synced = 0.0
        self.seen = -1  # the store's write count when the feed was read last
        self.lock = threading.Lock()  # one reader of a version's feed at a time


def _write(served: Served, changes) -> None:
    """Write feed changes into a served index, in place."""
    served.index.remove(changes.removed)
    if len(changes.names):
        served.index.put(changes.speaker_ids.tolist(), changes.names, served.scoring.centred(changes.means))


def _recall_probes(scoring, version: int) -> np.ndarray | None:
    cohort = scoring.cohort
    if cohort is None or not len(cohort):
        return None
    rows = np.random.default_rng(version).permutation(len(cohort))[:RECALL_PROBES]
    return cohort.vectors[np.sort(rows)]
