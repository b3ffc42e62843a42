"""Pairwise binary cross-entropy over every pair of utterances in a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voiceprint.engine.registry import LOSSES
from voiceprint.engine.losses.e2e import LearnableCosineScore, check_metric_batch


@LOSSES.register("pairwise-bce")
class PairwiseBCELoss(LearnableCosineScore):
    """Binary cross-entropy on every unordered pair of an ``[N, M, D]`` batch.

    Each pair ``(u, v)`` is a verification trial with probability of "same speaker"
    ``sigmoid(w * cos(u, v) + b)``; the logistic score is the one Heigold et al. (2016)
    introduced for end-to-end verification. It trains the scores that verification
    thresholds, with no centroids involved, so it suits batches where a speaker's few
    utterances make a poor centroid.

    Parameters
    ----------
    balance
        A batch holds ``N * M * (M - 1) / 2`` genuine pairs but ``M^2 * N * (N - 1) / 2``
        impostor ones. When true (the default) the loss is the mean over genuine pairs plus
        the mean over impostor pairs, halved, so that each kind weighs one half; when false
        it is the plain mean over all pairs, dominated by impostors.
    init_w, init_b
        Initial scale and bias of the logistic score.
    """

    kind = "metric"

    def __init__(self, balance: bool = True, init_w: float = 10.0, init_b: float = -5.0) -> None:
        super().__init__(init_w, init_b)
        self.balance = balance

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, m = check_metric_batch(embeddings)
        x = F.normalize(embeddings.reshape(n * m, -1), dim=-1)
        first, second = torch.triu_indices(n * m, n * m, offset=1, device=x.device)
        logits = self.score((x[first] * x[second]).sum(dim=-1))
        same = (first // m) == (second // m)  # rows are speaker-major
        losses = F.binary_cross_entropy_with_logits(logits, same.to(logits.dtype), reduction="none")
        if not self.balance:
            return losses.mean()
        return 0.5 * (losses[same].mean() + losses[~same].mean())
