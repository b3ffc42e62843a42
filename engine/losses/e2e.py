"""The end-to-end (E2E) verification loss, and the learnable cosine score it introduced.

Heigold et al. (2016), "End-to-end text-dependent speaker verification", turned a cosine
score into a verification probability with a learned logistic, ``sigmoid(w * cos + b)``.
The pairwise and GE2E losses reuse that score, so the shared pieces live here:
``check_metric_batch`` and ``LearnableCosineScore``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voiceprint.engine.registry import LOSSES

W_FLOOR = 1e-6  # smallest value the scale w can take, so that it is positive by construction


def check_metric_batch(embeddings: torch.Tensor) -> tuple[int, int]:
    """Return ``(N, M)`` of a speaker-balanced batch ``[N, M, D]``, or raise ValueError.

    Every metric loss needs a positive (two utterances of one speaker) and a negative
    (two speakers), hence ``N >= 2`` and ``M >= 2``.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"a metric loss expects embeddings [N, M, D], got shape {tuple(embeddings.shape)}")
    n, m, _ = embeddings.shape
    if m < 2:
        raise ValueError(f"a metric loss needs at least 2 utterances per speaker, got M={m}")
    if n < 2:
        raise ValueError(f"a metric loss needs at least 2 speakers per batch, got N={n}")
    return n, m


class LearnableCosineScore(nn.Module):
    """Base class for losses that score a cosine as ``w * cos + b`` with learnable ``w > 0`` and ``b``.

    ``w`` is ``softplus(w_raw) + 1e-6`` rather than the paper's ``clamp(w, 1e-6)``: a
    clamped scale that an optimiser pushes below the floor gets a zero gradient and
    never recovers, whereas softplus always passes some gradient back.
    """

    def __init__(self, init_w: float = 10.0, init_b: float = -5.0, *, bias: bool = True) -> None:
        super().__init__()
        if init_w <= W_FLOOR:
            raise ValueError(f"init_w must be greater than {W_FLOOR}, got {init_w}")
        self.init_w = init_w
        self.init_b = init_b
        # Inverse softplus, written as x + log(1 - exp(-x)) so that a large init_w cannot overflow.
        start = init_w - W_FLOOR
        self.w_raw = nn.Parameter(torch.tensor(start + math.log(-math.expm1(-start))))
        if bias:
            self.b = nn.Parameter(torch.tensor(float(init_b)))
        else:
            self.register_parameter("b", None)

    @property
    def w(self) -> torch.Tensor:
        return F.softplus(self.w_raw) + W_FLOOR

    def score(self, cosine: torch.Tensor) -> torch.Tensor:
        logits = self.w * cosine
        return logits if self.b is None else logits + self.b


@LOSSES.register("e2e")
class E2ELoss(LearnableCosineScore):
    """End-to-end verification loss (Heigold et al., 2016).

    For each speaker ``k`` of an ``[N, M, D]`` batch, the first ``M - 1`` utterances are
    averaged into a speaker model ``c_k`` and the last one, ``x_k``, is the test utterance.
    The sampler draws utterances in a random order, so each one is the test utterance in
    some batches; with a fixed order the others would only be fitted on average. Every
    test utterance is scored against every model, ``p_jk = sigmoid(w * cos(x_j, c_k) + b)``,
    and the loss is the binary cross-entropy averaged over the ``N * N`` trials, with the
    ``N * (N - 1)`` impostor trials weighted by ``K``::

        L = mean_{j,k} [ -[j = k] log p_jk - K [j != k] log(1 - p_jk) ]

    Use it to train a verifier directly on the accept/reject decision it will make. It
    sees one test trial per speaker and batch, so it learns more slowly than GE2E, which
    uses every utterance as a test.

    Parameters
    ----------
    negative_weight
        ``K`` in ``(0, 1]``. There are ``N - 1`` impostor trials per genuine one; ``K < 1``
        keeps them from dominating. The paper leaves ``K`` to tuning; 0.5 is a middle
        value, and 1 gives the unweighted cross-entropy.
    init_w, init_b
        Initial scale and bias of the logistic score.
    """

    kind = "metric"

    def __init__(self, negative_weight: float = 0.5, init_w: float = 10.0, init_b: float = -5.0) -> None:
        super().__init__(init_w, init_b)
        if not 0.0 < negative_weight <= 1.0:
            raise ValueError(f"negative_weight must be in (0, 1], got {negative_weight}")
        self.negative_weight = negative_weight

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, _ = check_metric_batch(embeddings)
        x = F.normalize(embeddings, dim=-1)
        models = F.normalize(x[:, :-1].mean(dim=1), dim=-1)
        logits = self.score(x[:, -1] @ models.T)  # row j: test utterance of speaker j against every model
        genuine = torch.eye(n, dtype=logits.dtype, device=logits.device)
        weight = genuine + self.negative_weight * (1.0 - genuine)
        return F.binary_cross_entropy_with_logits(logits, genuine, weight=weight)
