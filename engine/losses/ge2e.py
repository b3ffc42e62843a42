"""Generalised end-to-end (GE2E) losses (Wan et al., 2018): softmax and contrast variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voiceprint.engine.registry import LOSSES
from voiceprint.engine.losses.e2e import LearnableCosineScore, check_metric_batch


class _GE2E(LearnableCosineScore):
    """The similarity matrix both GE2E variants share.

    ``S[j, i, k] = w * cos(e_ji, c_k) + b`` where ``c_k`` is the centroid of speaker ``k``,
    except that the own centroid ``c_j`` leaves ``e_ji`` out (the mean of the other
    ``M - 1`` utterances): an utterance that is part of its own centroid makes the
    positive score too easy. Embeddings are L2-normalised before the centroids are taken,
    as they are in the paper.
    """

    kind = "metric"

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, _ = check_metric_batch(embeddings)
        x = F.normalize(embeddings, dim=-1)
        # A cosine ignores length, so sums stand in for means (no division by M or M - 1).
        totals = x.sum(dim=1, keepdim=True)
        centroids = F.normalize(totals.squeeze(1), dim=-1)
        exclusive = F.normalize(totals - x, dim=-1)
        cosine = x @ centroids.T
        own_cosine = (x * exclusive).sum(dim=-1, keepdim=True)
        cosine = torch.where(self._own(n, x.device), own_cosine, cosine)
        return self.score(cosine)

    @staticmethod
    def _own(n: int, device: torch.device) -> torch.Tensor:
        """Mask ``[N, 1, N]``, true where the centroid is the utterance's own speaker's."""
        return torch.eye(n, dtype=torch.bool, device=device).unsqueeze(1)


@LOSSES.register("ge2e-softmax")
class GE2ESoftmaxLoss(_GE2E):
    """GE2E softmax loss (Wan et al., 2018), averaged over the ``N * M`` utterances::

        L = mean_{j,i} [ -S[j,i,j] + log sum_k exp(S[j,i,k]) ]

    Every utterance is pulled toward its own (exclusive) centroid and pushed from all the
    others at once, through a cross-entropy over speakers. The paper found it the better
    variant for text-independent verification; it is the loss the shipped GE2E LSTM was
    trained with.

    The softmax does not change when the same ``b`` is added to every score, so this
    variant has no bias: it would be a parameter whose gradient is always zero.

    >>> loss = GE2ESoftmaxLoss()
    >>> loss(torch.randn(4, 3, 8)).shape
    torch.Size([])
    """

    def __init__(self, init_w: float = 10.0) -> None:
        super().__init__(init_w, bias=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        scores = self.similarities(embeddings)
        n, m, _ = scores.shape
        speakers = torch.arange(n, device=scores.device).repeat_interleave(m)
        return F.cross_entropy(scores.reshape(n * m, n), speakers)


@LOSSES.register("ge2e-contrast")
class GE2EContrastLoss(_GE2E):
    """GE2E contrast loss (Wan et al., 2018), averaged over the ``N * M`` utterances::

        L = mean_{j,i} [ 1 - sigmoid(S[j,i,j]) + max_{k != j} sigmoid(S[j,i,k]) ]

    Each utterance meets only its most confusable other speaker, so the loss concentrates
    on the hardest impostor; the paper found it the better variant for text-dependent
    verification.
    """

    def __init__(self, init_w: float = 10.0, init_b: float = -5.0) -> None:
        super().__init__(init_w, init_b)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        scores = self.similarities(embeddings)
        own_mask = self._own(scores.shape[0], scores.device)
        own = scores.diagonal(dim1=0, dim2=2).T  # [N, M]: S[j, i, j]
        # The sigmoid is increasing, so the hardest impostor is found on the logits.
        impostor = scores.masked_fill(own_mask, float("-inf")).amax(dim=-1)
        return (1.0 - torch.sigmoid(own) + torch.sigmoid(impostor)).mean()
