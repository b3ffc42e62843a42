"""Speaker encoders, one architecture per file, registered by name.

An encoder is an ``nn.Module`` that maps a batch of fixed-length feature windows
``[batch, frames, dims]`` to L2-normalised embeddings ``[batch, embedding_dim]``. Each
class declares the front end it expects (``frontend``), its window length in frames
(``window_frames``) and ``embedding_dim``; ``pretrained_state()`` returns the weights a
fresh installation starts from, and ``layer_groups()`` its parameters layer by layer,
bottom to top, so that a refresh can keep the lower layers as they are. An encoder that
ships weights should also ship ``reference_nontarget_cosine``: how its non-target
cosines are distributed on a reference population (see :func:`reference_scores`).
"""

from __future__ import annotations

from torch import nn

from voiceprint.engine.registry import ENCODERS


def create_encoder(name: str, *, pretrained: bool = False) -> nn.Module:
    """Build the encoder registered as ``name``, optionally with its shipped weights."""
    encoder_cls = ENCODERS.get(name)
    encoder = encoder_cls()
    if pretrained:
        encoder.load_state_dict(encoder_cls.pretrained_state())
    return encoder


def reference_scores(name: str) -> dict | None:
    """The encoder's reference measurement of non-target cosines (``{"mean", "std", ...}``),
    which sets decisions before a version is calibrated; None if it ships none."""
    return getattr(ENCODERS.get(name), "reference_nontarget_cosine", None)


# Importing the architecture modules registers them.
from voiceprint.engine.encoders import ge2e_lstm  # noqa: E402,F401
