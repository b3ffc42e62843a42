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
from engine.errors import InvalidInput, NotInitialised, UnknownSpeaker, VersionChanged, VoiceprintError
from engine.index import CentroidIndex, Hit
from engine.scoring import cosine
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


@dataclass(frozen=True)
class Identification:
    source: str
    version: int
    speech_s: float
    candidates: tuple[Hit, ...]  # best first
    decision: str | None  # the best speaker, or None for "unknown"
    threshold: float


@dataclass(frozen=True)
class Verification:
    speaker: str
    source: str
    version: int
    speech_s: float
    score: float
    threshold: float
    accepted: bool


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

    def enroll(self, speaker: str, source: Source, *, name: str | None = None) -> EnrollmentResult:
        """Enroll one utterance; raises a :class:`VoiceprintError` and stores nothing on bad input."""
        result = self.enroll_many([(speaker, source, name)])[0]
        if isinstance(result, VoiceprintError):
            raise result
        return result

    def enroll_many(self, items: Sequence[Item | VoiceprintError]) -> list[Outcome]:
        """Enroll ``(speaker, source, name)`` items, one transaction per utterance.

        Audio is decoded and embedded in one batch for speed, then each utterance is
        committed on its own, so one bad item costs only itself. Results come back in
        order: an :class:`EnrollmentResult` or the error that item raised. An item that
        is already an error (e.g. a malformed stream row) comes back as it is.
        """
        return self._embed_and_commit(self._prepare(items))

    def enroll_stream(self, items: Iterable[Item | VoiceprintError], *, batch_size: int = STREAM_BATCH) -> Iterator[Outcome]:
        """Enroll items as they arrive from an iterable (a pipe, a socket, a file).

        Each result is yielded as soon as its transaction has committed. Items that are
        already waiting are batched (up to ``batch_size``) and the audio of the next
        batch is prepared while the current one is embedded and committed.
        """
        return pipelined(items, self._prepare, self._embed_and_commit, batch_size=batch_size)

    def _prepare(self, items: Sequence[Item | VoiceprintError]) -> list[tuple[str, audio.Speech] | VoiceprintError]:
        """Check names and load audio (decode, resample, VAD): everything before the encoder."""
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
            prepared[i] = speech if isinstance(speech, VoiceprintError) else (speakers[i], speech)
        return prepared

    def _embed_and_commit(self, prepared: Sequence[tuple[str, audio.Speech] | VoiceprintError]) -> list[Outcome]:
        results: list = list(prepared)
        ready = [(i, p) for i, p in enumerate(prepared) if not isinstance(p, VoiceprintError)]
        if ready:
            version = self.active_version()
            embeddings = self.embedder(version).embed([speech.samples for _, (_, speech) in ready])
            for (i, (speaker, speech)), embedding in zip(ready, embeddings):
                try:
                    results[i] = self._commit(speaker, speech, embedding, version.number)
                except VoiceprintError as exc:
                    results[i] = exc
        return results

    def _commit(self, speaker: str, utt: audio.Speech, embedding: np.ndarray, version: int) -> EnrollmentResult:
        for _ in range(3):
            try:
                return self._commit_under(speaker, utt, embedding, version)
            except VersionChanged:
                # A refresh or rollback moved "active" after this utterance was embedded:
                # embed it again under the new version so that version holds it too.
                active = self.active_version()
                embedding, version = self.embedder(active).embed([utt.samples])[0], active.number
        return self._commit_under(speaker, utt, embedding, version)

    def _commit_under(self, speaker: str, utt: audio.Speech, embedding: np.ndarray, version: int) -> EnrollmentResult:
        stored = self.store.enroll(
            speaker=speaker,
            version=version,
            source=utt.source,
            content_sha256=utt.content_sha256,
            duration_s=utt.quality.duration_s,
            speech_s=utt.quality.speech_s,
            quality=utt.quality.to_dict(),
            audio=audio.encode_flac(utt.samples),
            codec="flac",
            sample_rate=audio.SAMPLE_RATE,
            embedding=embedding,
            expect_active=True,
        )
        before = None
        if stored.previous_mean is not None:
            before = float(cosine(embedding, stored.previous_mean[None, :])[0])
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
        )

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
            "running_job": _job_dict(running[0]) if running else None,
            "last_job": _job_dict(finished[0]) if finished else None,
        }

    # -- recognition -------------------------------------------------------------------

    def _embed_probe(self, source: Source, name: str | None, version: ModelVersion) -> tuple[audio.Speech, np.ndarray]:
        utt = audio.load(source, self.config.audio, name=name)
        return utt, self.embedder(version).embed([utt.samples])[0]

    def identify(self, source: Source, *, top: int = 5, name: str | None = None) -> Identification:
        """Rank every enrolled speaker against one utterance (1:N, open set)."""
        if top < 1:
            raise InvalidInput("--top must be at least 1")
        version = self.active_version()
        utt, embedding = self._embed_probe(source, name, version)
        names, centroids = self.store.centroid_matrix(version.number)
        hits = tuple(CentroidIndex(names, centroids).search(embedding, top))
        threshold = self.config.scoring.identify_threshold
        decision = hits[0].speaker if hits and hits[0].score >= threshold else None
        return Identification(utt.source, version.number, utt.quality.speech_s, hits, decision, threshold)

    def verify(self, speaker: str, source: Source, *, name: str | None = None) -> Verification:
        """Score one utterance against a claimed speaker (1:1)."""
        speaker = check_speaker_name(speaker)
        version = self.active_version()
        if not self.store.has_speaker(speaker):
            raise UnknownSpeaker(f"speaker {speaker!r} is not enrolled")
        centroid = self.store.centroid(speaker, version.number)
        utt, embedding = self._embed_probe(source, name, version)
        score = float(cosine(embedding, centroid.mean[None, :])[0])
        threshold = self.config.scoring.verify_threshold
        return Verification(speaker, utt.source, version.number, utt.quality.speech_s, score, threshold, score >= threshold)


def _job_dict(job: Job) -> dict:
    out = asdict(job)
    for key in ("requested_at", "started_at", "finished_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


def actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"

