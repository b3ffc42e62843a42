"""Scores and decisions: identify (1:N), verify (1:1) and calibrate, per model version.

Each version has its own scoring state: the domain centre and the AS-norm cohort (both
from stored embeddings), its newest calibration (thresholds and the score-to-LLR map)
and cached profile statistics. The state is rebuilt when a newer calibration appears or
a profile changes after the fact (an erasure, a removed or an accepted utterance), in
this process or any other sharing the database.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from engine import audio
from engine.audio import Source
from engine.centroids import prototypes
from engine.config import Config
from engine.names import normalise_speaker_name
from engine.errors import InvalidInput, NotEnoughData, UnknownSpeaker
from engine.index import CentroidIndex
from engine.models import ModelRegistry
from engine.results import Identification, Verification
from engine.scoring import Calibration, Cohort, centred, fit_calibration, leave_one_out_trials
from storage import ModelVersion, Store

log = logging.getLogger(__name__)


class VersionScoring:
    """What scoring a version needs beyond its centroids: the domain centre, the AS-norm
    cohort, the newest calibration and, cached, every profile's enrollment-side cohort
    statistics. Every vector is centred (:meth:`centred`) before it is scored."""

    def __init__(self, cohort: Cohort | None, calibration: Calibration | None, protos, centre: np.ndarray | None = None) -> None:
        self.cohort = cohort
        self.calibration = calibration
        self.prototypes = protos  # {speaker: [k, D]} or None, centred
        self.centre = centre  # the mean of the version's enrolled embeddings, or None
        self._names: list[str] = []
        self._centroids = np.zeros((0, 0), dtype=np.float32)
        self._stats = (np.zeros(0), np.zeros(0))
        self._lock = threading.Lock()  # the service scores from several threads

    def centred(self, vectors: np.ndarray) -> np.ndarray:
        return centred(vectors, self.centre)

    def enrollment_stats(self, names: list[str], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cohort statistics of every profile, recomputed only for profiles that changed."""
        with self._lock:
            return self._enrollment_stats(names, centroids)

    def _enrollment_stats(self, names: list[str], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.cohort is not None
        if names == self._names and centroids.shape == self._centroids.shape:
            # The usual case on the search path: the same speakers, a few profiles moved.
            # One vectorised comparison instead of a Python loop over every speaker.
            mean, std = self._stats[0].copy(), self._stats[1].copy()
            stale = np.flatnonzero(np.any(centroids != self._centroids, axis=1)).tolist()
        else:
            old = {name: i for i, name in enumerate(self._names)}
            mean, std = np.zeros(len(names)), np.zeros(len(names))
            stale = []
            for i, name in enumerate(names):
                j = old.get(name)
                if j is not None and np.array_equal(self._centroids[j], centroids[i]):
                    mean[i], std[i] = self._stats[0][j], self._stats[1][j]
                else:
                    stale.append(i)
        if stale:
            m, sd = self.cohort.enrollment_stats([names[i] for i in stale], centroids[stale])
            mean[stale], std[stale] = m, sd
        self._names, self._centroids, self._stats = list(names), centroids.copy(), (mean, std)
        return mean, std

    def backend(self, wanted: str) -> str:
        """The back-end that can decide now: a calibration is needed for anything but cosine."""
        ready = self.calibration is not None and self.cohort is not None and wanted in self.calibration.thresholds
        return wanted if ready else "cosine"



class Recognizer:
    """Identify, verify and calibrate against the stored profiles of a version."""

    def __init__(self, store: Store, models: ModelRegistry, config: Config) -> None:
        self.store, self.models, self.config = store, models, config
        self._lock = threading.Lock()
        self._scoring: dict[int, tuple[tuple, VersionScoring]] = {}

    def scoring(self, version: int) -> VersionScoring:
        """Centre, cohort, calibration and cached statistics of a version, rebuilt when a
        newer calibration appears (a ``calibrate`` in another process included) or a
        profile changes after the fact."""
        latest = self.store.registry.latest_calibration(version)
        # An erasure, removal or accepted utterance (in any process) must also reach the
        # in-memory cohort and centre.
        key = (latest[0] if latest else None, self.store.keys.profile_changes())
        with self._lock:
            cached = self._scoring.get(version)
            if cached is not None and cached[0] == key:
                return cached[1]
        calibration = None
        if latest is not None:
            calibration = Calibration.from_params(version, latest[2], id=latest[0], created_at=latest[1].isoformat())
        through = calibration.settings.get("cohort_through") if calibration else None
        # A calibration fitted on centred scores is only valid on centred scores: the
        # centre is recomputed from the same stored embeddings it was fitted on (ids up
        # to ``through``), so an erasure takes the erased speaker out of it too.
        centre = self.centre(version, through) if calibration and calibration.settings.get("centre") else None
        state = VersionScoring(self.cohort(version, through, centre), calibration, self._prototypes(version, centre), centre)
        with self._lock:
            self._scoring[version] = (key, state)
        return state

    def centre(self, version: int, through: int | None) -> np.ndarray | None:
        """The domain centre: the mean of the version's enrolled embeddings (ids up to ``through``)."""
        total = self.store.embeddings.embedding_sum(version, through=through)
        return total.mean if total.count else None

    def cohort(self, version: int, through: int | None, centre: np.ndarray | None = None) -> Cohort | None:
        """The AS-norm cohort: the first utterances of each speaker (up to ``through``, the
        newest id the calibration saw, so scores are normalised as they were fitted)."""
        cfg = self.config.scoring
        ids, speakers, vectors = self.store.embeddings.cohort_embeddings(version, per_speaker=cfg.cohort_per_speaker, through=through)
        if len(ids) > cfg.cohort_size:
            # A large gallery: whole speakers drawn at random (seeded by the version, so
            # the calibration and every later search draw the same ones) keep the
            # cohort, and the cost of its statistics, bounded.
            names = np.asarray(speakers, dtype=object)
            order = np.random.default_rng(version).permutation(np.unique(names))
            sizes = np.cumsum([np.count_nonzero(names == n) for n in order])
            chosen = np.isin(names, order[: int(np.searchsorted(sizes, cfg.cohort_size, side="right"))])
            ids, vectors = ids[chosen], vectors[chosen]
            speakers = [s for s, keep in zip(speakers, chosen) if keep]
        if len(ids) < cfg.min_cohort:
            return None
        return Cohort(ids, speakers, centred(vectors, centre), top_k=cfg.cohort_top_k)

    def _prototypes(self, version: int, centre: np.ndarray | None) -> dict[str, np.ndarray] | None:
        k = self.config.scoring.prototypes
        if k <= 0:
            return None
        ids, speakers, vectors = self.store.embeddings.version_embeddings(version)
        vectors = centred(vectors, centre)
        names = np.asarray(speakers, dtype=object)
        return {name: prototypes(vectors[names == name], k) for name in sorted(set(speakers))}

    def calibrate(self, version: int | None = None) -> Calibration:
        """Fit a version's (default: the active one's) score calibration on leave-one-out
        trials of its stored enrollments and store it with the version (the newest fit
        is the one used). A refresh calls this for its candidate before promoting it.

        Raises
        ------
        NotEnoughData
            Fewer than two speakers, or no speaker with two utterances.
        """
        cfg = self.config.scoring
        version = self.models.active().number if version is None else version
        ids, speakers, vectors = self.store.embeddings.version_embeddings(version)
        if len(set(speakers)) < 2:
            raise NotEnoughData(f"calibration needs at least two enrolled speakers; version {version} has {len(set(speakers))}")
        through = int(ids.max())
        centre = vectors.astype(np.float64).mean(axis=0) if cfg.centre else None
        cohort = self.cohort(version, through, centre)
        try:
            trials = leave_one_out_trials(
                ids, speakers, vectors, cohort, probes_per_speaker=cfg.calibration_probes_per_speaker, seed=version,
                centre=centre,
            )
        except ValueError as exc:
            raise NotEnoughData(str(exc)) from None
        settings = {
            "verify_far": cfg.verify_far,
            "identify_far": cfg.identify_far,
            "consistency_hold_rate": self.config.enrollment.consistency_hold_rate,
            "decision": cfg.decision,
            "p_target": cfg.p_target,
            "c_miss": cfg.c_miss,
            "c_fa": cfg.c_fa,
            "cohort_per_speaker": cfg.cohort_per_speaker,
            "cohort_top_k": cfg.cohort_top_k,
            "cohort_size": 0 if cohort is None else len(cohort),
            "cohort_through": through,
            "centre": cfg.centre,
        }
        fitted = fit_calibration(version, trials, settings)
        new_id, created = self.store.registry.add_calibration(version, fitted.to_params())
        log.info("version %d calibrated on %s", version, fitted.trials)
        return Calibration.from_params(version, fitted.to_params(), id=new_id, created_at=created.isoformat())

    def calibration(self) -> Calibration | None:
        """The active version's newest calibration, or None."""
        return self.scoring(self.models.active().number).calibration

    def calibration_status(self, version: int) -> dict | None:
        """The newest calibration of ``version`` and how much has been enrolled since."""
        calibration = self.scoring(version).calibration
        if calibration is None:
            return None
        speakers = len(self.store.profiles.centroid_matrix(version)[0])
        return {
            "id": calibration.id,
            "created_at": calibration.created_at,
            "speakers_then": calibration.trials["speakers"],
            "speakers_now": speakers,
            "backends": sorted(calibration.thresholds),
            "centred": bool(calibration.settings.get("centre", False)),
        }

    def consistency_threshold(self, version: int) -> float:
        """The cosine below which a new utterance does not sound like its profile: set at
        ``consistency_hold_rate`` of the version's genuine calibration trials, else the
        configured cut."""
        calibration = self.scoring(version).calibration
        if calibration is not None and "consistency" in calibration.thresholds.get("cosine", {}):
            return float(calibration.thresholds["cosine"]["consistency"])
        return self.config.enrollment.consistency_threshold

    def _embed_probe(self, source: Source, name: str | None, version: ModelVersion) -> tuple[audio.Speech, np.ndarray]:
        utt = audio.load(source, self.config.audio, name=name)
        return utt, self.models.embedder(version).embed([utt.samples])[0]

    def index(self, version: int, scoring: VersionScoring) -> CentroidIndex:
        names, centroids = self.store.profiles.centroid_matrix(version)
        centroids = scoring.centred(centroids)
        stats = scoring.enrollment_stats(names, centroids) if scoring.cohort is not None and names else None
        protos = None
        if scoring.prototypes:
            rows = [(i, p) for i, n in enumerate(names) for p in scoring.prototypes.get(n, [])]
            if rows:
                protos = (np.array([i for i, _ in rows]), np.stack([p for _, p in rows]))
        return CentroidIndex(
            names, centroids, cohort=scoring.cohort, enroll_stats=stats, calibration=scoring.calibration, prototypes=protos
        )

    def identify(self, source: Source, *, top: int = 5, name: str | None = None) -> Identification:
        """Rank every enrolled speaker against one utterance (1:N, open set).

        Candidates are ranked by cosine; the answer is "unknown" (``decision`` None) when
        the best candidate's score on the deciding back-end is below the threshold, or
        within ``identify_margin`` of the second candidate's.
        """
        if top < 1:
            raise InvalidInput("--top must be at least 1")
        cfg = self.config.scoring
        version = self.models.active()
        utt, embedding = self._embed_probe(source, name, version)
        scoring = self.scoring(version.number)
        backend = scoring.backend(cfg.backend)
        hits = tuple(self.index(version.number, scoring).search(scoring.centred(embedding), max(top, 2)))
        threshold = self._threshold(scoring, backend, "identify")
        decision, reason = None, ""
        if not hits:
            reason = "no speaker is enrolled"
        elif hits[0].on(backend) < threshold:
            reason = "best score below the threshold"
        elif cfg.identify_margin > 0 and len(hits) > 1 and hits[0].on(backend) - hits[1].on(backend) < cfg.identify_margin:
            reason = "best and second best too close"
        else:
            decision = hits[0].speaker
        return Identification(
            utt.source, version.number, utt.quality.speech_s, hits[:top], decision, threshold, backend, reason
        )

    def verify(self, speaker: str, source: Source, *, name: str | None = None, disclose: bool = True) -> Verification:
        """Score one utterance against a claimed speaker (1:1).

        ``disclose=False`` (the service's query keys) answers with the decision alone: no
        scores (they would let a client climb toward acceptance), and a name that is not
        enrolled is rejected like any other, so the answer does not tell whether it is.
        The probe is embedded first either way, so the time taken does not tell either.
        """
        speaker = normalise_speaker_name(speaker)
        version = self.models.active()
        utt, embedding = self._embed_probe(source, name, version)
        scoring = self.scoring(version.number)
        backend = scoring.backend(self.config.scoring.backend)
        if not self.store.profiles.has_speaker(speaker):
            if disclose:
                raise UnknownSpeaker(f"speaker {speaker!r} is not enrolled")
            threshold = self._threshold(scoring, backend, "verify")
            return Verification(speaker, utt.source, version.number, utt.quality.speech_s, None, threshold, False, backend=backend)
        centroid = self.store.profiles.centroid(speaker, version.number)
        index = CentroidIndex(
            [speaker],
            scoring.centred(centroid.mean[None, :]),
            cohort=scoring.cohort,
            calibration=scoring.calibration,
            prototypes=_own_prototypes(scoring, speaker),
        )
        hit = index.search(scoring.centred(embedding), 1)[0]
        threshold = self._threshold(scoring, backend, "verify")
        accepted = hit.on(backend) >= threshold
        if not disclose:
            return Verification(speaker, utt.source, version.number, utt.quality.speech_s, None, threshold, accepted, backend=backend)
        return Verification(
            speaker, utt.source, version.number, utt.quality.speech_s, hit.score, threshold,
            accepted, hit.normalised, hit.llr, backend,
        )

    def _threshold(self, scoring: VersionScoring, backend: str, task: str) -> float:
        if backend == "cosine" and scoring.calibration is None:
            cfg = self.config.scoring
            return cfg.identify_threshold if task == "identify" else cfg.verify_threshold
        return float(scoring.calibration.thresholds[backend][task])


def _own_prototypes(scoring: VersionScoring, speaker: str) -> tuple[np.ndarray, np.ndarray] | None:
    rows = (scoring.prototypes or {}).get(speaker)
    return None if rows is None or not len(rows) else (np.zeros(len(rows), dtype=np.int64), rows)


