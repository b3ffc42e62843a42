"""Readiness: can this process do its work right now? (Liveness needs no check.)

Each check runs on its own and reports ``{"ok": bool, "error": code}``; the answer is
ready only when all pass. The checks are what enrollment and identification need:

- ``database``: the store answers a read (the active version);
- ``checkpoint``: the active version's checkpoint loads and matches its sha256 (loaded
  once per version and cached, as recognition does);
- ``disk``: a small file can be written and synced where the SQLite database and the
  checkpoints live, so a full disk shows here before enrollments fail on it (and, once
  it passes, the home's disk reserve is made again if a full disk used it up).

Messages name no paths or URLs: readiness is served without a key; the log has the
details.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Callable

from voiceprint.engine.errors import VoiceprintError
from voiceprint.engine.home import CHECKPOINTS, keep_reserve, sqlite_file
from voiceprint.engine.models import ModelRegistry

log = logging.getLogger(__name__)

PROBE_BYTES = 256 * 1024  # about what one enrollment writes (FLAC, embedding, WAL pages)


def readiness(models: ModelRegistry) -> dict:
    """``{"ready": bool, "active_version": n or None, "checks": {name: {"ok", "error"}}}``."""
    checks: dict[str, dict] = {}
    active = _check(checks, "database", models.active)
    if active is None:
        checks["checkpoint"] = {"ok": False, "error": "database_unavailable"}
    else:
        _check(checks, "checkpoint", lambda: models.embedder(active))
    if _check(checks, "disk", lambda: [_probe_write(folder) for folder in _writable_folders(models)]) is not None:
        keep_reserve(models.home.path)  # given up when the disk filled: taken back now there is room
    return {
        "ready": all(c["ok"] for c in checks.values()),
        "active_version": None if active is None else active.number,
        "checks": checks,
    }


def _check(checks: dict, name: str, run: Callable):
    try:
        value = run()
    except (VoiceprintError, OSError) as exc:
        log.warning("readiness check %s failed: %s", name, exc)
        checks[name] = {"ok": False, "error": getattr(exc, "code", None) or _os_code(exc)}
        return None
    checks[name] = {"ok": True, "error": None}
    return value


def _os_code(exc: OSError) -> str:
    return "disk_full" if exc.errno == 28 else "os_error"  # 28: ENOSPC


def _writable_folders(models: ModelRegistry) -> list[Path]:
    folders = [models.home.path / CHECKPOINTS]
    db_file = sqlite_file(models.home.url)
    if db_file is not None and db_file.parent.resolve() != folders[0].resolve():
        folders.append(db_file.parent)
    return folders


def _probe_write(folder: Path) -> None:
    probe = folder / f".ready-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        probe.unlink(missing_ok=True)
