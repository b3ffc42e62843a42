"""The Engine facade: one object for the CLI, the service and the tests.

It ties the path of an utterance together (audio -> features -> encoder -> embedding)
with the store (utterance, embedding and centroid written in one transaction) and the
model registry (which version is active, and its verified checkpoint).
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
import time
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from engine import audio
from engine.checkpoints import load_checkpoint, save_checkpoint
from engine.config import Config, load_config
from engine.drift import GenuineScoreDrift
from engine.embedder import Embedder
from engine.encoders import create_encoder
from engine import refresh as refreshing
from engine.centroids import prototypes
from engine.errors import (
    Clipped,
    InvalidInput,
    NotEnoughData,
    NotInitialised,
    TooNoisy,
    UnknownSpeaker,
    VersionChanged,
    VoiceprintError,
)
from engine.index import CentroidIndex, Hit
from engine.scoring import Calibration, Cohort, cosine, fit_calibration, leave_one_out_trials
from engine.streaming import pipelined
from storage import Job, ModelVersion, SpeakerSummary, Store

log = logging.getLogger(__name__)

DEFAULT_HOME = "voiceprint-home"
CONFIG_FILE = "config.toml"
DB_FILE = "voiceprint.db"
MAX_SPEAKER_NAME = 200
STREAM_BATCH = 64  # utterances prepared and embedded together when they are already waiting

Source = str | os.PathLike | bytes
Item = tuple[str, Source, str | None]  # speaker, audio, display name (defaults to the path)


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """``home``, else ``$VOICEPRINT_HOME``, else ``./voiceprint-home``."""
    return Path(home or os.environ.get("VOICEPRINT_HOME") or DEFAULT_HOME).expanduser().resolve()


def resolve_db(db: str | None, home: Path) -> str:
    """``db``, else ``$VOICEPRINT_DATABASE_URL``, else SQLite inside the home folder."""
    return db or os.environ.get("VOICEPRINT_DATABASE_URL") or f"sqlite:///{home / DB_FILE}"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # not a URL at all; the store reports that with the URL in the message
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser()
    return None


def ensure_sqlite_folder(url: str) -> None:
    """SQLite creates its file but not the folder it lives in; do that for it."""
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def check_speaker_name(name: str) -> str:
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InvalidInput("speaker name is empty")
    if len(cleaned) > MAX_SPEAKER_NAME:
        raise InvalidInput(f"speaker name is longer than {MAX_SPEAKER_NAME} characters")
    if any(not ch.isprintable() for ch in cleaned):
        raise InvalidInput(f"speaker name {cleaned!r} contains control characters")
    return cleaned


@dataclass(frozen=True)
class EnrollmentResult:
    """Feedback for one enrolled utterance."""

    speaker: str
    utterance_id: int
    source: str
    version: int
    speech_s: float
    quality: dict
    similarity_before: float | None  # cosine to the speaker's centroid before this utterance
    count: int  # utterances in the speaker's profile now
    feedback: str = "OK"  # or "INCONSISTENT_SPEAKER": stored pending review, outside the profile
    profile_speech_s: float = 0.0  # speech in the speaker's profile now
    progress: float = 0.0  # profile_speech_s / [enrollment] required_speech_s, at most 1


@dataclass(frozen=True)
class Identification:
    source: str
    version: int
    speech_s: float
    candidates: tuple[Hit, ...]  # best first, by the deciding back-end's score
    decision: str | None  # the best speaker, or None for "unknown"
    threshold: float  # on the deciding back-end's scale
    backend: str = "cosine"  # the back-end that decided (cosine until the version is calibrated)
    reason: str = ""  # why "unknown": below the threshold, or too close to the second best


@dataclass(frozen=True)
class Verification:
    speaker: str
    source: str
    version: int
    speech_s: float
    score: float  # raw cosine
    threshold: float  # on the deciding back-end's scale
    accepted: bool
    normalised: float | None = None
    llr: float | None = None
    backend: str = "cosine"


class _VersionScoring:
    """What scoring a version needs beyond its centroids: the AS-norm cohort, the newest
    calibration and, cached, every profile's enrollment-side cohort statistics."""

    def __init__(self, cohort: Cohort | None, calibration: Calibration | None, protos) -> None:
        self.cohort = cohort
        self.calibration = calibration
        self.prototypes = protos  # {speaker: [k, D]} or None
        self._names: list[str] = []
        self._centroids = np.zeros((0, 0), dtype=np.float32)
        self._stats = (np.zeros(0), np.zeros(0))
        self._lock = threading.Lock()  # the service scores from several threads

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


