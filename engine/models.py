"""The model registry: versions with verified checkpoints, and their cached embedders.

A version's weights live in a checkpoint file under the home folder, its row in the
store records the file's sha256; every load checks it. New versions are written here
only, so the file is named after the number the store assigned, never a guess.
"""

from __future__ import annotations

import os
import threading
import uuid

import torch

from engine.checkpoints import load_checkpoint, save_checkpoint
from engine.embedder import Embedder
from engine.encoders import create_encoder
from engine.errors import NotInitialised
from engine.home import CHECKPOINTS, Home, actor
from storage import ModelVersion, Store

ACTIVE = "active"
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
