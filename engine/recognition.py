"""Scores and decisions: identify (1:N), verify (1:1) and calibrate, per model version.

Each version has its own scoring state: the domain centre and the AS-norm cohort (both
from stored embeddings), its newest calibration (thresholds and the score-to-LLR map)
and cached profile statistics. The state is rebuilt when a newer calibration appears or
a profile changes after the fact (an erasure, a removed or an accepted utterance), in
this process or any other sharing the database.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import numpy as np

from voiceprint.engine import audio
from voiceprint.engine.audio import Source
from voiceprint.engine.calibration import Calibration, fit_calibration, reference_thresholds
from voiceprint.engine.centroids import prototypes
from voiceprint.engine.config import Config
from voiceprint.engine.det import DetScores
from voiceprint.engine.encoders import reference_scores
from voiceprint.engine.errors import InvalidInput, NotEnoughData, UnknownSpeaker
from voiceprint.engine.live_index import LATE, LiveIndexes
from voiceprint.engine.index import CentroidIndex
from voiceprint.engine.models import ModelRegistry
from voiceprint.engine.names import normalise_speaker_name
from voiceprint.engine.results import Identification, Verification
from voiceprint.engine.scoring import Cohort, centred
from voiceprint.engine.trials import TrialScores, leave_one_out_trials
from voiceprint.storage import ModelVersion, Store

log = logging.getLogger(__name__)
_SERIALS = itertools.count()


class VersionScoring:
    """What scoring a version needs beyond its centroids: the domain centre, the AS-norm
    cohort and the newest calibration. Every vector is centred (:meth:`centred`) before
    it is scored; each profile's enrollment-side statistics are kept by the index."""

    def __init__(
        self, cohort: Cohort | None, calibration: Calibration | None, protos, centre: np.ndarray | None = None, cohort_rows: int = 0
    ) -> None:
        self.cohort = cohort
        self.cohort_rows = cohort_rows  # stored utterances the cohort could draw on (it is None below min_cohort)
        self.calibration = calibration
        self.prototypes = protos  # {speaker: [k, D]} or None, centred
        self.centre = centre  # the mean of the version's enrolled embeddings, or None
        self.serial = next(_SERIALS)  # tells a rebuilt state from the one an index was made with

    def centred(self, vectors: np.ndarray) -> np.ndarray:
        return centred(vectors, self.centre)

    def backend(self, wanted: str, min_cohort: int) -> tuple[str, str]:
        """The back-end that can decide now, and why it is not ``wanted`` ("" when it is).

        Anything but cosine needs a calibration and a cohort; the reason goes into every
        answer and into ``status``, so a switch to cosine is never silent.
        """
        if wanted == "cosine":
            return wanted, ""
        if self.calibration is None:
            return "cosine", f"cosine decides, not {wanted}: the version is not calibrated yet"
        if self.cohort is None:
            return "cosine", (
                f"cosine decides, not {wanted}: the AS-norm cohort has {self.cohort_rows} stored utterances, "
                f"fewer than [scoring] min_cohort = {min_cohort}"
            )
        if wanted not in self.calibration.thresholds:
            return "cosine", f"cosine decides, not {wanted}: the calibration was fitted without a cohort (calibrate again)"
        return wanted, ""



