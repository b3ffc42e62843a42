"""Model checkpoints stored in the database, addressed by their sha256.

A version's row records the sha256 of its weights; the bytes live here, once per
content, in chunks of :data:`CHUNK_BYTES`, so that neither a write nor a read ever holds
a whole checkpoint in one query, and hosts that share the database share the weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from pathlib import Path

from sqlalchemy import delete, func, select, update

from voiceprint.engine.errors import CheckpointError
from voiceprint.storage import db
from voiceprint.storage import models as m
from voiceprint.storage.records import CheckpointBlob

CHUNK_BYTES = 1 << 20


class Checkpoints:
    """Checkpoint blobs: put (from a file), read in chunks, look up, delete."""

    def __init__(self, database: db.Database):
        self._db = database

    def put_file(self, sha256: str, path: Path) -> bool:
        """Store the file at ``path`` as the blob ``sha256``, read a chunk at a time;
        False (the file unread) when that content is stored already.

        The bytes are hashed on the way in: a file whose sha256 is not ``sha256`` raises
        :class:`CheckpointError` and nothing is stored. Blob and chunks commit together,
        so a blob that can be found is whole.
        """
        with self._db.session(f"store checkpoint {sha256[:12]}... in the database", write=True) as s:
            # The blob's row is written first: a concurrent writer of the same content
            # waits on it (PostgreSQL) or on the write lock (SQLite), then finds it there.
            row = {"sha256": sha256, "size_bytes": 0, "chunks": 0, "created_at": db.now()}
            if not db.insert_ignoring_conflict(s, m.CheckpointBlob.__table__, row):
                return False
            digest, size, seq = hashlib.sha256(), 0, 0
            try:
                with open(path, "rb") as fh:
                    while data := fh.read(CHUNK_BYTES):
                        digest.update(data)
                        s.execute(m.CheckpointChunk.__table__.insert(), {"sha256": sha256, "seq": seq, "data": data})
                        size, seq = size + len(data), seq + 1
            except OSError as exc:
                raise CheckpointError(f"cannot read checkpoint {path.name}: {exc.strerror or exc}") from None
            if digest.hexdigest() != sha256:
                raise CheckpointError(
                    f"checkpoint {path.name} does not match its recorded sha256 {sha256[:12]}...: not stored"
                )
            s.execute(update(m.CheckpointBlob).where(m.CheckpointBlob.sha256 == sha256).values(size_bytes=size, chunks=seq))
            return True

    def blob(self, sha256: str) -> CheckpointBlob | None:
        """The stored checkpoint ``sha256``, or None when the database does not hold it."""
        with self._db.session(f"look up checkpoint {sha256[:12]}...") as s:
            row = s.get(m.CheckpointBlob, sha256)
            return None if row is None else CheckpointBlob(row.sha256, row.size_bytes, row.chunks, row.created_at)

    def chunks(self, sha256: str) -> Iterator[bytes]:
        """The bytes of checkpoint ``sha256``, a chunk at a time and in order, all read in
        one transaction (a concurrent delete does not cut it short). :class:`CheckpointError`
        when it is not stored. The bytes are not verified here: the reader hashes them."""
        with self._db.session(f"read checkpoint {sha256[:12]}... from the database") as s:
            count = s.scalar(select(m.CheckpointBlob.chunks).where(m.CheckpointBlob.sha256 == sha256))
            if count is None:
                raise CheckpointError(f"checkpoint {sha256[:12]}... is not stored in the database")
            for seq in range(count):
                data = s.scalar(
                    select(m.CheckpointChunk.data).where(m.CheckpointChunk.sha256 == sha256, m.CheckpointChunk.seq == seq)
                )
                if data is None:
                    raise CheckpointError(f"checkpoint {sha256[:12]}... in the database lacks chunk {seq} of {count}")
                yield bytes(data)

    def delete(self, sha256: str, *, released: Collection[int]) -> bool:
        """Delete checkpoint ``sha256`` unless a version outside ``released`` (the versions
        whose weights are going, or gone) records it: two versions may hold the very same
        weights. True when it was deleted; False when it is kept or was not stored.

        The count and the delete are not atomic against a new version recording the same
        content: the engine creates and deletes weights only under the refresh lock.
        """
        with self._db.session(f"delete checkpoint {sha256[:12]}... from the database", write=True) as s:
            users = s.scalar(
                select(func.count())
                .select_from(m.ModelVersion)
                .where(m.ModelVersion.checkpoint_sha256 == sha256, m.ModelVersion.number.not_in(list(released)))
            )
            if users:
                return False
            s.execute(delete(m.CheckpointChunk).where(m.CheckpointChunk.sha256 == sha256))
            return s.execute(delete(m.CheckpointBlob).where(m.CheckpointBlob.sha256 == sha256)).rowcount > 0
