"""Enrollment: an utterance's path from bytes to a committed profile update.

prepare (name, decode, VAD, quality) -> embed under the active version -> commit
(utterance, kept data, embedding and centroid in one transaction, held for review when
it does not sound like the profile) -> feed the drift detector.

An item without a speaker takes the same path up to the commit, which stores it
unlabeled instead (``store.unlabeled``: kept and embedded, in no profile). A named
cluster of those comes back through :meth:`Enroller.enroll_unlabeled`: the quality
check again, an embedding under the active version, the same commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from voiceprint.engine import audio, kept
from voiceprint.engine.audio import Source
from voiceprint.engine.centroids import RunningCentroid
from voiceprint.engine.config import Config
from voiceprint.engine.drift import GenuineScoreDrift
from voiceprint.engine.errors import (
    Clipped, InvalidInput, TooNoisy, UnknownSpeaker, UnknownUtterance, VersionChanged, VoiceprintError,
)
from voiceprint.engine.home import actor
from voiceprint.engine.models import ModelRegistry
from voiceprint.engine.names import check_speaker_name
from voiceprint.engine.results import EnrollmentResult, Outcome, UnlabeledResult
from voiceprint.engine.streaming import pipelined
from voiceprint.storage import ModelVersion, Store

log = logging.getLogger(__name__)

STREAM_BATCH = 64  # utterances prepared and embedded together when they are already waiting
COMMIT_ATTEMPTS = 3  # re-embeddings when a refresh or rollback moves "active" meanwhile

Item = tuple[str | None, Source, str | None]  # speaker (None: unlabeled), audio, display name (defaults to the path)
Prepared = tuple[str | None, audio.Speech] | VoiceprintError


class Enroller:
    """Enroll utterances into the profiles of the active version.

    ``consistency_cut(version)`` gives the cosine below which an utterance is held for
    review (the recognizer's calibrated cut); ``request_refresh(reason)`` queues a
    refresh when genuine scores drift down.
    """

    def __init__(self, store: Store, models: ModelRegistry, config: Config, consistency_cut, request_refresh) -> None:
        self.store, self.models, self.config = store, models, config
        self._consistency_cut = consistency_cut
        self._request_refresh = request_refresh
        delta = config.refresh.drift_delta
        self._drift = GenuineScoreDrift(delta=delta) if delta > 0 else None
        self._drift_lock = threading.Lock()

    def enroll_many(
        self, items: Sequence[Item | VoiceprintError], *, force: bool = False, by: str | None = None
    ) -> list[Outcome]:
        """Enroll ``(speaker, source, name)`` items, one transaction per utterance; an
        item that is already an error (e.g. a malformed stream row) comes back as it is.
        A forced utterance is audited under ``by`` (default: the login name)."""
        return self.embed_and_commit(self.prepare(items, force=force), force=force, by=by)

    def enroll_stream(
        self, items: Iterable[Item | VoiceprintError], *, batch_size: int = STREAM_BATCH, force: bool = False,
        by: str | None = None,
    ) -> Iterator[Outcome]:
        """Enroll items as they arrive; the audio of the next batch is prepared while the
        current one is embedded and committed."""
        return pipelined(
            items,
            lambda batch: self.prepare(batch, force=force),
            lambda batch: self.embed_and_commit(batch, force=force, by=by),
            batch_size=batch_size,
        )

    def prepare(self, items: Sequence[Item | VoiceprintError], *, force: bool = False) -> list[Prepared]:
        """Check names, load audio (decode, resample, VAD) and judge its quality:
        everything before the encoder."""
        prepared: list = list(items)
        speakers = {}
        for i, item in enumerate(items):
            if not isinstance(item, VoiceprintError):
                try:
                    speakers[i] = None if item[0] is None else check_speaker_name(item[0])
                except InvalidInput as exc:
                    prepared[i] = exc
        todo = list(speakers)
        loaded = audio.load_many([items[i][1] for i in todo], self.config.audio, names=[items[i][2] for i in todo])
        for i, speech in zip(todo, loaded):
            if not isinstance(speech, VoiceprintError) and not force:
                speech = self._quality_problem(speech.quality, speech.source) or speech
            prepared[i] = speech if isinstance(speech, VoiceprintError) else (speakers[i], speech)
        return prepared

    def preview(self, speaker: str, source: Source, *, name: str | None = None) -> str:
        """The feedback enrolling ``source`` would get now, storing nothing: ``OK``,
        ``INCONSISTENT_SPEAKER`` (by the commit's own rule and cut), or raises the error the
        enrollment would raise (``TooShort``, ``Clipped``, ...). Live enrollment shows it
        while the person is still speaking."""
        prepared = self.prepare([(speaker, source, name)])[0]
        if isinstance(prepared, VoiceprintError):
            raise prepared
        version = self.models.active()
        cut = self._cut(version.number, False)
        if cut is None:
            return "OK"
        try:
            centroid = self.store.profiles.centroid(speaker, version.number)
        except UnknownSpeaker:  # a new speaker, or only held utterances so far: no profile to compare with
            return "OK"
        embedding = self.models.embedder(version).embed([prepared[1].samples])[0]
        running = RunningCentroid(dim=centroid.sum.size, sum=centroid.sum, count=centroid.count)
        admitted, _ = running.admits(embedding, cut, self.config.enrollment.consistency_min_count)
        return "OK" if admitted else "INCONSISTENT_SPEAKER"

    def _quality_problem(self, q: audio.Quality, source: str) -> VoiceprintError | None:
        """CLIPPED or TOO_NOISY for speech that would blur a profile, else None."""
        cfg = self.config.enrollment
        if q.clipping_ratio > cfg.max_clipping_ratio:
            return Clipped(
                f"{source}: {q.clipping_ratio:.1%} of the samples are clipped "
                f"(at most {cfg.max_clipping_ratio:.1%}); record at a lower level"
            )
        if q.snr_db < cfg.min_snr_db:
            return TooNoisy(
                f"{source}: estimated SNR {q.snr_db:.1f} dB, at least {cfg.min_snr_db:g} dB needed; "
                "record somewhere quieter"
            )
        return None

    def embed_and_commit(self, prepared: Sequence[Prepared], *, force: bool = False, by: str | None = None) -> list[Outcome]:
        results: list = list(prepared)
        ready = [(i, p) for i, p in enumerate(prepared) if not isinstance(p, VoiceprintError)]
        if ready:
            version = self.models.active()
            embeddings = self.models.embedder(version).embed([speech.samples for _, (_, speech) in ready])
            cut = self._cut(version.number, force)  # once per batch: it reads the calibration
            # Forcing skips the only guard against a poisoned profile, so it is audited.
            forced_by = (by or actor()) if force else None
            for (i, (speaker, speech)), embedding in zip(ready, embeddings):
                try:
                    if speaker is None:
                        results[i] = self._store_unlabeled(speech, embedding, version)
                    else:
                        results[i] = self._commit(speaker, speech, embedding, version, cut=cut, forced_by=forced_by)
                except VoiceprintError as exc:
                    results[i] = exc
        return results

    def _store_unlabeled(self, utt: audio.Speech, embedding: np.ndarray, version: ModelVersion) -> UnlabeledResult:
        """Keep and embed an utterance that came without a speaker (in no profile)."""
        return self._under_active(utt, embedding, version, self._store_unlabeled_under)

    def _store_unlabeled_under(self, utt: audio.Speech, embedding: np.ndarray, version: ModelVersion) -> UnlabeledResult:
        data, codec, rate = kept.encode(utt.samples, self.models.embedder(version), self.config.privacy.keep)
        stored = self.store.unlabeled.add(
            version=version.number, source=utt.source, content_sha256=utt.content_sha256,
            duration_s=utt.quality.duration_s, speech_s=utt.quality.speech_s, quality=utt.quality.to_dict(),
            audio=data, codec=codec, sample_rate=rate, embedding=embedding,
        )
        return UnlabeledResult(stored.id, utt.source, version.number, utt.quality.speech_s, utt.quality.to_dict())

    def enroll_unlabeled(self, speaker: str, utterance_id: int, *, force: bool = False, by: str | None = None) -> Outcome:
        """Enroll a stored unlabeled utterance under ``speaker`` (a named cluster's member)
        by the normal path: the quality check on what was measured when it arrived, an
        embedding under the active version, the commit with its consistency and duplicate
        checks, which also deletes the unlabeled row. A refused one stays unlabeled and
        comes back as the error."""
        try:
            speaker = check_speaker_name(speaker)
            record = self.store.unlabeled.records([utterance_id])
            if not record:
                raise UnknownUtterance(f"no unlabeled utterance {utterance_id}")
            record, version = record[0], self.models.active()
            quality = audio.Quality(**record.quality)
            problem = None if force else self._quality_problem(quality, record.source)
            if problem is not None:
                return problem
            stored = self.store.unlabeled.kept([utterance_id])[utterance_id]
            utt = _Kept(record.source, record.content_sha256, quality, stored, utterance_id)
            return self._commit(speaker, utt, utt.embed(self.models.embedder(version)), version,
                                cut=self._cut(version.number, force), forced_by=(by or actor()) if force else None)
        except VoiceprintError as exc:
            return exc

    def _cut(self, version: int, force: bool) -> float | None:
        """The consistency cosine for enrollments under ``version``; None: no check."""
        if force or not self.config.enrollment.consistency_check:
            return None
        return self._consistency_cut(version)

    def _commit(
        self, speaker: str, utt: audio.Speech | _Kept, embedding: np.ndarray, version: ModelVersion, *,
        cut: float | None, forced_by: str | None,
    ) -> EnrollmentResult:
        def write(utt, embedding, under: ModelVersion) -> EnrollmentResult:
            # The batch's cut belongs to its version; a retry under another reads that one's.
            here = cut if under.number == version.number else self._cut(under.number, forced_by is not None)
            return self._commit_under(speaker, utt, embedding, under, cut=here, forced_by=forced_by)

        return self._under_active(utt, embedding, version, write)

    def _under_active(self, utt: audio.Speech | _Kept, embedding: np.ndarray, version: ModelVersion, write: Callable):
        """``write(utt, embedding, version)``, which stores under ``version`` only while it
        is active; when a refresh or rollback moved "active" after the utterance was
        embedded, it is embedded again under the new version (so that version holds it
        too) and written again, up to COMMIT_ATTEMPTS times."""
        for _ in range(COMMIT_ATTEMPTS):
            try:
                return write(utt, embedding, version)
            except VersionChanged:
                version = self.models.active()
                embedder = self.models.embedder(version)
                embedding = utt.embed(embedder) if isinstance(utt, _Kept) else embedder.embed([utt.samples])[0]
        return write(utt, embedding, version)

    def _commit_under(
        self, speaker: str, utt: audio.Speech | _Kept, embedding: np.ndarray, version: ModelVersion, *,
        cut: float | None, forced_by: str | None,
    ) -> EnrollmentResult:
        cfg = self.config.enrollment
        if isinstance(utt, _Kept):  # a named cluster's member: what was kept moves as it is
            data, codec, rate = utt.stored
        else:
            data, codec, rate = kept.encode(utt.samples, self.models.embedder(version), self.config.privacy.keep)
        stored = self.store.profiles.enroll(
            speaker=speaker,
            version=version.number,
            source=utt.source,
            content_sha256=utt.content_sha256,
            duration_s=utt.quality.duration_s,
            speech_s=utt.quality.speech_s,
            quality=utt.quality.to_dict(),
            audio=data,
            codec=codec,
            sample_rate=rate,
            embedding=embedding,
            expect_active=True,
            consistency_cut=cut,
            consistency_min_count=cfg.consistency_min_count,
            forced_by=forced_by,
            duplicate_cut=cfg.duplicate_cosine or None,
            unlabeled_id=utt.unlabeled_id if isinstance(utt, _Kept) else None,
        )
        if stored.similarity_before is not None:
            # Held utterances count too: many of them at once (a new microphone, a broken
            # labelling job) is exactly the fall the detector is there to report.
            self._watch_drift(stored.similarity_before)
        return EnrollmentResult(
            speaker=speaker,
            utterance_id=stored.utterance.id,
            source=utt.source,
            version=version.number,
            speech_s=utt.quality.speech_s,
            quality=utt.quality.to_dict(),
            similarity_before=stored.similarity_before,
            count=stored.count,
            feedback="INCONSISTENT_SPEAKER" if stored.pending else "OK",
            profile_speech_s=stored.speech_s,
            progress=min(1.0, stored.speech_s / cfg.required_speech_s) if cfg.required_speech_s > 0 else 1.0,
        )

    def _watch_drift(self, genuine_score: float) -> None:
        """Feed the drift detector; on a fall in genuine scores, queue one refresh request."""
        if self._drift is None:
            return
        with self._drift_lock:
            fell = self._drift.update(genuine_score).drift_detected
            mean = self._drift.mean
        if fell and not self.store.jobs.list_jobs(limit=1, status="queued"):
            job = self._request_refresh(f"drift: genuine enrollment scores fell (ADWIN window mean now {mean:.3f})")
            log.warning("genuine scores drifted down (mean %.3f); refresh requested as job %d", mean, job.id)

    def accept_utterance(self, utterance_id: int) -> dict:
        """Move a pending utterance into its speaker's profile (a person checked it).

        If the active version changed since it was held, it is embedded under the active
        version first, so the profile that scores next includes it.
        """
        active = self.models.active()
        extra = {}
        if active.number not in self.store.profiles.embedded_versions(utterance_id):
            embedder = self.models.embedder(active)
            data = kept.decode(*self.store.profiles.utterance_audio(utterance_id), frontend=embedder.encoder.frontend)
            extra[active.number] = kept.embed(embedder, [data])[0]
        record = self.store.profiles.accept_utterance(utterance_id, extra, actor=actor())
        return {"utterance": record.id, "speaker": record.speaker, "status": record.status}


@dataclass(frozen=True, eq=False)
class _Kept:
    """A stored unlabeled utterance on its way into a profile: what was kept of it
    (speech or features, as ``[privacy] keep`` was when it arrived) stands in for the
    decoded speech of a new enrollment."""

    source: str
    content_sha256: str
    quality: audio.Quality
    stored: tuple[bytes, str, int]  # (data, codec, sample_rate)
    unlabeled_id: int

    def embed(self, embedder) -> np.ndarray:
        return kept.embed(embedder, [kept.decode(*self.stored, frontend=embedder.encoder.frontend)])[0]