class Recognizer:
    """Identify, verify and calibrate against the stored profiles of a version."""

    def __init__(self, store: Store, models: ModelRegistry, config: Config) -> None:
        self.store, self.models, self.config = store, models, config
        self._lock = threading.Lock()
        self._scoring: dict[int, tuple[tuple, VersionScoring, int, float]] = {}  # version -> (key, state, writes seen, checked at)
        self.indexes = LiveIndexes(store, config)
        self._follower: threading.Thread | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop the follower thread (the engine closes its store next)."""
        self._closed.set()
        if self._follower is not None:
            self._follower.join()

    def scoring(self, version: int) -> VersionScoring:
        """Centre, cohort and calibration of a version, rebuilt when a newer calibration
        appears (a ``calibrate`` in another process included) or a profile changes after
        the fact. Like the change feed, the database is asked every ``[index] refresh_s``
        by the follower thread (started here), and by an answer only at once after this
        process's own writes or when the follower is late."""
        self._follow_in_background()
        writes, now = self.store.writes, time.monotonic()
        with self._lock:
            cached = self._scoring.get(version)
        if cached is not None and cached[2] == writes and now - cached[3] < LATE * self.config.index.refresh_s:
            return cached[1]
        return self._check(version, cached, writes, now)

    def _follow_in_background(self) -> None:
        """Start the thread that keeps every version's scoring state and index current
        (once; none with ``refresh_s`` 0, where every answer reads the database)."""
        if self._follower is not None or self.config.index.refresh_s <= 0 or self._closed.is_set():
            return
        with self._lock:
            if self._follower is None:
                self._follower = threading.Thread(target=self._follow, name="index-follower", daemon=True)
                self._follower.start()

    def _follow(self) -> None:
        # Awake four times per refresh_s, reading what was read three ticks ago or more:
        # each read starts within refresh_s of the one before, so a change committed
        # elsewhere is in the answers within refresh_s and one read.
        tick = self.config.index.refresh_s / 4
        while not self._closed.wait(tick):
            try:
                with self._lock:
                    due = [(v, c) for v, c in self._scoring.items() if time.monotonic() - c[3] >= 3 * tick]
                for version, cached in due:
                    self._check(version, cached, self.store.writes, time.monotonic())
                self.indexes.follow(3 * tick)
            except Exception:  # a database hiccup: answers read for themselves once LATE
                log.exception("following the database's changes failed; trying again in %.2f s", tick)

    def _check(self, version: int, cached, writes: int, now: float) -> VersionScoring:
        """Ask the database whether ``version``'s scoring state is still current; rebuild
        it if not. ``writes``: the store's write count before asking."""
        latest = self.store.registry.latest_calibration(version)
        # An erasure, removal or accepted utterance (in any process) must also reach the
        # in-memory cohort and centre.
        key = (latest[0] if latest else None, self.store.keys.profile_changes())
        if cached is not None and cached[0] == key:
            with self._lock:
                self._scoring[version] = (key, cached[1], writes, now)
            return cached[1]
        calibration = None
        if latest is not None:
            calibration = Calibration.from_params(version, latest[2], id=latest[0], created_at=latest[1].isoformat())
        through = calibration.settings.get("cohort_through") if calibration else None
        # A calibration fitted on centred scores is only valid on centred scores: the
        # centre is recomputed from the same stored embeddings it was fitted on (ids up
        # to ``through``), so an erasure takes the erased speaker out of it too.
        centre = self.centre(version, through) if calibration and calibration.settings.get("centre") else None
        cohort, rows = self._cohort(version, through, centre)
        state = VersionScoring(cohort, calibration, self._prototypes(version, centre), centre, rows)
        with self._lock:
            self._scoring[version] = (key, state, writes, now)
        return state

    def centre(self, version: int, through: int | None) -> np.ndarray | None:
        """The domain centre: the mean of the version's enrolled embeddings (ids up to ``through``)."""
        total = self.store.embeddings.embedding_sum(version, through=through)
        return total.mean if total.count else None

    def cohort(self, version: int, through: int | None, centre: np.ndarray | None = None) -> Cohort | None:
        """The AS-norm cohort: the first utterances of each speaker (up to ``through``, the
        newest id the calibration saw, so scores are normalised as they were fitted), or
        None with fewer than ``min_cohort`` of them."""
        return self._cohort(version, through, centre)[0]

    def _cohort(self, version: int, through: int | None, centre: np.ndarray | None) -> tuple[Cohort | None, int]:
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
            return None, len(ids)
        return Cohort(ids, speakers, centred(vectors, centre), top_k=cfg.cohort_top_k), len(ids)

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
            Fewer than ``[scoring] min_calibration_speakers`` speakers with two or more
            utterances (decisions keep the encoder's reference thresholds), or two
            speakers whose profiles score like one person and nothing else.
        """
        cfg = self.config.scoring
        version = self.models.active().number if version is None else version
        trials, through, cohort, enrolled = self._trials(version)
        settings = {
            "speakers_enrolled": enrolled,  # the fit may have seen a sample of them
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
        try:
            fitted = fit_calibration(version, trials, settings)
        except ValueError as exc:  # e.g. two speakers whose profiles score like one person
            raise NotEnoughData(str(exc)) from None
        new_id, created = self.store.registry.add_calibration(version, fitted.to_params())
        log.info("version %d calibrated on %s", version, fitted.trials)
        return Calibration.from_params(version, fitted.to_params(), id=new_id, created_at=created.isoformat())

    def _trials(self, version: int) -> tuple[TrialScores, int, Cohort | None, int]:
        """Leave-one-out trials of ``version``'s stored enrollments (of ``[scoring]
        calibration_speakers`` of its speakers at most), the id of the newest one, the
        cohort they were normalised with, and how many speakers the version has."""
        cfg = self.config.scoring
        (ids, speakers, vectors), enrolled = self.store.embeddings.sampled_embeddings(version, cfg.calibration_speakers, seed=version)
        _, counts = np.unique(np.asarray(speakers, dtype=object), return_counts=True)
        usable = int(np.count_nonzero(counts >= 2))
        if usable < max(cfg.min_calibration_speakers, 2):
            raise NotEnoughData(
                f"calibration needs {max(cfg.min_calibration_speakers, 2)} speakers with two or more utterances "
                f"([scoring] min_calibration_speakers); version {version} has {usable}. Until then decisions use "
                "the encoder's reference thresholds, which hold their rates better on a small population"
            )
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
        return trials, through, cohort, enrolled

    def trial_scores(self, version: int) -> DetScores:
        """``version``'s leave-one-out trials (those its calibration is fitted on, with
        today's enrollments) on the back-end it decides with now, and its thresholds:
        what the console's DET view draws. Stores nothing; ``NotEnoughData`` as for
        :meth:`calibrate`, or when the version has no threshold to decide with."""
        cfg = self.config.scoring
        scoring = self.scoring(version)
        backend, _ = scoring.backend(cfg.backend, cfg.min_cohort)
        trials, _, _, _ = self._trials(version)
        if backend == "asnorm+calibrated":
            target, nontarget = (scoring.calibration.llr(t["asnorm"]) for t in (trials.target, trials.nontarget))
        else:
            target, nontarget = trials.target[backend], trials.nontarget[backend]
        speakers = self.store.profiles.count_speakers(version)
        (verify, why), (identify, _) = (self.threshold(scoring, backend, "verify"),
                                        self.threshold(scoring, backend, "identify", max(speakers - 1, 1)))
        if verify is None or identify is None:
            raise NotEnoughData(why)
        return DetScores(version, backend, np.asarray(target), np.asarray(nontarget), verify, identify,
                         trials="leave-one-out trials of the enrolled speakers")

    def calibration(self) -> Calibration | None:
        """The active version's newest calibration, or None."""
        return self.scoring(self.models.active().number).calibration

    def calibration_status(self, version: int) -> dict | None:
        """The newest calibration of ``version`` and how much has been enrolled since."""
        calibration = self.scoring(version).calibration
        if calibration is None:
            return None
        speakers = self.store.profiles.count_speakers(version)
        return {
            "id": calibration.id,
            "created_at": calibration.created_at,
            "speakers_then": calibration.settings.get("speakers_enrolled", calibration.trials["speakers"]),
            "speakers_now": speakers,
            "backends": sorted(calibration.thresholds),
            "centred": bool(calibration.settings.get("centre", False)),
        }

    def decision_status(self, version: int) -> dict:
        """How ``version`` decides now: the back-end (and why, when it is not the configured
        one), each task's threshold and where it comes from, the false-accept rates to
        expect on new speakers with their bounds, likely duplicate identities, and whether
        the population has grown enough since the fit to calibrate again."""
        cfg = self.config.scoring
        scoring = self.scoring(version)
        backend, why = scoring.backend(cfg.backend, cfg.min_cohort)
        speakers = self.store.profiles.count_speakers(version)
        out = {"backend": backend, "why": why, "speakers": speakers}
        for task in ("verify", "identify"):
            threshold, basis = self.threshold(scoring, backend, task, speakers)
            out[f"{task}_threshold"] = threshold
            out[f"{task}_threshold_from"] = basis or "calibration"
        calibration = scoring.calibration
        fit = calibration.fit.get(backend, {}) if calibration is not None else {}
        out["expected_false_accepts"] = {
            task: fit.get(f"{task}_expected") for task in ("verify", "identify") if fit.get(f"{task}_expected")
        }
        out["duplicates"] = calibration.fit.get("duplicates", []) if calibration is not None else []
        out["recalibrate"] = self.needs_calibration(version, speakers)
        return out

    def needs_calibration(self, version: int, speakers: int | None = None) -> bool:
        """Whether the population has changed enough to fit again: no calibration yet and
        ``min_calibration_speakers`` with two or more utterances enrolled, or the number
        of speakers grown or shrunk by ``[scoring] recalibrate_change`` of the number the
        calibration saw."""
        cfg = self.config.scoring
        latest = self.store.registry.latest_calibration(version)  # one query: no scoring state to build
        if latest is None:
            return self.store.profiles.count_speakers(version, at_least=2) >= cfg.min_calibration_speakers
        if speakers is None:
            speakers = self.store.profiles.count_speakers(version)
        then = max(int(latest[2]["settings"].get("speakers_enrolled", latest[2]["trials"]["speakers"])), 1)
        return abs(speakers - then) >= cfg.recalibrate_change * then

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

    def identify(self, source: Source, *, top: int = 5, name: str | None = None) -> Identification:
        """Rank every enrolled speaker against one utterance (1:N, open set).

        Candidates are ranked by cosine; the answer is "unknown" (``decision`` None) when
        the best candidate's score on the deciding back-end is below the identify
        threshold for the current number of speakers, or within ``identify_margin`` of
        the second candidate's.
        """
        if top < 1:
            raise InvalidInput("--top must be at least 1")
        version = self.models.active()
        answering = self.indexes.answering(version.number, self.scoring(version.number))
        if answering != version.number:  # the active version's index is still being built
            version = self.models.get(answering)
        utt, embedding = self._embed_probe(source, name, version)
        return self.identify_embedding(embedding, version, top=top, source=utt.source, speech_s=utt.quality.speech_s)

    def identify_embedding(
        self, embedding: np.ndarray, version: ModelVersion, *, top: int = 5, source: str = "", speech_s: float = 0.0
    ) -> Identification:
        """:meth:`identify` for an embedding made by ``version``'s encoder (a diarization
        cluster's centroid), with the same open-set decision."""
        return self.identify_embeddings(np.asarray(embedding)[None, :], version, top=top, source=source, speech_s=speech_s)[0]

    def identify_embeddings(
        self, embeddings: np.ndarray, version: ModelVersion, *, top: int = 5, source: str = "", speech_s: float = 0.0
    ) -> list[Identification]:
        """:meth:`identify_embedding` for each row of ``embeddings``, the profiles read once."""
        cfg = self.config.scoring
        # The index answers with the scoring state it was built with (while a newer one is
        # indexed in the background, the older one's calibration and thresholds).
        served = self.indexes.index(version.number, self.scoring(version.number))
        scoring, index = served.scoring, served.index
        backend, switched = scoring.backend(cfg.backend, cfg.min_cohort)
        threshold, basis = self.threshold(scoring, backend, "identify", len(index))
        notes = tuple(n for n in (switched, basis if threshold is not None else "") if n)
        answers = []
        for embedding in embeddings:
            hits = tuple(index.search(scoring.centred(embedding), max(top, 2)))
            decision, reason = None, ""
            if not hits:
                reason = "no speaker is enrolled"
            elif threshold is None:
                reason = basis
            elif hits[0].on(backend) < threshold:
                reason = "best score below the threshold"
            elif cfg.identify_margin > 0 and len(hits) > 1 and hits[0].on(backend) - hits[1].on(backend) < cfg.identify_margin:
                reason = "best and second best too close"
            else:
                decision = hits[0].speaker
            answers.append(Identification(source, version.number, speech_s, hits[:top], decision, threshold, backend, reason, notes))
        return answers

    def verify(self, speaker: str, source: Source, *, name: str | None = None, disclose: bool = True) -> Verification:
        """Score one utterance against a claimed speaker (1:1).

        ``disclose=False`` (the service's query keys) answers with the decision alone: no
        scores (they would let a client climb toward acceptance), and a name that is not
        enrolled is rejected like any other, so the answer does not tell whether it is.
        The probe is embedded first either way, so the time taken does not tell either.
        """
        speaker = normalise_speaker_name(speaker)
        cfg = self.config.scoring
        version = self.models.active()
        utt, embedding = self._embed_probe(source, name, version)
        scoring = self.scoring(version.number)
        backend, switched = scoring.backend(cfg.backend, cfg.min_cohort)
        threshold, basis = self.threshold(scoring, backend, "verify")
        notes = tuple(n for n in (switched, basis) if n)
        if not self.store.profiles.has_speaker(speaker):
            if disclose:
                raise UnknownSpeaker(f"speaker {speaker!r} is not enrolled")
            return Verification(
                speaker, utt.source, version.number, utt.quality.speech_s, None, threshold, False, backend=backend, notes=notes
            )
        centroid = self.store.profiles.centroid(speaker, version.number)
        index = CentroidIndex(
            [speaker],
            scoring.centred(centroid.mean[None, :]),
            cohort=scoring.cohort,
            calibration=scoring.calibration,
            prototypes=_own_prototypes(scoring, speaker),
        )
        hit = index.search(scoring.centred(embedding), 1)[0]
        accepted = threshold is not None and hit.on(backend) >= threshold
        if not disclose:
            return Verification(
                speaker, utt.source, version.number, utt.quality.speech_s, None, threshold, accepted, backend=backend, notes=notes
            )
        return Verification(
            speaker, utt.source, version.number, utt.quality.speech_s, hit.score, threshold,
            accepted, hit.normalised, hit.llr, backend, notes,
        )

    def threshold(self, scoring: VersionScoring, backend: str, task: str, gallery: int = 1) -> tuple[float | None, str]:
        """The threshold ``task`` decides with now, and a note on where it comes from.

        A calibrated version: its fitted threshold (for identify, raised as the gallery
        grows past the one it was fitted on). Before any calibration: cosine thresholds
        from the encoder's reference measurement, with a note saying so; an encoder
        without one cannot decide (None, and the note says what to run).
        """
        calibration = scoring.calibration
        if calibration is not None and backend in calibration.thresholds:
            if task == "verify":
                return float(calibration.thresholds[backend]["verify"]), ""
            return calibration.identify_threshold(backend, gallery), ""
        cfg = self.config.scoring
        encoder = self.config.encoder.name
        reference = reference_scores(encoder)
        if reference is None:
            return None, f"not calibrated, and encoder {encoder!r} has no reference scores to decide with: run voiceprint calibrate"
        cut = reference_thresholds(reference, cfg.verify_far, cfg.identify_far, gallery)[task]
        return cut, (
            f"the {task} threshold comes from the reference measurement of encoder {encoder}, not from your "
            f"speakers; a calibration is fitted once {cfg.min_calibration_speakers} speakers with two or more "
            "utterances are enrolled (voiceprint calibrate)"
        )


def _own_prototypes(scoring: VersionScoring, speaker: str) -> tuple[np.ndarray, np.ndarray] | None:
    rows = (scoring.prototypes or {}).get(speaker)
    return None if rows is None or not len(rows) else (np.zeros(len(rows), dtype=np.int64), rows)


