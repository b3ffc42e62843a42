"""The Engine facade: one object for the CLI, the service and the tests.

It resolves the home once, opens the store, and passes both to the collaborators that
do the work: the model registry (:mod:`voiceprint.engine.models`), the enroller
(:mod:`voiceprint.engine.enrollment`), the recognizer (:mod:`voiceprint.engine.recognition`), the
diarizer, the discovery of new speakers in unlabeled speech (:mod:`voiceprint.engine.discovery`) and
the refresher (:mod:`voiceprint.engine.refresh`). Every method here is a delegation or a read of the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from voiceprint.engine import access, evaluation, health, jobs
from voiceprint.engine.audio import Source
from voiceprint.engine.config import Config
from voiceprint.engine.diarize_jobs import DiarizationJobs
from voiceprint.engine.diarizer import Diarizer
from voiceprint.engine.discovery import Discovery
from voiceprint.engine.enrollment import Enroller, Item
from voiceprint.engine.det import DetScores
from voiceprint.engine.errors import (
    AudioError, DiskFull, InvalidInput, NoAudioKept, NotEnoughData, NotInitialised, UnknownSpeaker, VoiceprintError,
)
from voiceprint.engine.events import event
from voiceprint.engine.home import (
    RESERVE_BYTES, Home, actor, ensure_sqlite_folder, keep_reserve, release_reserve, sqlite_file, undone_on_failure,
)
from voiceprint.engine.manifests import LabelledFile, Trial
from voiceprint.engine.models import ModelRegistry
from voiceprint.engine.names import normalise_speaker_name
from voiceprint.engine.progress import Progress
from voiceprint.engine.recognition import Recognizer
from voiceprint.engine.refresh import Refresher
from voiceprint.engine.results import (
    Cluster, Diarization, EnrollmentResult, Identification, Outcome, RefreshReport, UnlabeledResult, Verification, job_dict,
)
from voiceprint.storage import ApiKey, DiarizationJob, Job, ModelVersion, SpeakerSummary, Store, UnlabeledRecord, UtteranceRecord

log = logging.getLogger(__name__)


def _open_store(url: str) -> Store:
    """A store whose schema is current and which has an active version, or the error."""
    store = Store(url)
    try:
        store.schema.check_schema()
        store.registry.active_version()
    except BaseException:
        store.close()
        raise
    return store


def _answer(call, *args, **kwargs):
    """``call``'s answer for one probe, or the error that refused that probe's audio."""
    try:
        return call(*args, **kwargs)
    except (AudioError, InvalidInput) as exc:
        return exc


class Engine:
    """Enroll, identify and verify against a persistent store.

    Use :meth:`init` once to create a home folder and database, then :meth:`open`::

        from voiceprint.engine import Engine
        with Engine.open(home="voiceprint-home") as eng:
            eng.enroll("alice", "a1.wav")
            eng.identify("unknown.wav", top=5).decision
    """

    def __init__(self, home: Home, store: Store) -> None:
        self._home, self.store = home, store
        self.models = ModelRegistry(home, store)
        self.recognizer = Recognizer(store, self.models, home.config)
        self.diarizer = Diarizer(self.models, self.recognizer, home.config)
        self.enroller = Enroller(store, self.models, home.config, self.recognizer.consistency_threshold, self.request_refresh)
        self.refresher = Refresher(store, self.models, home.config, self.calibrate)
        self.discovery = Discovery(store, self.models, self.recognizer, self.enroller, home.config)
        self.diarization_jobs = DiarizationJobs(store, self.diarizer, home.config)

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def init(cls, home: str | os.PathLike | None = None, db: str | None = None, *, config: Config | None = None) -> Engine:
        """Create the home folder, bring the database to the newest schema, and make the
        pretrained encoder version 1 (active) unless a version is active already. A failed
        init removes what it created; run again, it completes one that stopped midway.
        ``config`` replaces the home's ``config.toml``."""
        resolved = Home.resolve(home, db, config)
        with undone_on_failure(resolved):  # a failed first init leaves no half-made home
            resolved.path.mkdir(parents=True, exist_ok=True)
            ensure_sqlite_folder(resolved.url)
            store = Store(resolved.url)
            try:
                store.schema.upgrade()
                ModelRegistry(resolved, store).ensure_first()  # also finishes an init that stopped midway
            except BaseException:
                store.close()
                raise
        keep_reserve(resolved.path)
        return cls(resolved, store)

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, db: str | None = None, *, config: Config | None = None) -> Engine:
        """Open an initialised home/database; errors say which command fixes what."""
        resolved = Home.resolve(home, db, config)
        path = sqlite_file(resolved.url)
        if path is not None and not path.exists():
            # Opening would create an empty database file as a side effect.
            raise NotInitialised(f"no database at {path}: run `voiceprint init` (or pass --home/--db)")
        try:
            store = _open_store(resolved.url)
        except DiskFull:
            if not release_reserve(resolved.path):
                raise
            log.warning("disk full: released the home's %d MiB reserve so the database can open; free space",
                        RESERVE_BYTES >> 20)
            store = _open_store(resolved.url)
        keep_reserve(resolved.path)  # again, once there is room
        return cls(resolved, store)

    def close(self) -> None:
        self.recognizer.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def home(self) -> Path:
        return self._home.path

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self.store.url

    @property
    def config(self) -> Config:
        return self._home.config

    # -- models ------------------------------------------------------------------------

    def active_version(self) -> ModelVersion:
        return self.models.active()

    def versions(self) -> list[ModelVersion]:
        return self.models.all()

    def version(self, number: int) -> ModelVersion:
        return self.models.get(number)

    def prune(self, *, dry_run: bool = False) -> dict:
        """Delete the weights of rejected and retired versions, keeping their rows and
        metrics (see :meth:`ModelRegistry.prune`); ``{"versions", "freed_bytes", "dry_run"}``.
        Rolling back to a pruned version then raises :class:`~voiceprint.engine.errors.WeightsPruned`."""
        result = self.models.prune(dry_run=dry_run)
        if not dry_run:
            event("pruned", versions=",".join(str(v["version"]) for v in result["versions"]) or None,
                  freed_bytes=result["freed_bytes"])
        return result

    def embedder(self, version: ModelVersion):
        """The (cached) embedder of a version, its checkpoint verified by sha256."""
        return self.models.embedder(version)

    # -- enrollment --------------------------------------------------------------------

    def enroll(
        self, speaker: str, source: Source, *, name: str | None = None, force: bool = False, by: str | None = None
    ) -> EnrollmentResult:
        """Enroll one utterance; raises a :class:`VoiceprintError` and stores nothing on bad input.

        ``force`` skips the clipping, noise and consistency checks (a person vouches for
        it); the audit log records it under ``by`` (default: the login name).
        """
        result = self.enroller.enroll_many([(speaker, source, name)], force=force, by=by)[0]
        if isinstance(result, VoiceprintError):
            raise result
        return result

    def preview_enrollment(self, speaker: str, source: Source, *, name: str | None = None) -> str:
        """What enrolling ``source`` for ``speaker`` would answer now, storing nothing: ``OK``
        or ``INCONSISTENT_SPEAKER``; bad audio raises what :meth:`enroll` would raise."""
        return self.enroller.preview(speaker, source, name=name)

    def enroll_many(
        self, items: Sequence[Item | VoiceprintError], *, force: bool = False, by: str | None = None
    ) -> list[Outcome]:
        """Enroll ``(speaker, source, name)`` items; results (or each item's error) in order."""
        return self.enroller.enroll_many(items, force=force, by=by)

    def enroll_stream(self, items: Iterable[Item | VoiceprintError], *, force: bool = False, **options) -> Iterator[Outcome]:
        """Enroll ``(speaker, source, name)`` items as they arrive; each result is yielded
        once its transaction commits. An item whose speaker is None is kept unlabeled
        (an :class:`~voiceprint.engine.results.UnlabeledResult`; see :meth:`clusters`)."""
        return self.enroller.enroll_stream(items, force=force, **options)

    def accept_utterance(self, utterance_id: int) -> dict:
        """Move a pending utterance into its speaker's profile (a person checked it)."""
        return self.enroller.accept_utterance(utterance_id)

    def remove_utterance(self, utterance_id: int) -> dict:
        """Delete an utterance and take it out of its speaker's profile under every version."""
        record = self.store.profiles.remove_utterance(utterance_id, actor=actor())
        return {"utterance": record.id, "speaker": record.speaker, "removed": True, "was": record.status}

    def utterance_audio(self, utterance_id: int) -> bytes:
        """The kept speech of an utterance (after VAD, 16 kHz) as a FLAC file, for a person
        to listen to before accepting a held utterance. ``UnknownUtterance`` for no such
        id; ``NoAudioKept`` when only its features were kept."""
        data, codec, _ = self.store.profiles.utterance_audio(utterance_id)
        if codec != "flac":
            raise NoAudioKept(f"utterance {utterance_id} was kept as features only ([privacy] keep); there is no audio to play")
        return data

    def erase_speaker(self, speaker: str, *, by: str | None = None) -> dict:
        """Delete everything stored about ``speaker``; the audit log keeps only that it
        happened. Returns the counts removed, ``trained_into`` (the versions whose training
        may have seen the speaker), ``running_refresh`` (refresh jobs running meanwhile:
        none promotes a candidate trained on the speaker), and ``files_scrubbed`` /
        ``scrub`` ("done", "pending" behind a reader, retried later; "server" on
        PostgreSQL). Cached cohorts and centres are keyed by the count of profile changes,
        so every process rebuilds its own without the speaker's embeddings."""
        speaker = normalise_speaker_name(speaker)
        return {"speaker": speaker, "erased": True, **self.store.profiles.erase_speaker(speaker, actor=by or actor())}

    def speakers(self) -> list[SpeakerSummary]:
        return self.store.profiles.speakers()

    def speaker(self, name: str) -> SpeakerSummary:
        found = self.store.profiles.speakers(name=normalise_speaker_name(name))
        if not found:
            raise UnknownSpeaker(f"speaker {name!r} is not enrolled")
        return found[0]

    def utterances(self, speaker: str | None = None, *, status: str | None = "enrolled") -> list[UtteranceRecord]:
        """Utterances (of one speaker) with ``status`` "enrolled", "pending" or None for both."""
        return self.store.profiles.utterances(None if speaker is None else normalise_speaker_name(speaker), status=status)

    def speaker_utterances(self, speaker: str, *, status: str | None = None) -> list[UtteranceRecord]:
        """One enrolled speaker's utterances, oldest first (``status`` as in :meth:`utterances`,
        default both); :class:`~voiceprint.engine.errors.UnknownSpeaker` for a name not enrolled."""
        self.speaker(speaker)
        return self.utterances(speaker, status=status)

    # -- recognition -------------------------------------------------------------------

    def identify(self, source: Source, *, top: int = 5, name: str | None = None) -> Identification:
        """Rank every enrolled speaker against one utterance (1:N, open set)."""
        return self.recognizer.identify(source, top=top, name=name)

    def identify_each(
        self, probes: Iterable[tuple[Source, str | None] | VoiceprintError], *, top: int = 5
    ) -> Iterator[Identification | VoiceprintError]:
        """:meth:`identify` each ``(source, name)`` probe, yielding each answer as soon as it
        is computed (probes may still be arriving). A probe whose audio is refused (bad,
        missing, outside ``[audio] roots``), or an error given in a probe's place, is
        yielded in its slot, and the rest go on; any other error stops the run."""
        for probe in probes:
            yield probe if isinstance(probe, VoiceprintError) else _answer(self.identify, probe[0], top=top, name=probe[1])

    def verify_each(
        self, speaker: str, probes: Iterable[tuple[Source, str | None] | VoiceprintError], *, disclose: bool = True
    ) -> Iterator[Verification | VoiceprintError]:
        """:meth:`verify` each probe against ``speaker``, as :meth:`identify_each` does."""
        for probe in probes:
            yield probe if isinstance(probe, VoiceprintError) else _answer(
                self.verify, speaker, probe[0], name=probe[1], disclose=disclose)

    def verify(self, speaker: str, source: Source, *, name: str | None = None, disclose: bool = True) -> Verification:
        """Score one utterance against a claimed speaker (1:1); ``disclose=False``: the
        decision alone, an unknown name rejected like any other (see :class:`Recognizer`)."""
        return self.recognizer.verify(speaker, source, name=name, disclose=disclose)

    def diarize(
        self, source: Source, *, speakers: int | None = None, name: str | None = None, on_progress=None
    ) -> Diarization:
        """Who spoke when in one recording: segments named by enrolled speaker, or
        ``unknown-1``, ``unknown-2``, ... (see :class:`~voiceprint.engine.diarizer.Diarizer`).
        ``speakers``: the number of speakers, when it is known. Stores nothing."""
        return self.diarizer.diarize(source, speakers=speakers, name=name, on_progress=on_progress)

    @property
    def uploads(self) -> Path:
        """The home's folder for long uploads waiting to be diarized (private to the owner)."""
        folder = self.home / "uploads"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def new_upload(self) -> Path:
        """A fresh path in :attr:`uploads` for a long upload to be written to, then passed
        to :meth:`submit_diarization`."""
        return DiarizationJobs.partial_path(self.uploads)

    def submit_diarization(self, upload: Path, *, speakers: int | None = None, name: str = "upload") -> tuple[DiarizationJob, Path]:
        """Queue a job for an upload written to :attr:`uploads` (see
        :mod:`voiceprint.engine.diarize_jobs`); the header is checked now, and a refused
        upload is deleted. Returns the job and the upload's new path, for :meth:`run_diarization_job`."""
        return self.diarization_jobs.submit(upload, speakers=speakers, name=name)

    def run_diarization_job(self, job_id: int, upload: Path) -> DiarizationJob:
        """Diarize a queued job's upload, recording progress and the result; deletes the upload."""
        return self.diarization_jobs.run(job_id, upload)

    def diarization_job(self, job_id: int) -> DiarizationJob:
        return self.diarization_jobs.get(job_id)

    def recover_diarization_jobs(self) -> list[int]:
        """Fail the diarization jobs of stopped servers on this host and delete their uploads."""
        return self.diarization_jobs.recover(self.uploads)

    # -- the unlabeled stream ----------------------------------------------------------

    def add_unlabeled(self, source: Source, *, name: str | None = None) -> UnlabeledResult:
        """Keep and embed an utterance whose speaker is not known (in no profile); the
        quality checks of an enrollment apply. Rows of :meth:`enroll_stream` whose speaker
        is None take the same path."""
        result = self.enroller.enroll_many([(None, source, name)])[0]
        if isinstance(result, VoiceprintError):
            raise result
        return result

    def unlabeled(self) -> list[UnlabeledRecord]:
        """Every utterance stored without a speaker, by id."""
        return self.store.unlabeled.records()

    def clusters(self, *, on_progress=None) -> list[Cluster]:
        """The unlabeled utterances grouped into likely speakers, each ``proposed`` (a new
        speaker), ``known`` (sounds like an enrolled one) or ``small``
        (see :class:`~voiceprint.engine.discovery.Discovery`)."""
        return self.discovery.clusters(on_progress=on_progress)

    def name_cluster(self, number: int, speaker: str, *, force: bool = False, by: str | None = None) -> dict:
        """Enroll cluster ``number``'s utterances under ``speaker`` through the normal
        enrollment path; what each became (enrolled, held, refused)."""
        return self.discovery.name_cluster(number, speaker, force=force, by=by)

    def delete_cluster(self, number: int, *, by: str | None = None) -> dict:
        """Erase cluster ``number``'s utterances: kept speech and every embedding."""
        return self.discovery.delete_cluster(number, by=by)

    def calibrate(self, version: int | None = None):
        """Fit a version's (default: the active one's) calibration; see :class:`Recognizer`."""
        fitted = self.recognizer.calibrate(version)
        event("calibrated", version=fitted.version, targets=fitted.trials.get("target"),
              nontargets=fitted.trials.get("nontarget"), speakers=fitted.trials.get("speakers"))
        return fitted

    def calibration(self):
        """The active version's newest calibration, or None."""
        return self.recognizer.calibration()

    def index_status(self) -> list[dict]:
        """The 1:N index this process holds of each version (the active one built if it is
        not yet): kind, speakers, memory, how far behind the change feed it is, and an
        approximate index's recall@1 against exact search."""
        number = self.models.active().number
        self.recognizer.indexes.index(number, self.recognizer.scoring(number))
        return self.recognizer.indexes.status()

    def calibration_scores(self, version: int | None = None) -> DetScores:
        """A version's (default: the active one's) leave-one-out trial scores on the
        back-end it decides with, and its thresholds, for a DET plot; stores nothing."""
        return self.recognizer.trial_scores(self.models.active().number if version is None else self.models.get(version).number)

    def calibrate_if_needed(self):
        """Calibrate the active version when its population changed enough since the last
        fit (``[scoring] recalibrate_change``; see ``Recognizer.needs_calibration``); the
        new calibration, or None when none was due or there is too little data."""
        active = self.models.active().number
        if not self.recognizer.needs_calibration(active):
            return None
        try:
            return self.calibrate(active)
        except NotEnoughData:
            return None

    def evaluate(
        self, files: list[LabelledFile], *, enroll: int = 3, trials: list[Trial] | None = None,
        version: int | None = None, scoring: str | None = None, on_progress: Progress | None = None,
    ) -> evaluation.EvalReport:
        """Score a labelled set under ``version`` (default: the active one); stores nothing.

        ``scoring`` (cosine, asnorm or asnorm+calibrated) is the back-end whose scores and
        thresholds are reported; by default the one the version decides with now (the
        configured one, or cosine until it is calibrated). One the version cannot give
        raises ``NotEnoughData`` saying why."""
        model = self.models.get(version) if version is not None else self.models.active()
        state = self.recognizer.scoring(model.number)
        cfg = self.config.scoring
        backend, why = state.backend(scoring or cfg.backend, cfg.min_cohort)
        if scoring is not None and backend != scoring:
            raise NotEnoughData(f"eval --scoring {scoring}: {why.split(': ', 1)[-1]}")
        report = evaluation.evaluate(
            self.models.embedder(model), model.number, self.config, files, scoring=state, backend=backend,
            threshold=lambda task, gallery: self.recognizer.threshold(state, backend, task, gallery),
            enroll=enroll, trials=trials, on_progress=on_progress,
        )
        report.notes.extend([why] if why else [])
        return report

    # -- refresh, rollback and jobs ----------------------------------------------------

    def refresh(self, *, dry_run: bool = False, reason: str = "manual", on_progress: Progress | None = None) -> RefreshReport:
        """Fine-tune a candidate from the active version, gate it, promote or reject it.
        Raises :class:`~voiceprint.engine.errors.RefreshBusy` when another process holds the lock."""
        return self.refresher.refresh(dry_run=dry_run, reason=reason, on_progress=on_progress)

    def rollback(
        self, number: int, *, reason: str = "rollback", force: bool = False, on_progress: Progress | None = None
    ) -> dict:
        """Make version ``number`` active again (embedding what it lacks first); a
        candidate its refresh never finished only with ``force``."""
        return self.refresher.rollback(number, reason=reason, force=force, on_progress=on_progress)

    def pending_utterances(self) -> int:
        """Utterances enrolled after the active version's training data was taken."""
        return self.store.profiles.count_utterances_after(self.active_version().trained_through)

    def request_refresh(self, reason: str, *, dry_run: bool = False) -> Job:
        """Queue a refresh request; the service's worker (or the next refresh of the same
        kind: a dry run or not) picks it up."""
        return self.store.jobs.queue_job("refresh", reason, dry_run=dry_run)

    def queued_refresh(self) -> bool:
        return bool(self.store.jobs.list_jobs(limit=1, status="queued"))

    def next_refresh_request(self) -> Job | None:
        """The queued refresh request waiting longest (its ``dry_run`` says how to run it), or None."""
        return self.store.jobs.oldest_queued("refresh")

    def job(self, job_id: int) -> Job:
        return self.store.jobs.get_job(job_id)

    def jobs(self, *, limit: int = 20, status: str | None = None) -> list[Job]:
        return self.store.jobs.list_jobs(limit=limit, status=status)

    def recover_interrupted_jobs(self) -> list[Job]:
        """Fail jobs a killed process left running (nothing while a live one holds the lock)."""
        return jobs.recover_interrupted(self.store)

    def readiness(self) -> dict:
        """Whether enrollment and identification can work now: database, active checkpoint,
        disk space, each reported on its own (:mod:`voiceprint.engine.health`)."""
        return health.readiness(self.models)

    def status(self) -> dict:
        """The state of the home; a job whose process stopped reads failed, not running."""
        jobs.recover_interrupted(self.store)
        active = self.active_version()
        running = self.jobs(limit=1, status="running")
        finished = [j for j in self.jobs(limit=20) if j.finished_at is not None]
        return {
            "active_version": active.number,
            "pending_utterances": self.store.profiles.count_utterances_after(active.trained_through),
            "queued": len(self.jobs(limit=1000, status="queued")),
            "running_job": job_dict(running[0]) if running else None,
            "last_job": job_dict(finished[0]) if finished else None,
            "held_for_review": len(self.utterances(status="pending")),
            "unlabeled_utterances": self.store.unlabeled.count(),
            "calibration": self.recognizer.calibration_status(active.number),
            "decisions": self.recognizer.decision_status(active.number),
            "scrub": self.scrub_files(),
        }

    def scrub_files(self) -> dict:
        """Retry a pending scrub of erased data from the SQLite files (no wait); its state:
        ``scrub`` "done", "pending" or "server", ``pending_since``. The service's job
        worker calls it at every tick."""
        return self.store.scrub.retry()

    # -- API keys ----------------------------------------------------------------------

    def create_key(self, role: str, *, note: str = "", by: str | None = None) -> tuple[ApiKey, str]:
        """A new API key of ``role``: its record and the key itself, which is never stored."""
        return access.create_key(self.store, role, note=note, actor=by or actor())

    def list_keys(self) -> list[ApiKey]:
        return self.store.keys.list_keys()

    def revoke_key(self, key_id: int, *, by: str | None = None) -> ApiKey:
        return self.store.keys.revoke_key(key_id, actor=by or actor())

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The live key record for ``secret``, or None (no key, unknown or revoked)."""
        return access.authenticate(self.store, secret)
