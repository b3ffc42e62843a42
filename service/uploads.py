"""Long uploads for diarization: streamed to disk as they arrive, then diarized one at a
time in a thread of this process (the one whose disk holds them).

The body never sits in memory: each chunk is written to a private file under the home's
``uploads`` folder as it arrives (``[service] max_upload_bytes`` bounds it, 413 past
that). The engine checks the file's header and queues the job
(:mod:`voiceprint.engine.diarize_jobs`); :class:`DiarizationRunner` runs the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

log = logging.getLogger(__name__)


async def receive_upload(request: Request, partial: Path) -> None:
    """Write the request body to ``partial`` (mode 0600) chunk by chunk; the size limit
    is enforced by the app's SizeLimits as the chunks arrive."""
    handle = await run_in_threadpool(_open_private, partial)
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(handle.write, chunk)
    finally:
        handle.close()


def _open_private(path: Path):
    path.touch(mode=0o600, exist_ok=False)
    return open(path, "wb")


class DiarizationRunner:
    """Runs this process's diarization jobs one after the other in a thread of its own,
    with ``threads`` PyTorch threads. Jobs left in the queue at stop stay queued; the
    next server on this host fails them (``Engine.recover_diarization_jobs``)."""

    def __init__(self, engine, threads: int) -> None:
        self.engine, self.threads = engine, threads
        self.waiting: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="voiceprint-diarize", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def submit(self, job_id: int, upload: Path) -> None:
        self.waiting.put((job_id, upload))

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        while not self.stopping.is_set():
            try:
                job_id, upload = self.waiting.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                job = self.engine.run_diarization_job(job_id, upload)
                log.info("diarization job %d %s", job_id, job.status)
            except Exception:  # the database is away: the job stays unfinished, the thread goes on
                log.exception("diarization job %d could not be run", job_id)
