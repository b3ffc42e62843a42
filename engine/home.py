"""Where an engine lives: its home folder, its database URL and its configuration.

Resolved once, here, for every entry point (CLI, service, Python): a command that reads
the configuration before opening the engine gets the same answer the engine will.
"""

from __future__ import annotations

import getpass
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from voiceprint.engine.config import Config, load_config

DEFAULT_HOME = "voiceprint-home"
CONFIG_FILE = "config.toml"
DB_FILE = "voiceprint.db"
CHECKPOINTS = "checkpoints"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """``home``, else ``$VOICEPRINT_HOME``, else ``./voiceprint-home``."""
    return Path(home or os.environ.get("VOICEPRINT_HOME") or DEFAULT_HOME).expanduser().resolve()


def resolve_db(db: str | None, home: Path) -> str:
    """``db``, else ``$VOICEPRINT_DATABASE_URL``, else SQLite inside the home folder."""
    return db or os.environ.get("VOICEPRINT_DATABASE_URL") or f"sqlite:///{home / DB_FILE}"


def load_home_config(home: str | os.PathLike | None = None) -> Config:
    """The configuration of a home (its ``config.toml`` and environment overrides)."""
    return load_config(resolve_home(home) / CONFIG_FILE)


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


@contextmanager
def undone_on_failure(home: Home) -> Iterator[None]:
    """Remove what an init creates (database file, checkpoints folder, home folder) if it
    fails, so that a failed init (a full disk) leaves no half-made home behind.

    Only what did not exist before is removed; the caller closes its store first. A
    database that did exist is left as it is: init completes it when run again.
    """
    database = sqlite_file(home.url)
    created = [p for p in (home.path, home.path / CHECKPOINTS) if not p.exists()]
    new_database = database is not None and not database.exists()
    try:
        yield
    except BaseException:
        if new_database:
            for suffix in ("", "-wal", "-shm", "-journal"):
                database.with_name(database.name + suffix).unlink(missing_ok=True)
        for folder in reversed(created):  # inner first: each must be empty to go
            if folder == home.path / CHECKPOINTS:
                shutil.rmtree(folder, ignore_errors=True)  # only this init's files are in it
            else:
                with suppress(OSError):
                    folder.rmdir()  # not if something else is in it now
        raise


# A few megabytes held in the home and given up when the disk fills, so that the database
# can still be opened (SQLite must create its 32 KiB shared-memory index even to read)
# and identification keeps working while someone frees space. Made again once there is room.
RESERVE = ".disk-reserve"
RESERVE_BYTES = 8 * 1024 * 1024


def keep_reserve(home: Path) -> bool:
    """Make sure the reserve file exists; False (and no partial file) when there is no room."""
    reserve = home / RESERVE
    if reserve.exists():
        return True
    try:
        with open(reserve, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)  # written, not sparse: it must really hold the space
            fh.flush()
            os.fsync(fh.fileno())
        return True
    except OSError:
        reserve.unlink(missing_ok=True)
        return False


def release_reserve(home: Path) -> bool:
    """Give the reserve's space back to the disk; False when there was none to give."""
    try:
        (home / RESERVE).unlink()
        return True
    except FileNotFoundError:
        return False


def actor() -> str:
    """Who is acting, for audit logs and alias history: the login name."""
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


@dataclass(frozen=True)
class Home:
    """A resolved home: folder, database URL and configuration."""

    path: Path
    url: str
    config: Config

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None, db: str | None = None, config: Config | None = None) -> Home:
        path = resolve_home(home)
        return cls(path, resolve_db(db, path), config if config is not None else load_config(path / CONFIG_FILE))

    def checkpoint_path(self, relative: str | os.PathLike) -> Path:
        """A version's checkpoint file; stored paths are relative to the home."""
        path = Path(relative)
        return path if path.is_absolute() else self.path / path
