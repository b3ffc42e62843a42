"""Encoder checkpoints on disk, verified by sha256 before every load.

A checkpoint is the encoder's ``state_dict`` saved with ``torch.save``. It is written to
a temporary file, flushed to disk and renamed into place, so a crash never leaves a
half-written checkpoint under the final name; the sha256 stored with the model version
catches any later corruption, and ``weights_only=True`` means a tampered file cannot
execute code.

A checkpoint read from the database (:func:`write_verified`) reaches its file the same
way, hashed on the way: bytes that do not match the recorded sha256 never get the name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from voiceprint.engine.errors import CheckpointError, DiskFull

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota is spent


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: Path, *, label: str | None = None) -> str:
    """Write ``state_dict`` atomically to ``path`` and return its sha256.

    A failed write leaves no file behind. A full disk raises :class:`DiskFull` (the
    service answers 503: free space and try again), any other error
    :class:`CheckpointError`; both name the file by ``label`` (default: its name), so
    that a message sent to a client shows no path of the server.
    """
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(exc, f"cannot write checkpoint {label or path.name} ({len(data) / 2**20:.1f} MiB)") from None
    return sha256_bytes(data)


def write_verified(chunks: Iterable[bytes], path: Path, sha256: str, *, label: str) -> None:
    """Write ``chunks`` to ``path`` through a temporary file beside it, hashing them on
    the way; only bytes whose sha256 is ``sha256`` are renamed into place.

    A mismatch raises :class:`CheckpointError` ("corrupted") and leaves no file; so does
    any failure of ``chunks`` itself. Errors name the checkpoint by ``label`` only.
    """
    tmp = path.with_name(f".incoming-{uuid.uuid4().hex}{path.suffix}")  # unique: another process may fetch it too
    digest = hashlib.sha256()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if digest.hexdigest() != sha256:
            raise CheckpointError(
                f"{label} is corrupted: sha256 {digest.hexdigest()[:12]}... != recorded {sha256[:12]}..."
            )
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(exc, f"cannot write {label} to the home's cache") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_error(exc: OSError, what: str) -> DiskFull | CheckpointError:
    if exc.errno in DISK_FULL:
        return DiskFull(f"disk full: {what}: free space on the disk that holds the home, then try again")
    return CheckpointError(f"{what}: {exc.strerror or exc}")


def load_checkpoint(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint, refusing it unless its sha256 matches the recorded one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    actual = sha256_bytes(data)
    if actual != sha256:
        raise CheckpointError(f"checkpoint {path} is corrupted: sha256 {actual[:12]}... != recorded {sha256[:12]}...")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum matched, so this is a bug in whoever wrote it
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state
