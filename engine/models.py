"""The model registry: versions with verified checkpoints, and their cached embedders.

A version's weights live in a checkpoint file under the home folder, its row in the
store records the file's sha256; every load checks it. New versions are written here
only, so the file is named after the number the store assigned, never a guess.
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime, timezone

import torch

from voiceprint.engine.checkpoints import load_checkpoint, save_checkpoint
from voiceprint.engine.embedder import Embedder
from voiceprint.engine.encoders import create_encoder
from voiceprint.engine.errors import NotInitialised, WeightsPruned
from voiceprint.engine.home import CHECKPOINTS, Home, actor
from voiceprint.engine.jobs import LOCK
from voiceprint.storage import ModelVersion, Store

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
                state = load_checkpoint(self.home.checkpoint_path(version.checkpoint), version.checkpoint_sha256)
                encoder.load_state_dict(state)
                cfg = self.home.config.encoder
                self._embedders[version.number] = Embedder(encoder, device=cfg.device, batch_windows=cfg.batch_windows)
            return self._embedders[version.number]

    def create(self, encoder: torch.nn.Module, *, name: str, **fields) -> ModelVersion:
        """Save ``encoder``'s weights and record them as a new version (``fields``: the
        store's ``create_version`` arguments besides the checkpoint and encoder name).

        The weights go to a temporary file first; once the store has numbered the version,
        the file takes its final name. Nothing is recorded if the weights cannot be saved.
        """
        incoming = self.home.path / CHECKPOINTS / f".incoming-{uuid.uuid4().hex}.pt"
        try:
            sha = save_checkpoint(encoder.state_dict(), incoming, label=f"for a new version in {CHECKPOINTS}/")
            version = self.store.registry.create_version(
                encoder=name, config=self.home.config.to_dict(), checkpoint=CHECKPOINT_NAME, checkpoint_sha256=sha, **fields
            )
            os.replace(incoming, self.home.checkpoint_path(version.checkpoint))
        finally:
            incoming.unlink(missing_ok=True)
        return version

    def delete_weights(self, version: ModelVersion) -> None:
        """Delete a version's checkpoint and forget its cached embedder: weights that must
        not survive (a candidate trained on audio erased since). Its row stays, as the record."""
        with self._lock:
            self._embedders.pop(version.number, None)
        self.home.checkpoint_path(version.checkpoint).unlink(missing_ok=True)

    def prune(self, *, dry_run: bool = False) -> dict:
        """Delete the checkpoints of rejected and retired versions; their rows, metrics and
        notes stay (``metrics["pruned"]`` records when and how much). Never the active
        version, a candidate, nor the root version (the pretrained weights every lineage
        starts from). Holds the refresh lock, so no refresh or rollback is using a version
        meanwhile (:class:`~voiceprint.engine.errors.RefreshBusy` if one runs). Returns what was (with
        ``dry_run``: would be) deleted and the bytes freed."""
        with self.store.exclusive(LOCK):
            found = {v.number: self.home.checkpoint_path(v.checkpoint) for v in self.all()}
            chosen = [v for v in self.all() if prunable(v) and ("pruned" not in (v.metrics or {}) or found[v.number].exists())]
            sizes = {v.number: found[v.number].stat().st_size if found[v.number].is_file() else 0 for v in chosen}
            if not dry_run:
                when = datetime.now(timezone.utc).isoformat(timespec="seconds")
                for v in chosen:
                    # Recorded before the file goes: a crash between leaves a version that
                    # says "pruned" (and a file the next prune deletes), never a silent gap.
                    if "pruned" not in (v.metrics or {}):
                        record = {"at": when, "by": actor(), "bytes": sizes[v.number]}
                        self.store.registry.update_version(v.number, metrics={**(v.metrics or {}), "pruned": record})
                    self.delete_weights(v)
        versions = [{"version": v.number, "status": v.status, "bytes": sizes[v.number]} for v in chosen]
        return {"dry_run": dry_run, "versions": versions, "freed_bytes": sum(sizes.values())}

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
    """Whether :meth:`ModelRegistry.prune` deletes this version's weights (or did: a
    version marked pruned whose file a crash left is deleted again)."""
    return version.status in PRUNABLE and not version.active and version.parent is not None


def require_weights(version: ModelVersion) -> None:
    """:class:`WeightsPruned` if ``version``'s checkpoint was pruned."""
    pruned = (version.metrics or {}).get("pruned")
    if pruned:
        raise WeightsPruned(
            f"version {version.number}'s weights were pruned on {pruned['at']} (voiceprint prune); "
            "its record and metrics remain, but it cannot be used or activated again"
        )
