"""Triplet loss on cosine similarity, with online mining inside the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voiceprint.engine.registry import LOSSES
from voiceprint.engine.losses.e2e import check_metric_batch

MINING = ("batch-hard", "semi-hard")


@LOSSES.register("triplet")
class TripletLoss(nn.Module):
    """Cosine triplet loss ``max(0, s_an - s_ap + alpha)`` with in-batch mining.

    ``s_ap`` and ``s_an`` are the cosine similarities of an anchor to a positive (same
    speaker) and a negative (another speaker). Triplets come from the ``[N, M, D]`` batch:

    ``"batch-hard"`` (Hermans et al., 2017, "In defense of the triplet loss")
        one triplet per anchor: its least similar positive and most similar negative.
    ``"semi-hard"`` (Schroff et al., 2015, FaceNet)
        one triplet per anchor-positive pair, with the most similar negative among those
        less similar than the positive but inside the margin
        (``s_ap - alpha < s_an < s_ap``); where there is none, the most similar negative.
        Gentler than batch-hard early in training, when the hardest negatives are often
        label noise or outliers.

    The loss is the mean over the triplets whose loss is non-zero, not over all of them:
    otherwise the easy triplets, more numerous as training goes on, would shrink the
    gradient toward nothing. When every triplet satisfies the margin the loss is exactly
    0 and nothing is learned from the batch; ``last_active_fraction``, the fraction of
    triplets with a non-zero loss in the last call, makes that visible to logging.

    Use it when only relative order matters (no learned scale or bias); it needs
    ``M >= 2`` and profits from larger ``M``, which gives more positives to mine.

    Parameters
    ----------
    alpha
        The margin in cosine similarity.
    mining
        ``"batch-hard"`` (default) or ``"semi-hard"``.
    """

    kind = "metric"

    def __init__(self, alpha: float = 0.2, mining: str = "batch-hard") -> None:
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"unknown triplet mining {mining!r}; valid: {', '.join(MINING)}")
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        self.alpha = alpha
        self.mining = mining
        self.last_active_fraction = float("nan")  # nothing seen yet

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, m = check_metric_batch(embeddings)
        x = F.normalize(embeddings.reshape(n * m, -1), dim=-1)
        similarity = x @ x.T
        speaker = torch.arange(n, device=x.device).repeat_interleave(m)
        negative = speaker[:, None] != speaker[None, :]
        # Column indices of each anchor's M - 1 positives (rows are speaker-major).
        slots = torch.arange(m, device=x.device)
        others = slots.expand(m, m)[slots[:, None] != slots[None, :]].view(m, m - 1)
        positive_index = (speaker * m)[:, None] + others.repeat(n, 1)
        s_ap = similarity.gather(1, positive_index)  # [B, M - 1]
        hardest_negative = similarity.masked_fill(~negative, float("-inf")).amax(dim=1)  # [B]

        if self.mining == "batch-hard":
            losses = F.relu(hardest_negative - s_ap.amin(dim=1) + self.alpha)
        else:
            s_an, pos = similarity[:, None, :], s_ap[..., None]  # [B, 1, B] against [B, M - 1, 1]
            semi_hard = negative[:, None, :] & (s_an < pos) & (s_an > pos - self.alpha)
            hardest_semi_hard = torch.where(semi_hard, s_an, float("-inf")).amax(dim=-1)
            chosen = torch.where(semi_hard.any(dim=-1), hardest_semi_hard, hardest_negative[:, None])
            losses = F.relu(chosen - s_ap + self.alpha)

        active = losses > 0
        self.last_active_fraction = active.float().mean().item()
        # A zero sum over a count clamped to 1 gives an exact 0 that still backpropagates.
        return losses.sum() / active.sum().clamp(min=1)
