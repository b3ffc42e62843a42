"""Embedding distillation toward a frozen teacher (the active model during a refresh)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voiceprint.engine.registry import LOSSES

METRICS = ("cosine", "mse")


@LOSSES.register("distill")
class EmbeddingDistillationLoss(nn.Module):
    """Keep the student's embeddings where the teacher puts them.

    During a refresh the candidate model (student) is fine-tuned on new speakers while
    this loss ties its embeddings of the same utterances to those of the previous model
    (teacher), which limits forgetting and keeps stored centroids meaningful: the
    feature-level form of knowledge distillation (Hinton et al., 2015, distilled logits;
    Romero et al., 2015, FitNets, hints on features). The teacher is detached, so only
    the student learns.

    Parameters
    ----------
    metric
        ``"cosine"`` (default): ``mean_b (1 - cos(s_b, t_b))``, which only constrains
        directions, all that cosine scoring sees. ``"mse"``: ``mean_b ||s_b - t_b||^2``,
        which also constrains length; on unit vectors it equals twice the cosine loss.

    >>> loss = EmbeddingDistillationLoss()
    >>> float(loss(torch.eye(3), torch.eye(3)))
    0.0
    """

    kind = "distillation"

    def __init__(self, metric: str = "cosine") -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown distillation metric {metric!r}; valid metrics: {', '.join(METRICS)}")
        self.metric = metric

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.dim() != 2 or student.shape != teacher.shape:
            raise ValueError(
                f"distillation expects student and teacher [B, D] of one shape, "
                f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        teacher = teacher.detach()
        if self.metric == "cosine":
            return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        return (student - teacher).pow(2).sum(dim=-1).mean()
