"""Who spoke when: windows over the speech of a recording, clustered into speakers.

The classic pipeline, on the active version's encoder (no second model): the VAD's
speech regions are covered by overlapping windows of the encoder's own length (1.6 s for
GE2E), each window gets an embedding, the windows are clustered into speakers, and each
window's share of the timeline goes to its cluster. Consecutive shares of one cluster
join into a segment. Matching clusters to enrolled speakers is the orchestration's part
(:mod:`voiceprint.engine.diarizer`); this module never touches the database.

Clustering is agglomerative (average linkage on cosine distance, SciPy) cut at a distance
threshold when the number of speakers is unknown, or cut into exactly that number when it
is given. Long recordings are clustered in chunks of ``chunk_windows`` windows whose
clusters are then clustered again by their centroids, so memory stays linear in the
recording's length. A last pass moves every window to its nearest cluster centroid
(resegmentation at window resolution). Spectral clustering with an eigengap estimate of
the number of speakers (scikit-learn) is the alternative ``bench/conversations.py``
compares it with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from voiceprint.engine.errors import InvalidInput

CLUSTERINGS = ("ahc", "spectral")


@dataclass(frozen=True)
class Window:
    """One embedding window: the audio it reads, and the share of the timeline it speaks for."""

    start: float  # seconds: the audio the encoder reads
    end: float
    own_start: float  # seconds: the part of the timeline this window's label covers
    own_end: float


@dataclass(frozen=True)
class Turn:
    """One stretch of the timeline given to one cluster."""

    start: float
    end: float
    cluster: int


def layout(regions: Sequence[tuple[float, float]], window_s: float, step_s: float) -> list[Window]:
    """Windows over speech regions (seconds): ``window_s`` long, every ``step_s``.

    A region shorter than a window gets one window centred on it (it reads a little of
    what surrounds the region); each window owns the part of its region nearest to its
    centre, so the owned parts tile every region exactly.

    >>> [(w.start, w.end, w.own_start, w.own_end) for w in layout([(1.0, 4.0)], 1.6, 1.0)]
    [(1.0, 2.6, 1.0, 2.3), (2.0, 3.6, 2.3, 3.0), (2.4, 4.0, 3.0, 4.0)]
    >>> [(w.start, w.end, w.own_start, w.own_end) for w in layout([(5.0, 5.4)], 1.6, 0.5)]
    [(4.4, 6.0, 5.0, 5.4)]
    """
    windows: list[Window] = []
    for a, b in regions:
        if b - a <= window_s:
            centre = (a + b) / 2
            windows.append(Window(round(centre - window_s / 2, 6), round(centre + window_s / 2, 6), a, b))
            continue
        n = int(np.ceil((b - a - window_s) / step_s)) + 1
        starts = [a + k * step_s for k in range(n - 1)] + [b - window_s]
        centres = [s + window_s / 2 for s in starts]
        cuts = [a] + [(c1 + c2) / 2 for c1, c2 in zip(centres, centres[1:])] + [b]
        windows += [Window(round(s, 6), round(s + window_s, 6), round(cuts[k], 6), round(cuts[k + 1], 6)) for k, s in enumerate(starts)]
    return windows


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ahc(x: np.ndarray, threshold: float, speakers: int | None) -> np.ndarray:
    """Labels 0..k-1 of average-linkage clustering on cosine distance."""
    if len(x) == 1:
        return np.zeros(1, dtype=np.int64)
    tree = linkage(_unit(x), method="average", metric="cosine")
    if speakers is not None:
        labels = fcluster(tree, t=min(speakers, len(x)), criterion="maxclust")
    else:
        labels = fcluster(tree, t=threshold, criterion="distance")
    return np.unique(labels, return_inverse=True)[1]


def _affinity(x: np.ndarray, keep: float = 0.2) -> np.ndarray:
    """Cosine affinity with each row pruned to its ``keep`` share of strongest links, made
    symmetric again. Speaker embeddings of different people still score well above zero,
    so an unpruned affinity looks like one cluster to the eigengap."""
    unit = _unit(x)
    affinity = np.clip(unit @ unit.T, 0.0, 1.0)
    n = len(affinity)
    strongest = max(1, int(np.ceil(keep * n)))
    cut = np.partition(affinity, n - strongest, axis=1)[:, n - strongest][:, None]
    pruned = np.where(affinity >= cut, affinity, 0.0)
    return (pruned + pruned.T) / 2


def eigengap_speakers(x: np.ndarray, max_speakers: int = 10) -> int:
    """The number of clusters the largest eigengap of the pruned affinity's normalised
    Laplacian suggests.

    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(3, 32))
    >>> x = np.repeat(centres, 20, axis=0) + 0.1 * rng.normal(size=(60, 32))
    >>> eigengap_speakers(x)
    3
    """
    affinity = _affinity(x)
    scale = 1.0 / np.sqrt(np.maximum(affinity.sum(axis=1), 1e-12))
    normalised = affinity * scale[:, None] * scale[None, :]
    values = np.sort(np.linalg.eigvalsh(normalised))[::-1][: max_speakers + 1]
    return int(np.argmax(values[:-1] - values[1:])) + 1


def _spectral(x: np.ndarray, speakers: int | None, max_speakers: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    k = speakers or eigengap_speakers(x, max_speakers)
    if k <= 1 or len(x) <= k:
        return np.zeros(len(x), dtype=np.int64) if k <= 1 else np.arange(len(x))
    with warnings.catch_warnings():
        # The pruned affinity of well separated speakers falls apart into one component per
        # speaker, which is the point; scikit-learn warns that the graph is not connected.
        warnings.filterwarnings("ignore", "Graph is not fully connected", UserWarning)
        return SpectralClustering(k, affinity="precomputed", random_state=0, assign_labels="cluster_qr").fit_predict(_affinity(x))


def cluster(
    embeddings: np.ndarray,
    *,
    threshold: float,
    speakers: int | None = None,
    method: str = "ahc",
    chunk_windows: int = 2000,
    max_speakers: int = 20,
    durations: np.ndarray | None = None,
    min_speaker_s: float = 0.0,
) -> np.ndarray:
    """A cluster label (0..k-1, numbered by first appearance) for every window embedding.

    ``threshold`` is the cosine distance at which agglomeration stops (ignored when
    ``speakers`` is given). Past ``chunk_windows`` windows, each chunk is clustered on its
    own (agglomerative, at the threshold) and the chunks' cluster centroids are clustered
    again by ``method``, so neither memory nor time grows with the square of the length.
    A cluster holding less than ``min_speaker_s`` of the windows' ``durations`` (seconds
    of timeline each window speaks for) is folded into the nearest other cluster: windows
    across a change of speaker otherwise form short clusters of their own.

    >>> rng = np.random.default_rng(1)
    >>> a, b = rng.normal(size=(2, 64))
    >>> x = np.stack([a + 0.2 * rng.normal(size=64) for _ in range(6)] + [b + 0.2 * rng.normal(size=64) for _ in range(4)])
    >>> cluster(x, threshold=0.5).tolist()
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    >>> cluster(x, threshold=0.5, speakers=1).tolist()
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    """
    if method not in CLUSTERINGS:
        raise InvalidInput(f"unknown clustering {method!r}; valid names: {', '.join(CLUSTERINGS)}")
    if speakers is not None and speakers < 1:
        raise InvalidInput("the number of speakers must be at least 1")
    x = _unit(np.asarray(embeddings, dtype=np.float64))
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    def whole(points: np.ndarray) -> np.ndarray:
        return _spectral(points, speakers, max_speakers) if method == "spectral" else _ahc(points, threshold, speakers)

    if len(x) <= chunk_windows:
        labels = whole(x)
    else:
        # Two stages: local clusters per chunk (never forced to a count), then the chunks'
        # centroids clustered together, with the count if one was given.
        local = np.empty(len(x), dtype=np.int64)
        centroids = []
        for begin in range(0, len(x), chunk_windows):
            part = _ahc(x[begin : begin + chunk_windows], threshold, None)
            local[begin : begin + chunk_windows] = part + len(centroids)
            centroids += [x[begin : begin + chunk_windows][part == k].mean(axis=0) for k in range(part.max() + 1)]
        labels = whole(np.stack(centroids))[local]
    labels = _resegment(x, labels)
    if durations is not None and min_speaker_s > 0:
        labels = _fold_small(x, labels, np.asarray(durations, dtype=np.float64), min_speaker_s)
    return _by_first_appearance(labels)


def _fold_small(x: np.ndarray, labels: np.ndarray, durations: np.ndarray, min_s: float) -> np.ndarray:
    """Move the windows of clusters under ``min_s`` seconds to the nearest cluster that is not."""
    present = np.unique(labels)
    size = np.array([durations[labels == k].sum() for k in present])
    big = present[size >= min_s]
    if len(big) == 0 or len(big) == len(present):
        return labels
    centroids = _unit(np.stack([x[labels == k].mean(axis=0) for k in big]))
    small = ~np.isin(labels, big)
    labels = labels.copy()
    labels[small] = big[np.argmax(x[small] @ centroids.T, axis=1)]
    return _resegment(x, labels)


def _resegment(x: np.ndarray, labels: np.ndarray, rounds: int = 2) -> np.ndarray:
    """Each window to its nearest cluster centroid; clusters left empty disappear."""
    for _ in range(rounds):
        present = np.unique(labels)
        centroids = _unit(np.stack([x[labels == k].mean(axis=0) for k in present]))
        moved = present[np.argmax(x @ centroids.T, axis=1)]
        if np.array_equal(moved, labels):
            break
        labels = moved
    return labels


def _by_first_appearance(labels: np.ndarray) -> np.ndarray:
    order = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return np.array([order[label] for label in labels.tolist()], dtype=np.int64)


def turns(windows: Sequence[Window], labels: Sequence[int], *, join_gap_s: float = 0.0) -> list[Turn]:
    """The windows' owned shares of the timeline, consecutive ones of a cluster joined.

    Two shares of one cluster join when at most ``join_gap_s`` of non-speech lies between
    them (a pause inside one person's turn).

    >>> w = layout([(0.0, 3.0), (3.2, 4.0)], 1.6, 1.0)
    >>> [(t.start, t.end, t.cluster) for t in turns(w, [0, 0, 1, 1], join_gap_s=0.5)]
    [(0.0, 2.0, 0), (2.0, 4.0, 1)]
    """
    out: list[Turn] = []
    for window, label in sorted(zip(windows, labels), key=lambda pair: pair[0].own_start):
        label = int(label)
        if out and out[-1].cluster == label and window.own_start - out[-1].end <= join_gap_s + 1e-9:
            out[-1] = Turn(out[-1].start, max(out[-1].end, window.own_end), label)
        else:
            out.append(Turn(window.own_start, window.own_end, label))
    return out


def rttm(segments: Sequence[tuple[float, float, str]], file_id: str) -> str:
    """RTTM lines (NIST's speaker-segment format) for ``(start, end, speaker)`` segments.

    >>> print(rttm([(0.5, 2.25, "alice")], "meeting"), end="")
    SPEAKER meeting 1 0.500 1.750 <NA> <NA> alice <NA> <NA>
    """
    ident = "".join(c if c.isalnum() or c in "-_." else "_" for c in file_id) or "recording"
    return "".join(
        f"SPEAKER {ident} 1 {start:.3f} {end - start:.3f} <NA> <NA> {'_'.join(speaker.split()) or '<NA>'} <NA> <NA>\n"
        for start, end, speaker in segments
    )
