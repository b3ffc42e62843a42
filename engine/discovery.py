"""New speakers found in the unlabeled stream: clusters proposed, named, or deleted.

Utterances that arrive without a speaker are kept and embedded like enrollments, but in
no profile (:mod:`voiceprint.storage.unlabeled`). Here they are grouped by the active
version: agglomerative clustering of their embeddings (the same
:func:`voiceprint.engine.diarization.cluster` diarization uses, at ``[unlabeled]
threshold``). Each utterance gets the version's own open-set identify decision
(:meth:`Recognizer.identify_embeddings`, so "not enrolled" carries the false-accept
rate measured for identify); a cluster most of whose utterances are identified as one
enrolled speaker is *known*, and one that is not, with enough utterances and speech,
is *proposed* as a new speaker.

The clusters are recomputed from the stored embeddings whenever they are asked for: the
expensive part, embedding, happened once on arrival, and grouping a few thousand
embeddings takes milliseconds (bench/discovery.py). Recomputing keeps the answer
independent of the order utterances arrived in, which an online clusterer's is not. A
cluster is numbered by its first (lowest) utterance id, so its number stays while later
utterances join it; if two clusters merge, the later number disappears.

Naming a cluster enrolls each of its utterances by the normal path
(:meth:`Enroller.enroll_unlabeled`): quality and consistency checks included; refused
ones stay unlabeled. Unlabeled utterances never serve a refresh: nothing has shown that
training on proposed labels helps (README, "New speakers in the unlabeled stream").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np

from voiceprint.engine import diarization, kept
from voiceprint.engine.config import Config
from voiceprint.engine.enrollment import Enroller
from voiceprint.engine.errors import UnknownCluster, VoiceprintError
from voiceprint.engine.home import actor
from voiceprint.engine.models import ModelRegistry
from voiceprint.engine.recognition import Recognizer
from voiceprint.engine.results import Cluster, EnrollmentResult, Identification
from voiceprint.storage import ModelVersion, Store

log = logging.getLogger(__name__)

CATCH_UP_BATCH = 64  # unlabeled utterances embedded together under a newly active version
STRICTER = 0.8  # the stability check clusters again at this fraction of the threshold
NEAREST = 5  # enrolled speakers looked up per cluster centroid (its candidate is among them)


class Discovery:
    def __init__(self, store: Store, models: ModelRegistry, recognizer: Recognizer, enroller: Enroller, config: Config) -> None:
        self.store, self.models, self.recognizer, self.enroller, self.config = store, models, recognizer, enroller, config

    def clusters(self, *, on_progress: Callable[[int, int, str], None] | None = None) -> list[Cluster]:
        """The unlabeled utterances grouped by the active version, by cluster number.

        Utterances stored under an earlier active version are embedded under this one
        first (once: the embeddings are stored).
        """
        version = self.models.active()
        self._catch_up(version, on_progress)
        ids, x = self.store.unlabeled.embeddings(version.number)
        if not ids:
            return []
        speech = {r.id: r.speech_s for r in self.store.unlabeled.records()}  # no IN list of every id
        threshold = self.config.unlabeled.threshold
        labels = diarization.cluster(x, threshold=threshold)
        # The same utterances grouped at a stricter threshold: a cluster that falls apart
        # there is held together by a few borderline links (often two people).
        strict = diarization.cluster(x, threshold=threshold * STRICTER)
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        # Each utterance gets the identify decision it would get as a probe: the threshold
        # is calibrated for single utterances, and a cluster's centroid, an average of
        # many, scores higher against everyone (a new voice near an enrolled one passes).
        decided = [answer.decision for answer in self.recognizer.identify_embeddings(unit, version, top=1)]
        groups = [np.flatnonzero(labels == k) for k in range(int(labels.max()) + 1)]
        centroids = np.stack([_unit(unit[members].mean(axis=0)) for members in groups])
        nearest = self.recognizer.identify_embeddings(centroids, version, top=NEAREST)
        return [
            self._judge([ids[i] for i in members], unit[members], centroids[k], [decided[i] for i in members], nearest[k],
                        speech, float(np.bincount(strict[members]).max() / len(members)))
            for k, members in enumerate(groups)
        ]

    def _judge(
        self, members: list[int], vectors: np.ndarray, centroid: np.ndarray, decided: list[str | None],
        answer: Identification, speech: dict[int, float], stability: float,
    ) -> Cluster:
        cfg = self.config.unlabeled
        votes = Counter(d for d in decided if d is not None)
        # The speaker most of its utterances are identified as; else the nearest to its centroid.
        candidate = votes.most_common(1)[0][0] if votes else answer.candidates[0].speaker if answer.candidates else None
        recognised = votes.get(candidate, 0) / len(members)
        hit = next((h for h in answer.candidates if h.speaker == candidate), None)
        score = None if hit is None else hit.on(answer.backend)
        seconds = float(sum(speech.get(i, 0.0) for i in members))
        if recognised > 0.5:
            status = "known"
        elif len(members) < cfg.min_utterances or seconds < cfg.min_speech_s:
            status = "small"
        else:
            status = "proposed"
        return Cluster(
            number=members[0], utterances=tuple(members), speech_s=round(seconds, 3),
            cohesion=round(float(np.mean(vectors @ centroid)), 4), stability=round(stability, 4), status=status,
            candidate=candidate, recognised=round(recognised, 4),
            score=None if score is None else round(float(score), 4),
            threshold=answer.threshold, backend=answer.backend,
        )

    def cluster(self, number: int) -> Cluster:
        """Cluster ``number`` as :meth:`clusters` finds it now; :class:`UnknownCluster` if none."""
        for found in self.clusters():
            if found.number == number:
                return found
        raise UnknownCluster(
            f"no cluster {number} among the unlabeled utterances (it may have joined an earlier one: "
            "list them again with `voiceprint clusters`)"
        )

    def name_cluster(self, number: int, speaker: str, *, force: bool = False, by: str | None = None) -> dict:
        """Enroll every utterance of cluster ``number`` under ``speaker`` (created if new) by
        the normal enrollment path. Returns the cluster and, per utterance, what happened:
        ``enrolled`` (in the profile), ``held`` (stored for review: it did not sound like
        the profile), ``refused`` (still unlabeled, with the error code and why)."""
        found = self.cluster(number)
        enrolled, held, refused = [], [], []
        for utterance_id in found.utterances:
            outcome = self.enroller.enroll_unlabeled(speaker, utterance_id, force=force, by=by)
            if isinstance(outcome, VoiceprintError):
                refused.append({"unlabeled": utterance_id, "error": outcome.code, "message": str(outcome)})
            elif isinstance(outcome, EnrollmentResult):
                (enrolled if outcome.feedback == "OK" else held).append(
                    {"unlabeled": utterance_id, "utterance": outcome.utterance_id, "feedback": outcome.feedback})
        log.info("cluster %d named: %d enrolled, %d held, %d refused", number, len(enrolled), len(held), len(refused))
        return {"cluster": number, "speaker": speaker, "enrolled": enrolled, "held": held, "refused": refused}

    def delete_cluster(self, number: int, *, by: str | None = None) -> dict:
        """Erase every utterance of cluster ``number`` (kept speech and embeddings)."""
        found = self.cluster(number)
        return {"cluster": number, **self.store.unlabeled.erase(found.utterances, actor=by or actor())}

    def _catch_up(self, version: ModelVersion, on_progress: Callable[[int, int, str], None] | None) -> None:
        missing = self.store.unlabeled.missing(version.number)
        if not missing:
            return
        embedder = self.models.embedder(version)
        for begin in range(0, len(missing), CATCH_UP_BATCH):
            stored = self.store.unlabeled.kept(missing[begin : begin + CATCH_UP_BATCH])
            data = [kept.decode(*stored[i], frontend=embedder.encoder.frontend) for i in stored]
            self.store.unlabeled.add_embeddings(version.number, list(zip(stored, kept.embed(embedder, data))))
            if on_progress is not None:
                on_progress(min(begin + CATCH_UP_BATCH, len(missing)), len(missing), "embedding unlabeled utterances")
        log.info("embedded %d unlabeled utterances under version %d", len(missing), version.number)


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)