Outcome = EnrollmentResult | VoiceprintError


class Engine:
    """Enroll, identify and verify against a persistent store.

    Use :meth:`init` once to create a home folder and database, then :meth:`open`::

        from engine import Engine
        with Engine.open(home="voiceprint-home") as eng:
            eng.enroll("alice", "a1.wav")
            eng.identify("unknown.wav", top=5).decision
    """

    def __init__(self, home: Path, store: Store, config: Config) -> None:
        self.home = home
        self.store = store
        self.config = config
        self._embedders: dict[int, Embedder] = {}
        self._lock = threading.Lock()
        delta = config.refresh.drift_delta
        self._drift = GenuineScoreDrift(delta=delta) if delta > 0 else None
        self._drift_lock = threading.Lock()
        self._scoring: dict[int, tuple[tuple, _VersionScoring]] = {}

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def init(cls, home: str | os.PathLike | None = None, db: str | None = None) -> Engine:
        """Create the home folder, bring the database to the newest schema, and make the
        pretrained encoder version 1 (active) unless a version already exists."""
        home_path = resolve_home(home)
        home_path.mkdir(parents=True, exist_ok=True)
        config = load_config(home_path / CONFIG_FILE)
        url = resolve_db(db, home_path)
        ensure_sqlite_folder(url)
        store = Store(url)
        try:
            store.upgrade()
            if not store.list_versions():
                cls._create_first_version(home_path, store, config)
        except BaseException:
            store.close()
            raise
        return cls(home_path, store, config)

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, db: str | None = None) -> Engine:
        """Open an initialised home/database; errors say which command fixes what."""
        home_path = resolve_home(home)
        config = load_config(home_path / CONFIG_FILE)
        url = resolve_db(db, home_path)
        path = sqlite_file(url)
        if path is not None and not path.exists():
            # Opening would create an empty database file as a side effect.
            raise NotInitialised(f"no database at {path}: run `voiceprint init` (or pass --home/--db)")
        store = Store(url)
        try:
            store.check_schema()
            store.active_version()
        except BaseException:
            store.close()
            raise
        return cls(home_path, store, config)

    @staticmethod
    def _create_first_version(home: Path, store: Store, config: Config) -> None:
        encoder = create_encoder(config.encoder.name, pretrained=True)
        relative = Path("checkpoints") / "v0001.pt"
        sha = save_checkpoint(encoder.state_dict(), home / relative)
        version = store.create_version(
            encoder=config.encoder.name,
            config=config.to_dict(),
            checkpoint=str(relative),
            checkpoint_sha256=sha,
            note="pretrained weights shipped with resemblyzer",
        )
        store.set_alias("active", version.number, actor=actor(), reason="init")

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- models ------------------------------------------------------------------------

    def active_version(self) -> ModelVersion:
        return self.store.active_version()

    def versions(self) -> list[ModelVersion]:
        return self.store.list_versions()

    def embedder(self, version: ModelVersion) -> Embedder:
        """The (cached) embedder of a model version, its checkpoint verified by sha256."""
        with self._lock:
            if version.number not in self._embedders:
                path = Path(version.checkpoint)
                if not path.is_absolute():
                    path = self.home / path
                encoder = create_encoder(version.encoder)
                encoder.load_state_dict(load_checkpoint(path, version.checkpoint_sha256))
                self._embedders[version.number] = Embedder(
                    encoder, device=self.config.encoder.device, batch_windows=self.config.encoder.batch_windows
                )
            return self._embedders[version.number]

    # -- enrollment --------------------------------------------------------------------

    def enroll(self, speaker: str, source: Source, *, name: str | None = None, force: bool = False) -> EnrollmentResult:
        """Enroll one utterance; raises a :class:`VoiceprintError` and stores nothing on bad input.

        ``force`` skips the clipping, noise and consistency checks (a person vouches for it).
        """
        result = self.enroll_many([(speaker, source, name)], force=force)[0]
        if isinstance(result, VoiceprintError):
            raise result
        return result

    def enroll_many(self, items: Sequence[Item | VoiceprintError], *, force: bool = False) -> list[Outcome]:
        """Enroll ``(speaker, source, name)`` items, one transaction per utterance.

        Audio is decoded and embedded in one batch for speed, then each utterance is
        committed on its own, so one bad item costs only itself. Results come back in
        order: an :class:`EnrollmentResult` or the error that item raised. An item that
        is already an error (e.g. a malformed stream row) comes back as it is.
        """
        return self._embed_and_commit(self._prepare(items, force=force), force=force)

    def enroll_stream(
        self, items: Iterable[Item | VoiceprintError], *, batch_size: int = STREAM_BATCH, force: bool = False
    ) -> Iterator[Outcome]:
        """Enroll items as they arrive from an iterable (a pipe, a socket, a file).

        Each result is yielded as soon as its transaction has committed. Items that are
        already waiting are batched (up to ``batch_size``) and the audio of the next
        batch is prepared while the current one is embedded and committed.
        """
        return pipelined(
            items,
            lambda batch: self._prepare(batch, force=force),
            lambda batch: self._embed_and_commit(batch, force=force),
            batch_size=batch_size,
        )

    def _prepare(self, items: Sequence[Item | VoiceprintError], *, force: bool = False) -> list[tuple[str, audio.Speech] | VoiceprintError]:
        """Check names, load audio (decode, resample, VAD) and judge its quality:
        everything before the encoder."""
        prepared: list = list(items)
        speakers = {}
        for i, item in enumerate(items):
            if not isinstance(item, VoiceprintError):
                try:
                    speakers[i] = check_speaker_name(item[0])
                except InvalidInput as exc:
                    prepared[i] = exc
        todo = list(speakers)
        loaded = audio.load_many([items[i][1] for i in todo], self.config.audio, names=[items[i][2] for i in todo])
        for i, speech in zip(todo, loaded):
            if not isinstance(speech, VoiceprintError) and not force:
                speech = self._quality_problem(speech) or speech
            prepared[i] = speech if isinstance(speech, VoiceprintError) else (speakers[i], speech)
        return prepared

    def _quality_problem(self, speech: audio.Speech) -> VoiceprintError | None:
        """CLIPPED or TOO_NOISY for speech that would blur a profile, else None."""
        cfg, q = self.config.enrollment, speech.quality
        if q.clipping_ratio > cfg.max_clipping_ratio:
            return Clipped(
                f"{speech.source}: {q.clipping_ratio:.1%} of the samples are clipped "
                f"(at most {cfg.max_clipping_ratio:.1%}); record at a lower level"
            )
        if q.snr_db < cfg.min_snr_db:
            return TooNoisy(
                f"{speech.source}: estimated SNR {q.snr_db:.1f} dB, at least {cfg.min_snr_db:g} dB needed; "
                "record somewhere quieter"
            )
        return None

    def _embed_and_commit(self, prepared: Sequence[tuple[str, audio.Speech] | VoiceprintError], *, force: bool = False) -> list[Outcome]:
        results: list = list(prepared)
        ready = [(i, p) for i, p in enumerate(prepared) if not isinstance(p, VoiceprintError)]
        if ready:
            version = self.active_version()
            embeddings = self.embedder(version).embed([speech.samples for _, (_, speech) in ready])
            cut = self._consistency_cut(version.number, force)  # once per batch: it reads the calibration
            for (i, (speaker, speech)), embedding in zip(ready, embeddings):
                try:
                    results[i] = self._commit(speaker, speech, embedding, version.number, cut=cut, force=force)
                except VoiceprintError as exc:
                    results[i] = exc
        return results

    def _commit(
        self, speaker: str, utt: audio.Speech, embedding: np.ndarray, version: int, *, cut: float | None, force: bool
    ) -> EnrollmentResult:
        for _ in range(3):
            try:
                return self._commit_under(speaker, utt, embedding, version, cut=cut)
            except VersionChanged:
                # A refresh or rollback moved "active" after this utterance was embedded:
                # embed it again under the new version so that version holds it too.
                active = self.active_version()
                embedding, version = self.embedder(active).embed([utt.samples])[0], active.number
                cut = self._consistency_cut(version, force)
        return self._commit_under(speaker, utt, embedding, version, cut=cut)

    def _consistency_cut(self, version: int, force: bool) -> float | None:
        """The consistency cosine for enrollments under ``version``; None: no check."""
        if force or not self.config.enrollment.consistency_check:
            return None
        return self._consistency_threshold(version)

    def _commit_under(self, speaker: str, utt: audio.Speech, embedding: np.ndarray, version: int, *, cut: float | None) -> EnrollmentResult:
        cfg = self.config.enrollment
        hold = None
        if cut is not None:

            def hold(previous_mean: np.ndarray | None, count: int) -> bool:
                return (
                    previous_mean is not None
                    and count >= cfg.consistency_min_count
                    and float(cosine(embedding, previous_mean[None, :])[0]) < cut
                )

        if self.config.privacy.keep == "features":
            # No playable recording is kept: replay and re-embedding read the encoder's
            # input features instead, which depend on its frontend only, not on its weights.
            embedder = self.embedder(self.store.get_version(version))
            kept = audio.encode_features(embedder.features(utt.samples))
            codec, rate = audio.features_codec(embedder.encoder.frontend), embedder.frontend.sample_rate
        else:
            kept, codec, rate = audio.encode_flac(utt.samples), "flac", audio.SAMPLE_RATE
        stored = self.store.enroll(
            speaker=speaker,
            version=version,
            source=utt.source,
            content_sha256=utt.content_sha256,
            duration_s=utt.quality.duration_s,
            speech_s=utt.quality.speech_s,
            quality=utt.quality.to_dict(),
            audio=kept,
            codec=codec,
            sample_rate=rate,
            embedding=embedding,
            expect_active=True,
            hold=hold,
        )
        before = None
        if stored.previous_mean is not None:
            before = float(cosine(embedding, stored.previous_mean[None, :])[0])
            # Held utterances count too: many of them at once (a new microphone, a broken
            # labelling job) is exactly the fall the detector is there to report.
            self._watch_drift(before)
        return EnrollmentResult(
            speaker=speaker,
            utterance_id=stored.utterance.id,
            source=utt.source,
            version=version,
            speech_s=utt.quality.speech_s,
            quality=utt.quality.to_dict(),
            similarity_before=before,
            count=stored.count,
            feedback="INCONSISTENT_SPEAKER" if stored.pending else "OK",
            profile_speech_s=stored.speech_s,
            progress=min(1.0, stored.speech_s / cfg.required_speech_s) if cfg.required_speech_s > 0 else 1.0,
        )

    def _consistency_threshold(self, version: int) -> float:
        """The cosine below which a new utterance does not sound like its profile: set at
        ``consistency_hold_rate`` of the version's genuine calibration trials, else the
        configured cut."""
        calibration = self._version_scoring(version).calibration
        if calibration is not None and "consistency" in calibration.thresholds.get("cosine", {}):
            return float(calibration.thresholds["cosine"]["consistency"])
        return self.config.enrollment.consistency_threshold

    def accept_utterance(self, utterance_id: int) -> dict:
        """Move a pending utterance into its speaker's profile (a person checked it).

        If the active version changed since it was held, it is embedded under the active
        version first, so the profile that scores next includes it.
        """
        active = self.active_version()
        extra = {}
        if active.number not in self.store.embedded_versions(utterance_id):
            embedder = self.embedder(active)
            kept = audio.decode_stored(*self.store.utterance_audio(utterance_id), frontend=embedder.encoder.frontend)
            # Kept audio decodes to a waveform (1-D), kept features to [frames, dims].
            extra[active.number] = (embedder.embed if kept.ndim == 1 else embedder.embed_features)([kept])[0]
        record = self.store.accept_utterance(utterance_id, extra)
        return {"utterance": record.id, "speaker": record.speaker, "status": record.status}

    def remove_utterance(self, utterance_id: int) -> dict:
        """Delete an utterance and take it out of its speaker's profile under every version."""
        record = self.store.remove_utterance(utterance_id)
        return {"utterance": record.id, "speaker": record.speaker, "removed": True, "was": record.status}

    def erase_speaker(self, speaker: str, *, by: str | None = None) -> dict:
        """Delete everything stored about ``speaker`` (see :meth:`storage.Store.erase_speaker`).

        The audit log keeps only that an erasure happened. Returns the counts removed and
        the versions whose training may have seen the speaker (``trained_into``).
        ``by`` names who asked, for the audit log (default: the login name).
        """
        speaker = check_speaker_name(speaker)
        # Cached cohorts are keyed by the erasure count (_version_scoring), so this process
        # and every other one rebuild theirs without the speaker's embeddings.
        result = self.store.erase_speaker(speaker, actor=by or actor())
        return {"speaker": speaker, "erased": True, **result}

    def _watch_drift(self, genuine_score: float) -> None:
        """Feed the drift detector; on a fall in genuine scores, queue one refresh request."""
        if self._drift is None:
            return
        with self._drift_lock:
            fell = self._drift.update(genuine_score).drift_detected
            mean = self._drift.mean
        if fell and not self.store.list_jobs(limit=1, status="queued"):
            job = self.request_refresh(f"drift: genuine enrollment scores fell (ADWIN window mean now {mean:.3f})")
            log.warning("genuine scores drifted down (mean %.3f); refresh requested as job %d", mean, job.id)

    def speakers(self) -> list[SpeakerSummary]:
        return self.store.speakers()

    # -- refresh and rollback ----------------------------------------------------------

    def refresh(self, *, dry_run: bool = False, reason: str = "manual", progress: bool = False) -> refreshing.RefreshReport:
        """Fine-tune a candidate from the active version, gate it, promote or reject it.

        Synchronous. Raises :class:`~engine.errors.RefreshBusy` when another process is
        refreshing or rolling back. See :mod:`engine.refresh` for the steps.
        """
        return refreshing.run(self, dry_run=dry_run, reason=reason, progress=progress)

    def rollback(self, number: int, *, reason: str = "rollback", progress: bool = False) -> dict:
        """Make version ``number`` active again.

        Its checkpoint is verified first; utterances enrolled since it was active are
        embedded under it, so its centroids cover every speaker; then the alias moves (and
        the move is appended to the alias history). Nothing changes on any error.
        """
        started = time.perf_counter()
        target = self.store.get_version(number)
        self.embedder(target)  # verifies the checkpoint before anything is written
        with self.store.exclusive("refresh"):
            job, _ = self.store.start_job("rollback", reason, owner=refreshing.job_owner())
            previous = self.active_version().number
            try:
                added = 0
                if previous != number:
                    added = refreshing.activate_complete(self, target, reason=f"{reason} (job {job.id})", progress=progress)
                    if self.store.latest_calibration(number) is None:
                        refreshing.calibrate_quietly(self, number)
            except BaseException as exc:
                self.store.update_job(job.id, status="failed", result={"error": str(exc) or type(exc).__name__})
                raise
            result = {
                "job": job.id,
                "version": number,
                "previous": previous,
                "embedded": added,
                "seconds": round(time.perf_counter() - started, 2),
                "changed": previous != number,
            }
            self.store.update_job(job.id, status="succeeded", version=number, result=result)
            return result

    def pending_utterances(self) -> int:
        """Utterances enrolled after the active version's training data was taken."""
        return self.store.count_utterances_after(self.active_version().trained_through)

    def request_refresh(self, reason: str) -> Job:
        """Queue a refresh request; the scheduler (or the next refresh) picks it up."""
        return self.store.queue_job("refresh", reason)

    def status(self) -> dict:
        active = self.active_version()
        running = self.store.list_jobs(limit=1, status="running")
        finished = [j for j in self.store.list_jobs(limit=20) if j.finished_at is not None]
        return {
            "active_version": active.number,
            "pending_utterances": self.store.count_utterances_after(active.trained_through),
            "queued": len(self.store.list_jobs(limit=1000, status="queued")),
            "running_job": job_dict(running[0]) if running else None,
            "last_job": job_dict(finished[0]) if finished else None,
            "held_for_review": len(self.store.utterances(status="pending")),
            "calibration": self._calibration_status(active.number),
        }

    def _calibration_status(self, version: int) -> dict | None:
        """The newest calibration of ``version`` and how much has been enrolled since."""
        calibration = self._version_scoring(version).calibration
        if calibration is None:
            return None
        speakers = len(self.store.centroid_matrix(version)[0])
        return {
            "id": calibration.id,
            "created_at": calibration.created_at,
            "speakers_then": calibration.trials["speakers"],
            "speakers_now": speakers,
            "backends": sorted(calibration.thresholds),
        }

    # -- scores and decisions --------------------------------------------------------

    def _version_scoring(self, version: int) -> _VersionScoring:
        """Cohort, calibration and cached statistics of a version, rebuilt when a newer
        calibration appears (a ``calibrate`` in another process included)."""
        latest = self.store.latest_calibration(version)
        # An erasure (in any process) must also leave the in-memory cohort.
        key = (latest[0] if latest else None, self.store.erasures())
        with self._lock:
            cached = self._scoring.get(version)
            if cached is not None and cached[0] == key:
                return cached[1]
        calibration = None
        if latest is not None:
            calibration = Calibration.from_params(version, latest[2], id=latest[0], created_at=latest[1].isoformat())
        through = calibration.settings.get("cohort_through") if calibration else None
        state = _VersionScoring(self._cohort(version, through), calibration, self._prototypes(version))
        with self._lock:
            self._scoring[version] = (key, state)
        return state

    def _cohort(self, version: int, through: int | None) -> Cohort | None:
        """The AS-norm cohort: the first utterances of each speaker (up to ``through``, the
        newest id the calibration saw, so scores are normalised as they were fitted)."""
        cfg = self.config.scoring
        ids, speakers, vectors = self.store.cohort_embeddings(version, per_speaker=cfg.cohort_per_speaker, through=through)
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
        return Cohort(ids, speakers, vectors, top_k=cfg.cohort_top_k)

    def _prototypes(self, version: int) -> dict[str, np.ndarray] | None:
        k = self.config.scoring.prototypes
        if k <= 0:
            return None
        ids, speakers, vectors = self.store.version_embeddings(version)
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
        version = self.active_version().number if version is None else version
        ids, speakers, vectors = self.store.version_embeddings(version)
        if len(set(speakers)) < 2:
            raise NotEnoughData(f"calibration needs at least two enrolled speakers; version {version} has {len(set(speakers))}")
        through = int(ids.max())
        cohort = self._cohort(version, through)
        try:
            trials = leave_one_out_trials(
                ids, speakers, vectors, cohort, probes_per_speaker=cfg.calibration_probes_per_speaker, seed=version
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
        }
        fitted = fit_calibration(version, trials, settings)
        new_id, created = self.store.add_calibration(version, fitted.to_params())
        log.info("version %d calibrated on %s", version, fitted.trials)
        return Calibration.from_params(version, fitted.to_params(), id=new_id, created_at=created.isoformat())

    def calibration(self) -> Calibration | None:
        """The active version's newest calibration, or None."""
        return self._version_scoring(self.active_version().number).calibration

    # -- recognition -------------------------------------------------------------------

    def _embed_probe(self, source: Source, name: str | None, version: ModelVersion) -> tuple[audio.Speech, np.ndarray]:
        utt = audio.load(source, self.config.audio, name=name)
        return utt, self.embedder(version).embed([utt.samples])[0]

    def _index(self, version: int, scoring: _VersionScoring) -> CentroidIndex:
        names, centroids = self.store.centroid_matrix(version)
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
        version = self.active_version()
        utt, embedding = self._embed_probe(source, name, version)
        scoring = self._version_scoring(version.number)
        backend = scoring.backend(cfg.backend)
        hits = tuple(self._index(version.number, scoring).search(embedding, max(top, 2)))
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

    def verify(self, speaker: str, source: Source, *, name: str | None = None) -> Verification:
        """Score one utterance against a claimed speaker (1:1)."""
        speaker = check_speaker_name(speaker)
        version = self.active_version()
        if not self.store.has_speaker(speaker):
            raise UnknownSpeaker(f"speaker {speaker!r} is not enrolled")
        centroid = self.store.centroid(speaker, version.number)
        utt, embedding = self._embed_probe(source, name, version)
        scoring = self._version_scoring(version.number)
        backend = scoring.backend(self.config.scoring.backend)
        index = CentroidIndex(
            [speaker],
            centroid.mean[None, :],
            cohort=scoring.cohort,
            calibration=scoring.calibration,
            prototypes=_own_prototypes(scoring, speaker),
        )
        hit = index.search(embedding, 1)[0]
        threshold = self._threshold(scoring, backend, "verify")
        return Verification(
            speaker, utt.source, version.number, utt.quality.speech_s, hit.score, threshold,
            hit.on(backend) >= threshold, hit.normalised, hit.llr, backend,
        )

    def _threshold(self, scoring: _VersionScoring, backend: str, task: str) -> float:
        if backend == "cosine" and scoring.calibration is None:
            cfg = self.config.scoring
            return cfg.identify_threshold if task == "identify" else cfg.verify_threshold
        return float(scoring.calibration.thresholds[backend][task])


def _own_prototypes(scoring: _VersionScoring, speaker: str) -> tuple[np.ndarray, np.ndarray] | None:
    rows = (scoring.prototypes or {}).get(speaker)
    return None if rows is None or not len(rows) else (np.zeros(len(rows), dtype=np.int64), rows)


def job_dict(job: Job) -> dict:
    out = asdict(job)
    for key in ("requested_at", "started_at", "finished_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


def actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"

