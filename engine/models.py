"""The model registry: versions with verified checkpoints, and their cached embedders.

A version's weights live in the database (``store.checkpoints``, by the sha256 its row
records), stored before the row is written, so a recorded version always has its
weights there; the checkpoint file in the home is a cache of them, made by the first
load in a home that lacks it. Hosts on one database therefore share nothing but its URL.
Every load checks the sha256. New versions are written here only, so the file is named
after the number the store assigned, never a guess.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from contextlib import suppress
from datetime import datetime, timezone

import torch

from voiceprint.engine.checkpoints import load_checkpoint, save_checkpoint, write_verified
from voiceprint.engine.embedder import Embedder
from voiceprint.engine.encoders import create_encoder
from voiceprint.engine.errors import CheckpointError, NotInitialised, StorageError, WeightsPruned
from voiceprint.engine.home import CHECKPOINTS, Home, actor
from voiceprint.engine.jobs import LOCK
from voiceprint.storage import ModelVersion, Store

log = logging.getLogger(__name__)

ACTIVE = "active"
PRUNABLE = ("rejected", "retired")  # what prune deletes the weights of
CHECKPOINT_NAME = CHECKPOINTS + "/v{number:04d}.pt"  # formatted by the store with the new number


class ModelRegistry:
    """Model versions of one store, with a cache of their embedders."""

    def __init__(self, home: Home, store: Store) -> None:
        self.home, self.store = home, store
        self._embedders: dict[int, Embedder] = {}
        self._lock = threading.Lock()

    def active(self) -> ModelVersion:
        return self.store.registry.active_version()

    def get(self, number: int) -> ModelVersion:
        return self.store.registry.get_version(number)

    def all(self) -> list[ModelVersion]:
        return self.store.registry.list_versions()

    def embedder(self, version: ModelVersion) -> Embedder:
        """The (cached) embedder of a model version, its checkpoint verified by sha256."""
        require_weights(version)
        with self._lock:
            if version.number not in self._embedders:
                encoder = create_encoder(version.encoder)
                encoder.load_state_dict(self._weights(version))
                cfg = self.home.config.encoder
                self._embedders[version.number] = Embedder(encoder, device=cfg.device, batch_windows=cfg.batch_windows)
            return self._embedders[version.number]

    def _weights(self, version: ModelVersion) -> dict[str, torch.Tensor]:
        """``version``'s verified state dict: from the home's cache file when it matches,
        else from the database through a new cache file (a file that does not match is
        replaced). Bytes from the database that do not match are refused, nothing cached."""
        path, sha = self.home.checkpoint_path(version.checkpoint), version.checkpoint_sha256
        try:
            return load_checkpoint(path, sha)
        except CheckpointError as exc:
            if self.store.checkpoints.blob(sha) is None:
                raise  # nothing better to serve: a home from before the weights moved into the database
            if path.exists():
                log.warning("version %d: %s; the database's copy replaces it", version.number, exc)
        label = f"version {version.number}'s checkpoint in the database"
        write_verified(self.store.checkpoints.chunks(sha), path, sha, label=label)
        return load_checkpoint(path, sha)

    def create(self, encoder: torch.nn.Module, *, name: str, **fields) -> ModelVersion:
        """Save ``encoder``'s weights and record them as a new version (``fields``: the
        store's ``create_version`` arguments besides the checkpoint and encoder name).

        The weights go to a temporary file, then into the database, then the version is
        recorded; once the store has numbered it, the file takes its final name (the
        home's cache of it). Nothing is recorded if the weights cannot be saved, and
        weights stored for a version that could not be recorded are deleted again.
        """
        incoming = self.home.path / CHECKPOINTS / f".incoming-{uuid.uuid4().hex}.pt"
        sha = None
        try:
            sha = save_checkpoint(encoder.state_dict(), incoming, label=f"for a new version in {CHECKPOINTS}/")
            self.store.checkpoints.put_file(sha, incoming)
            version = self.store.registry.create_version(
                encoder=name, config=self.home.config.to_dict(), checkpoint=CHECKPOINT_NAME, checkpoint_sha256=sha, **fields
            )
            os.replace(incoming, self.home.checkpoint_path(version.checkpoint))
        except BaseException:
            if sha is not None:
                with suppress(StorageError):  # the database may be what failed: its error is the one to see
                    self.store.checkpoints.delete(sha, released=())  # kept if a recorded version holds the same weights
            raise
        finally:
            incoming.unlink(missing_ok=True)
        return version

    def delete_weights(self, version: ModelVersion) -> None:
        """Delete a version's weights, from the database and from this home's cache, and
        forget its cached embedder: weights that must not survive (a candidate trained on
        audio erased since). Its row stays, as the record. The stored copy stays only if
        another version, not pruned, holds the very same weights."""
        with self._lock:
            self._embedders.pop(version.number, None)
        released = {version.number, *(v.number for v in self.all() if pruned(v))}
        self.store.checkpoints.delete(version.checkpoint_sha256, released=released)
        self.home.checkpoint_path(version.checkpoint).unlink(missing_ok=True)

    def prune(self, *, dry_run: bool = False) -> dict:
        """Delete the weights of rejected and retired versions (in the database and this
        home's cache); their rows, metrics and notes stay (``metrics["pruned"]`` records
        when and how much). Never the active version, a candidate, nor the root version
        (the pretrained weights every lineage starts from). A version pruned already is
        chosen again while weights of it are left: this home's cache file of a version
        another host pruned, a copy a crash left. Holds the refresh lock, so no refresh or
        rollback is using a version meanwhile (:class:`~voiceprint.engine.errors.RefreshBusy`
        if one runs). Returns what was (with ``dry_run``: would be) deleted and the bytes freed."""
        with self.store.exclusive(LOCK):
            versions = self.all()
            # Weights that stay: another version's, identical to a prunable one's, keep the stored copy.
            staying = {v.checkpoint_sha256 for v in versions if not prunable(v) and not pruned(v)}
            sizes = {v.number: self._size(v, staying) for v in versions if prunable(v)}
            chosen = [v for v in versions if prunable(v) and (not pruned(v) or sizes[v.number])]
            if not dry_run:
                when = datetime.now(timezone.utc).isoformat(timespec="seconds")
                # Every one recorded before any weights go: a crash between leaves versions
                # that say "pruned" (and weights the next prune deletes), never a silent gap;
                # and each deletion knows which versions' weights are all going.
                for v in chosen:
                    if not pruned(v):
                        record = {"at": when, "by": actor(), "bytes": sizes[v.number]}
                        self.store.registry.update_version(v.number, metrics={**(v.metrics or {}), "pruned": record})
                for v in chosen:
                    self.delete_weights(v)
        versions = [{"version": v.number, "status": v.status, "bytes": sizes[v.number]} for v in chosen]
        return {"dry_run": dry_run, "versions": versions, "freed_bytes": sum(v["bytes"] for v in versions)}

    def _size(self, version: ModelVersion, staying: set[str]) -> int:
        """The size of ``version``'s weights still stored where prune deletes them (the
        database, unless a version that stays holds the same; this home's cache); 0: none."""
        blob = None if version.checkpoint_sha256 in staying else self.store.checkpoints.blob(version.checkpoint_sha256)
        path = self.home.checkpoint_path(version.checkpoint)
        return blob.size_bytes if blob is not None else path.stat().st_size if path.is_file() else 0

    def import_files(self) -> dict:
        """Store in the database the weights of each version that it lacks and this home
        holds as a file: a home made before the weights moved into the database
        (``voiceprint db upgrade`` runs this after the schema). Each file is verified
        against its version's sha256 on the way in; one that does not match is not
        imported. Pruned versions are left out, and the refresh lock is held, so that no
        prune runs meanwhile whose deleted weights this would store again
        (:class:`~voiceprint.engine.errors.RefreshBusy` if one runs).

        Returns ``{"imported", "stored" (there already), "missing" (no file here),
        "mismatched": [{"version", "error"}]}``, version numbers.
        """
        done: dict[str, list] = {"imported": [], "stored": [], "missing": [], "mismatched": []}
        with self.store.exclusive(LOCK):
            for v in self.all():
                path = self.home.checkpoint_path(v.checkpoint)
                if pruned(v):
                    continue
                if self.store.checkpoints.blob(v.checkpoint_sha256) is not None:
                    done["stored"].append(v.number)
                elif not path.is_file():
                    done["missing"].append(v.number)
                else:
                    try:
                        self.store.checkpoints.put_file(v.checkpoint_sha256, path)
                    except CheckpointError as exc:
                        done["mismatched"].append({"version": v.number, "error": str(exc)})
                    else:
                        done["imported"].append(v.number)
        return done

    def ensure_first(self) -> ModelVersion:
        """The active version; on a home with none, version 1 made active.

        Version 1 is the pretrained encoder. An init that stopped between recording it
        and making it active (a full disk, a kill) left it behind: a second init verifies
        its checkpoint and finishes the job instead of starting over.
        """
        try:
            return self.active()
        except NotInitialised:
            pass
        left = self.all()
        if left:
            version = left[0]
            self.embedder(version)  # its checkpoint must verify before it becomes active
        else:
            name = self.home.config.encoder.name
            version = self.create(
                create_encoder(name, pretrained=True), name=name, note="pretrained weights shipped with resemblyzer"
            )
        self.store.registry.set_alias(ACTIVE, version.number, actor=actor(), reason="init")
        return self.active()


def prunable(version: ModelVersion) -> bool:
    """Whether :meth:`ModelRegistry.prune` deletes this version's weights (or did: weights
    of a version marked pruned that a crash or another host left are deleted again)."""
    return version.status in PRUNABLE and not version.active and version.parent is not None


def pruned(version: ModelVersion) -> bool:
    """Whether :meth:`ModelRegistry.prune` deleted (or is deleting) ``version``'s weights."""
    return "pruned" in (version.metrics or {})


def require_weights(version: ModelVersion) -> None:
    """:class:`WeightsPruned` if ``version``'s checkpoint was pruned."""
    record = (version.metrics or {}).get("pruned")
    if record:
        raise WeightsPruned(
            f"version {version.number}'s weights were pruned on {record['at']} (voiceprint prune); "
            "its record and metrics remain, but it cannot be used or activated again"
        )
