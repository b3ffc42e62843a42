"""Where an engine lives: its home folder, its database URL and its configuration.

Resolved once, here, for every entry point (CLI, service, Python): a command that reads
the configuration before opening the engine gets the same answer the engine will.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from engine.config import Config, load_config

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
