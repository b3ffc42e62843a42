"""One database: its engines, managed sessions, error translation and locks.

Every repository of :mod:`storage` receives a :class:`Database` and runs each of its
public methods in one :meth:`Database.session`, which commits, rolls back and closes,
and turns SQLAlchemy errors into the project's own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import Engine, Table, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from voiceprint.engine.errors import DiskFull, DuplicateUtterance, RefreshBusy, StorageError, UnknownVersion, VersionChanged
from voiceprint.storage import feed
from voiceprint.storage import models as m

log = logging.getLogger(__name__)

# In-memory SQLite lives in one process, so an in-process lock is the whole story there.
_MEMORY_LOCKS: dict[str, threading.Lock] = {}
SQLITE_BUSY_TIMEOUT_MS = 30_000
_INSERTS = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}


class Database:
    """SQLite (the embedded default) or PostgreSQL, opened for the repositories.

    ``url`` and ``echo`` are :class:`voiceprint.storage.Store`'s; so are the errors raised.
    """

    def __init__(self, url: str, *, echo: bool = False):
        try:
            self._url: URL = make_url(url)
        except SQLAlchemyError as exc:
            raise StorageError(f"invalid database URL: {exc}") from exc
        self._backend = self._url.get_backend_name()
        if self._backend not in _INSERTS:
            raise StorageError(f"unsupported database {self.url}: use sqlite or postgresql")
        with self._translating("open the database"):
            if self._backend == "sqlite":
                self._write = _sqlite_engine(self._url, echo=echo, begin="BEGIN IMMEDIATE")
                # An in-memory database exists once per connection: reads must share it.
                self._read = (
                    self._write
                    if _in_memory(self._url)
                    else _sqlite_engine(self._url, echo=echo, begin="BEGIN")
                )
            else:
                self._write = self._read = create_engine(self._url, echo=echo, pool_pre_ping=True)
            with self._read.connect():
                pass
        self._read_sessions = sessionmaker(self._read, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write, expire_on_commit=False)
        event.listen(self._write_sessions, "before_commit", feed.stamp)  # the centroid change feed
        self.writes = 0  # write transactions this process committed (a cached index syncs after its own)
        # Run after each committed write transaction (storage.scrub retries a pending scrub there).
        self.after_write: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return self._url.render_as_string(hide_password=True)

    @property
    def url_with_password(self) -> str:
        """The full URL, for tools that must open the database themselves (Alembic)."""
        return self._url.render_as_string(hide_password=False)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._backend

    @property
    def write_engine(self) -> Engine:
        """The engine writers use, for libraries that bring their own SQL (APScheduler)."""
        return self._write

    def close(self) -> None:
        """Close every pooled connection."""
        self._write.dispose()
        self._read.dispose()

    @contextmanager
    def session(self, doing: str, *, write: bool = False) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error, always close.

        ``doing`` completes "cannot ..." in error messages. After a write commits,
        :attr:`after_write` runs (not after a failure: the exception leaves first).
        """
        session = (self._write_sessions if write else self._read_sessions)()
        try:
            with self._translating(doing), session.begin():
                yield session
        finally:
            session.close()
        if write:
            self.writes += 1
        if write and self.after_write is not None:
            self.after_write()

    @contextmanager
    def migration_session(self, doing: str) -> Iterator[Session]:
        """A write transaction for a schema change.

        On SQLite, foreign keys are switched off around it: a migration that copies a
        table (Alembic's batch mode, which SQLite needs to alter most things) drops the
        old one, and with foreign keys on that drop first deletes its rows, cascading to
        every table that references it (kept audio, embeddings). The keys are checked
        before the commit instead, and switched on again before the connection goes back
        to the pool. The pragma only takes effect outside a transaction, hence the raw
        driver connection before SQLAlchemy begins one.
        """
        if self._backend != "sqlite":
            with self.session(doing, write=True) as s:
                yield s
            return
        with self._translating(doing), self._write.connect() as connection:
            raw = connection.connection.dbapi_connection
            raw.execute("PRAGMA foreign_keys = OFF")
            try:
                with Session(bind=connection, expire_on_commit=False) as session, session.begin():
                    yield session
                    broken = session.connection().exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StorageError(f"cannot {doing}: it would break {len(broken)} foreign key(s), e.g. {broken[0]}")
            finally:
                raw.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def version_checked(self, version: int) -> Iterator[None]:
        """Report a refused write as UnknownVersion when the version it names does not exist.

        The foreign keys already enforce the version; looking it up only after a failure
        keeps the enrollment hot path to the statements it needs.
        """
        try:
            yield
        except StorageError as exc:
            if not isinstance(exc, (DuplicateUtterance, VersionChanged)) and not self._version_exists(version):
                raise UnknownVersion(f"model version {version} does not exist") from None
            raise

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the lock ``name`` across every process using this database, or raise
        :class:`RefreshBusy` at once if another holder has it.

        PostgreSQL: a session-level advisory lock on a dedicated connection. SQLite: an
        ``flock`` on a file beside the database. Both vanish with the process that holds
        them, so a killed refresh never leaves a stale lock behind.
        """
        if self._backend == "postgresql":
            key = zlib.crc32(name.encode())
            with self._translating(f"take the {name} lock"), self._write.connect() as conn:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
                conn.commit()
                if not got:
                    raise RefreshBusy(f"another process holds the {name} lock (a {name} is running)")
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()
        elif _in_memory(self._url):
            lock = _MEMORY_LOCKS.setdefault(name, threading.Lock())
            if not lock.acquire(blocking=False):
                raise RefreshBusy(f"another thread holds the {name} lock (a {name} is running)")
            try:
                yield
            finally:
                lock.release()
        else:
            path = Path(self._url.database).expanduser()
            fd = os.open(path.with_name(f"{path.name}.{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RefreshBusy(f"another process holds the {name} lock (a {name} is running)") from None
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def truncate_wal(self, *, wait_ms: int = 0) -> bool:
        """Copy the write-ahead log into the database and empty it, so that page images
        from before a delete do not linger in it (see :mod:`voiceprint.storage.scrub`).

        The checkpoint cannot pass a reader that still holds an older snapshot (nor a
        writer); it waits at most ``wait_ms`` for them, then returns False, the log left
        as it was. True at once for in-memory SQLite (no files); False on PostgreSQL.
        """
        if self._backend != "sqlite" or _in_memory(self._url):
            return self._backend == "sqlite"
        # On the raw connection: a checkpoint cannot run inside the transaction that
        # SQLAlchemy would begin.
        connection = self._write.raw_connection()
        try:
            cursor = connection.cursor()
            # TRUNCATE waits through the busy handler: the full write timeout would stall
            # the caller for 30 s behind one slow reader.
            cursor.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
            try:
                busy, _, _ = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            return busy == 0
        except Exception as exc:  # what asked for it (an erasure) is committed: report, don't undo
            log.warning("the write-ahead log was not truncated: %s", exc)
            return False
        finally:
            connection.close()

    @contextmanager
    def _translating(self, doing: str) -> Iterator[None]:
        """Turn SQLAlchemy and Alembic errors into :class:`StorageError` subclasses.

        The project's own exceptions pass through unchanged.
        """
        try:
            yield
        except SQLAlchemyError as exc:
            if isinstance(exc, IntegrityError) and _is_duplicate_utterance(exc):
                raise DuplicateUtterance(
                    f"cannot {doing}: this audio content is already enrolled for the speaker"
                ) from exc
            if _is_disk_full(exc):
                raise DiskFull(f"disk full: cannot {doing}: free space on the disk that holds the database") from exc
            reason = _first_line(getattr(exc, "orig", None) or exc)
            raise StorageError(f"cannot {doing} ({self.url}): {reason}") from exc
        except CommandError as exc:
            raise StorageError(f"cannot {doing}: {exc}") from exc

    def _version_exists(self, number: int) -> bool:
        with self.session(f"look up model version {number}") as s:
            return s.get(m.ModelVersion, number) is not None


def insert_ignoring_conflict(session: Session, table: Table, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    insert = _INSERTS[session.get_bind().dialect.name]
    statement = insert(table).values(**values).on_conflict_do_nothing()
    # RETURNING rather than rowcount: SQLAlchemy adds an implicit RETURNING on PostgreSQL,
    # after which the driver reports rowcount -1.
    inserted = session.execute(statement.returning(*table.primary_key.columns)).first()
    return inserted is not None


def now() -> datetime:
    return datetime.now(UTC)


def _sqlite_engine(url: URL, *, echo: bool, begin: str) -> Engine:
    """A SQLite engine whose transactions start with ``begin``.

    Writers use BEGIN IMMEDIATE: a deferred transaction that reads and then writes must
    upgrade its lock, and two processes doing so at once deadlock ("database is locked")
    where busy_timeout cannot help. Following SQLAlchemy's documented recipe, pysqlite's
    own transaction handling is switched off and SQLAlchemy emits the BEGIN.
    """
    options: dict[str, Any] = {}
    if _in_memory(url):
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = create_engine(url, echo=echo, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # Deleted rows are overwritten with zeros, not left in free pages: voiceprints
        # are biometric data, and an erased speaker must not be recoverable from the file.
        cursor.execute("PRAGMA secure_delete = ON")
        # WAL: readers never block the writer and the writer never blocks readers.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _is_duplicate_utterance(exc: IntegrityError) -> bool:
    message = str(exc.orig)
    # PostgreSQL names the constraint; SQLite lists its columns.
    return (
        m.UTTERANCE_CONTENT_UNIQUE in message
        or "utterances.speaker_id, utterances.content_sha256" in message
    )


def _is_disk_full(exc: SQLAlchemyError) -> bool:
    # SQLite: SQLITE_FULL (a write), SQLITE_IOERR_SHMSIZE (no room for the 32 KiB index a
    # WAL database needs even to be read); PostgreSQL: SQLSTATE 53100 disk_full.
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlite_errorcode", None) in (13, 4874) or getattr(orig, "sqlstate", None) == "53100"


def _first_line(error: object) -> str:
    # PostgreSQL appends DETAIL/HINT lines; the first line reads well on its own.
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
