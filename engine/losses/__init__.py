"""Speaker-recognition losses, one family per file, registered by name.

Three kinds, told apart by the class attribute ``kind``:

``"classification"``
    ``loss(embeddings [B, D], labels [B]) -> scalar``. Owns a head over the known
    speakers (``num_classes``) that can ``grow(n)`` when speakers are enrolled; the
    head is part of the loss's ``state_dict`` and is saved with the version.
``"metric"``
    ``loss(embeddings [N, M, D]) -> scalar`` on a speaker-balanced batch: N speakers
    with M utterances each (``M >= 2``).
``"distillation"``
    ``loss(student [B, D], teacher [B, D]) -> scalar``.

Build one with ``create_loss(name, embedding_dim=..., num_classes=..., **hyper)``;
metric and distillation losses ignore ``num_classes``.
"""

from __future__ import annotations

from torch import nn

from voiceprint.engine.registry import LOSSES


def create_loss(name: str, *, embedding_dim: int, num_classes: int = 0, **hyper) -> nn.Module:
    loss_cls = LOSSES.get(name)
    if loss_cls.kind == "classification":
        return loss_cls(embedding_dim=embedding_dim, num_classes=num_classes, **hyper)
    return loss_cls(**hyper)


# Importing the family modules registers them.
from voiceprint.engine.losses import distill, e2e, ge2e, margins, pairwise, softmax, triplet  # noqa: E402,F401
