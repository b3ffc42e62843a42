"""Long recordings diarized in the background: submitted, run, followed, recovered.

The service streams a long upload to a file in the home's ``uploads`` folder (bounded
by ``[service] max_upload_bytes``, never held in memory), :meth:`DiarizationJobs.submit`
checks its header and queues a job owned by this process, and the service's runner
thread calls :meth:`DiarizationJobs.run`, which records progress about once a second,
stores the :class:`~voiceprint.engine.results.Diarization` with the job and deletes the
upload whatever the outcome. A process that stops leaves its jobs unfinished; the next
server on the same host fails them (:meth:`DiarizationJobs.recover`) and deletes their
uploads, as it deletes any upload no live job holds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from voiceprint.engine import recording
from voiceprint.engine.config import Config
from voiceprint.engine.diarizer import Diarizer
from voiceprint.engine.errors import InvalidInput, VoiceprintError
from voiceprint.engine.jobs import job_owner
from voiceprint.storage import DiarizationJob, Store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
PARTIAL, UPLOAD = ".partial", ".upload"  # an upload still arriving; one a job holds


class DiarizationJobs:
    def __init__(self, store: Store, diarizer: Diarizer, config: Config) -> None:
        self.store, self.diarizer, self.config = store, diarizer, config

    @staticmethod
    def partial_path(uploads: Path) -> Path:
        """Where an arriving upload is written: named by its process, so recovery can tell
        one still arriving from one a stopped process left."""
        return uploads / f"{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex}{PARTIAL}"

    def submit(self, partial: Path, *, speakers: int | None, name: str) -> tuple[DiarizationJob, Path]:
        """Check an arrived upload (format, length, ``speakers``) and queue its job; the
        file is renamed to the job's upload. On an error nothing is queued and the file is
        deleted. Returns the job and where its upload now is."""
        cfg = self.config.diarization
        try:
            if speakers is not None and not 1 <= speakers <= cfg.max_speakers:
                raise InvalidInput(f"the number of speakers must lie in 1..{cfg.max_speakers} ([diarization] max_speakers)")
            info, sound = recording.open_recording(partial, self.config.audio, cfg.max_duration_s, name=name)
            sound.close()
            job = self.store.diarizations.submit(owner=job_owner(), source=info.source, speakers=speakers)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        upload = partial.with_name(f"job-{job.id}{UPLOAD}")
        partial.rename(upload)
        return job, upload

    def run(self, job_id: int, upload: Path) -> DiarizationJob:
        """Diarize a queued job's upload; the upload is deleted whatever happens."""
        try:
            if self.store.diarizations.start(job_id):
                self._diarize(self.store.diarizations.get(job_id), upload)
        finally:
            upload.unlink(missing_ok=True)
        return self.store.diarizations.get(job_id)

    def _diarize(self, job: DiarizationJob, upload: Path) -> None:
        last = float("-inf")

        def progress(done: int, total: int, what: str) -> None:
            nonlocal last
            if done == total or time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                self.store.diarizations.progress(job.id, done, total)

        try:
            result = self.diarizer.diarize(upload, speakers=job.speakers, name=job.source, on_progress=progress)
        except VoiceprintError as exc:
            self.store.diarizations.finish(job.id, status="failed", result={"error": exc.code, "message": str(exc)})
        except Exception as exc:  # recorded, so a client polling the job is not left waiting
            log.exception("diarization job %d failed", job.id)
            self.store.diarizations.finish(job.id, status="failed", result={"error": "internal_error", "message": str(exc)})
        else:
            self.store.diarizations.finish(job.id, status="succeeded", result=asdict(result))

    def get(self, job_id: int) -> DiarizationJob:
        return self.store.diarizations.get(job_id)

    def recover(self, uploads: Path) -> list[int]:
        """Fail the unfinished jobs of stopped processes on this host, delete uploads that
        no live job or arriving upload holds; returns the failed job ids."""
        failed, live = [], set()
        for job in self.store.diarizations.unfinished():
            host, _, pid = job.owner.rpartition(":")
            if _stopped(host, pid):
                self.store.diarizations.finish(job.id, status="failed", result={
                    "error": "interrupted", "message": "the server holding the upload stopped before the job finished: upload it again"})
                failed.append(job.id)
            else:
                live.add(f"job-{job.id}{UPLOAD}")
        for path in uploads.glob("*"):
            if path.suffix == UPLOAD:
                leftover = path.name not in live
            else:
                host, _, pid = path.name.removesuffix(PARTIAL).rpartition("@")[0].rpartition("@")
                leftover = path.suffix == PARTIAL and _stopped(host, pid)
            if leftover:
                path.unlink(missing_ok=True)
        if failed:
            log.warning("diarization jobs %s were interrupted by a stopped server: marked failed", failed)
        return failed


def _stopped(host: str, pid: str) -> bool:
    """Whether process ``pid`` of ``host`` is known to have stopped: it ran on this host
    and no process has its pid now. Another host's processes are not known here."""
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    return False
