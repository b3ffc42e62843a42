"""Plain softmax cross-entropy over a linear head, and the growing head it shares.

Every classification loss owns a weight matrix with one row per class (or ``K`` rows
per class for sub-centre heads). Speakers arrive over time, so the head must be able to
``grow`` without disturbing the rows already trained; that logic lives here once, in
:class:`GrowingHead`, and the angular-margin heads in ``margins.py`` build on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voiceprint.engine.registry import LOSSES


class GrowingHead(nn.Module):
    """Base of the classification losses: a growable class-weight matrix plus cross-entropy.

    Subclasses implement ``scores`` (what a classifier predicts with) and ``logits``
    (``scores`` with the training margin applied to the target class); ``forward`` is
    cross-entropy on ``logits``.

    ``weight`` holds ``rows_per_class`` consecutive rows per class, so ``num_classes`` is
    derived from its shape rather than stored twice. After ``grow`` the parameter is a
    new tensor: build the optimiser again (old optimiser state refers to the old one).
    """

    kind = "classification"

    def __init__(self, embedding_dim: int, num_classes: int, rows_per_class: int = 1) -> None:
        super().__init__()
        if rows_per_class < 1:
            raise ValueError(f"rows_per_class must be >= 1, got {rows_per_class}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.embedding_dim = embedding_dim
        self.rows_per_class = rows_per_class
        self.weight = nn.Parameter(self._random_rows(num_classes * self.rows_per_class, torch.empty(0)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // self.rows_per_class

    def _random_rows(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Rows for new classes when no ``init`` is given: unit-norm random directions."""
        rows = torch.randn(n, self.embedding_dim, dtype=like.dtype, device=like.device)
        return F.normalize(rows, dim=1)

    def _init_rows(self, init: torch.Tensor) -> torch.Tensor:
        """Rows for new classes built from ``init`` ([new, D]); sub-centre heads override."""
        return init

    def grow(self, num_classes: int, init: torch.Tensor | None = None) -> None:
        """Extend the head to ``num_classes`` classes, keeping the existing rows bit-identical.

        Parameters
        ----------
        num_classes
            The new total; at least the current ``num_classes``.
        init
            Optional ``[new, D]`` starting rows for the new classes, e.g. the new
            speakers' mean embeddings, so they start where their data already is.
        """
        new = num_classes - self.num_classes
        if new < 0:
            raise ValueError(f"cannot shrink the head from {self.num_classes} to {num_classes} classes")
        old = self.weight.detach()
        if init is None:
            rows = self._random_rows(new * self.rows_per_class, old)
        else:
            if init.shape != (new, self.embedding_dim):
                raise ValueError(f"init must have shape ({new}, {self.embedding_dim}), got {tuple(init.shape)}")
            rows = self._init_rows(init.detach().to(old))
        self.weight = nn.Parameter(torch.cat([old, rows]))

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be [B, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be [{embeddings.shape[0]}], got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), the head's classes")

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free class scores ``[B, C]``; their argmax is the predicted class."""
        raise NotImplementedError

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training logits ``[B, C]``: scores with the loss's margin on each target class."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(embeddings, labels)
        return F.cross_entropy(self.logits(embeddings, labels), labels)


@LOSSES.register("softmax")
class Softmax(GrowingHead):
    """Cross-entropy over an affine head: ``L = CE(W x + b, y)``.

    The classic speaker-classification objective (as in the d-vector and x-vector
    papers): no normalisation and no margin, so it separates the training speakers but
    leaves their clusters loosely shaped for cosine scoring. Use it as a baseline or
    for warm-up; the angular-margin losses in ``margins.py`` usually verify better.

    Parameters
    ----------
    embedding_dim
        ``D``, the width of the embeddings.
    num_classes
        ``C``, the number of speakers the head starts with.

    Examples
    --------
    >>> import torch
    >>> from engine.losses import create_loss
    >>> loss = create_loss("softmax", embedding_dim=4, num_classes=3)
    >>> loss(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape
    torch.Size([])
    >>> loss.grow(5)
    >>> loss.num_classes, tuple(loss.bias.shape)
    (5, (5,))
    """

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__(embedding_dim, num_classes)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def _random_rows(self, n: int, like: torch.Tensor) -> torch.Tensor:
        # nn.Linear's default range, so logits start small whatever D is.
        bound = 1.0 / math.sqrt(self.embedding_dim)
        return torch.empty(n, self.embedding_dim, dtype=like.dtype, device=like.device).uniform_(-bound, bound)

    def grow(self, num_classes: int, init: torch.Tensor | None = None) -> None:
        new = num_classes - self.num_classes
        super().grow(num_classes, init)
        old = self.bias.detach()
        # A zero bias leaves the new classes' logits to their rows alone.
        self.bias = nn.Parameter(torch.cat([old, old.new_zeros(new)]))

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(embeddings, self.weight, self.bias)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.scores(embeddings)
