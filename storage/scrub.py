"""Scrubbing erasures out of the SQLite files: at once, or as soon as readers allow.

``secure_delete`` zeroes what an erasure deletes in the pages it rewrites, but the page
images written before it (the speaker's name, embeddings, kept audio) stay in the
write-ahead log until a checkpoint copies the log into the database and truncates it,
and that checkpoint cannot pass a reader still holding a snapshot from before the
erasure. An erasure that meets such a reader leaves its scrub *pending*; the checkpoint
is tried again, without waiting, after each later write transaction of the process that
failed it, at each tick of the service's job worker, by ``status``, and on close.

The state lives in the audit log, so every process sees the same one: a finished scrub
is recorded as a ``scrub_files`` entry naming the newest erasure it covers, and a scrub
is pending while a newer erasure exists. PostgreSQL keeps no files of ours: what its
server keeps (dead rows until VACUUM, its own WAL) is its to reclaim, state "server".
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from voiceprint.engine.errors import StorageError
from voiceprint.storage import db
from voiceprint.storage import models as m

log = logging.getLogger(__name__)

ERASURE, SCRUBBED = "erase_speaker", "scrub_files"  # audit log actions
UNLABELED_ERASURE = "erase_unlabeled"  # unlabeled utterances deleted (storage/unlabeled.py)
ERASURES = (ERASURE, UNLABELED_ERASURE)  # what leaves erased bytes in the files
ERASURE_WAIT_MS = 1_000  # readers are short (one identify): an erasure waits that long for them


class Scrub:
    """Whether the SQLite files still hold erased bytes, and the checkpoint that removes them."""

    def __init__(self, database: db.Database) -> None:
        self._db = database
        self._pending_here = False  # a scrub this process could not finish: retried after its writes
        # One attempt at a time; taken without blocking on retries, so the record an
        # attempt writes (a write transaction itself) does not start another attempt.
        self._attempting = threading.Lock()
        database.after_write = self._after_write

    def after_erasure(self) -> dict:
        """Scrub right after an erasure committed, waiting a moment for readers:
        ``files_scrubbed`` and ``scrub`` ("done", "pending" or "server")."""
        if self._db.backend != "sqlite":
            return {"files_scrubbed": False, "scrub": "server"}
        with self._attempting:
            done = self._attempt(ERASURE_WAIT_MS)
        return {"files_scrubbed": done, "scrub": "done" if done else "pending"}

    def retry(self) -> dict:
        """Try a pending scrub (of any process's erasure) again without waiting; returns
        :meth:`state` after it."""
        state = self.state()
        if state["scrub"] == "pending" and self._attempt_unless_busy():
            state = self.state()
        return state

    def state(self) -> dict:
        """``scrub``: "done", "pending" or "server"; ``pending_since``: when the oldest
        erasure not yet scrubbed out of the files happened (ISO 8601), or None."""
        if self._db.backend != "sqlite":
            return {"scrub": "server", "pending_since": None}
        with self._db.session("read the state of the file scrub") as s:
            since = s.scalar(
                select(func.min(m.AuditEntry.at)).where(m.AuditEntry.action.in_(ERASURES), m.AuditEntry.id > _covered(s))
            )
        return {"scrub": "pending" if since else "done", "pending_since": since.isoformat() if since else None}

    def close(self) -> None:
        """A last try (without waiting) before the connections close."""
        self._after_write()

    def _after_write(self) -> None:
        if self._pending_here:
            self._attempt_unless_busy()

    def _attempt_unless_busy(self) -> bool:
        """One attempt without waiting, unless one is under way; True when it scrubbed."""
        if not self._attempting.acquire(blocking=False):
            return False
        try:
            return self._attempt(0)
        finally:
            self._attempting.release()

    def _attempt(self, wait_ms: int) -> bool:
        """Checkpoint and truncate the log; when done, record which erasures it covers.
        Never raises: the erasure it follows is committed whatever happens here."""
        try:
            # Read before the checkpoint: an erasure committed after this read may not be
            # covered, so it stays pending (a needless retry at worst, never a false "done").
            with self._db.session("read the erasures to scrub") as s:
                newest = s.scalar(select(func.max(m.AuditEntry.id)).where(m.AuditEntry.action.in_(ERASURES))) or 0
            if not self._db.truncate_wal(wait_ms=wait_ms):
                self._pending_here = True
                return False
            self._pending_here = False
            with self._db.session("record the file scrub", write=True) as s:
                s.add(m.AuditEntry(action=SCRUBBED, actor="system", detail={"through": newest}, at=db.now()))
            return True
        except StorageError as exc:
            log.warning("the scrub of erased data from the database files is still pending: %s", exc)
            self._pending_here = True
            return False


def _covered(s: Session) -> int:
    """The audit id of the newest erasure the last recorded scrub covers (0: none)."""
    detail = s.scalars(
        select(m.AuditEntry.detail).where(m.AuditEntry.action == SCRUBBED).order_by(m.AuditEntry.id.desc()).limit(1)
    ).first()
    return int(detail["through"]) if detail else 0
