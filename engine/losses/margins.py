"""Angular-margin softmax losses: A-Softmax, AM-Softmax, AAM-Softmax and sub-centre AAM.

All of them score an embedding against each class by the cosine of the angle
``theta_j`` between the L2-normalised embedding and the L2-normalised class row, and
make the target class harder to win during training with a margin on its angle. The
margin leaves a gap between speakers on the unit sphere, which is exactly what cosine
scoring at verification time relies on.

``MarginScheduler`` ramps the margin of the additive losses up from zero, which keeps a
freshly grown (random) head from stalling in its first steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from voiceprint.engine.registry import LOSSES
from voiceprint.engine.losses.softmax import GrowingHead

# Keeps sqrt(1 - cos^2) away from 0, where its gradient is infinite.
_EPS = 1e-7


def _check_scale(scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")


class AngularHead(GrowingHead):
    """A growing head scored by cosine similarity; ``K > 1`` rows per class take the max.

    Random new rows are unit-norm directions. With sub-centres, ``init`` fills the first
    sub-centre of each new class and the others start random: identical copies would get
    identical gradients (``max`` splits ties evenly) and never come apart.
    """

    def _init_rows(self, init: torch.Tensor) -> torch.Tensor:
        k = self.rows_per_class
        rows = self._random_rows(init.shape[0] * k, init).view(init.shape[0], k, -1)
        rows[:, 0] = init
        return rows.flatten(0, 1)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        if self.rows_per_class > 1:
            cos = cos.view(cos.shape[0], -1, self.rows_per_class).amax(dim=2)
        return cos


def _chebyshev(cos: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(m theta)`` as the degree-``m`` Chebyshev polynomial of ``cos(theta)``.

    Exact, and unlike going through ``acos`` its gradient stays bounded at ``cos = +-1``.
    """
    prev, cur = torch.ones_like(cos), cos
    for _ in range(m - 1):
        prev, cur = cur, 2 * cos * cur - prev
    return cur


@LOSSES.register("a-softmax")
class ASoftmax(AngularHead):
    """A-Softmax, the multiplicative angular margin of SphereFace (Liu et al., 2017).

    The target angle is multiplied by an integer ``m``. Since ``cos(m theta)`` is not
    monotonic on ``[0, pi]`` it is replaced by
    ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta`` in ``[k pi / m, (k+1) pi / m]``,
    which decreases over the whole range. A margin this strong does not train from a
    random head, so, as in the paper's code, the target logit is blended with the plain
    one, ``f = s (lambda cos(theta) + psi(theta)) / (1 + lambda)``, and ``lambda`` anneals
    from ``lambda_base`` towards ``lambda_min`` as
    ``max(lambda_min, lambda_base (1 + lambda_gamma t)^-lambda_power)`` after ``t`` calls
    to :meth:`step`. Non-target logits are ``s cos(theta_j)``.

    The paper scales by the embedding norm ``||x||``; here the default is a fixed
    ``scale`` because voiceprint's encoders emit unit-length embeddings, for which
    ``||x|| = 1`` would leave the logits too flat to train. ``scale=None`` restores
    ``||x||``. Mostly of historical interest: AM- and AAM-Softmax are simpler to tune.

    Parameters
    ----------
    margin
        The integer multiplier ``m`` (1 means no margin).
    scale
        Fixed logit scale ``s``, or ``None`` for the embedding norm.
    lambda_base, lambda_gamma, lambda_power, lambda_min
        The annealing schedule of ``lambda`` (the SphereFace defaults).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: int = 4,
        scale: float | None = 30.0,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__(embedding_dim, num_classes)
        if int(margin) != margin or margin < 1:
            raise ValueError(f"margin must be an integer >= 1, got {margin}")
        if scale is not None:
            _check_scale(scale)
        if lambda_min < 0 or lambda_base < lambda_min:
            raise ValueError("need 0 <= lambda_min <= lambda_base")
        self.margin = int(margin)
        self.scale = scale
        self.lambda_base = lambda_base
        self.lambda_gamma = lambda_gamma
        self.lambda_power = lambda_power
        self.lambda_min = lambda_min
        # A buffer so that a head resumed from a checkpoint keeps its annealed lambda.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def lambda_(self) -> float:
        decayed = self.lambda_base * (1.0 + self.lambda_gamma * int(self.iteration)) ** -self.lambda_power
        return max(self.lambda_min, decayed)

    def step(self) -> None:
        """Advance the ``lambda`` annealing by one training step (call once per optimiser step)."""
        self.iteration += 1

    def psi(self, cos: torch.Tensor) -> torch.Tensor:
        """The monotonic surrogate of ``cos(m theta)`` given ``cos(theta)``."""
        # k only picks the branch, so it needs no gradient; clamping keeps acos finite.
        theta = torch.acos(cos.detach().clamp(-1.0, 1.0))
        k = torch.floor(self.margin * theta / math.pi).clamp(max=self.margin - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        return sign * _chebyshev(cos, self.margin) - 2.0 * k

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.scores(embeddings)
        lam = self.lambda_
        target = F.one_hot(labels, cos.shape[1]).bool()
        logits = torch.where(target, (lam * cos + self.psi(cos)) / (1.0 + lam), cos)
        scale = embeddings.norm(dim=1, keepdim=True) if self.scale is None else self.scale
        return scale * logits


@LOSSES.register("am-softmax")
class AMSoftmax(AngularHead):
    """AM-Softmax / CosFace: an additive cosine margin (Wang et al., 2018, both papers).

    ``L = CE(s (cos(theta_j) - m [j = y]), y)``: the target cosine must beat the others by
    ``m``. Simple, stable, and a strong default for training speaker embeddings scored by
    cosine; pair it with :class:`MarginScheduler` when the head starts random.

    Parameters
    ----------
    scale
        The logit scale ``s``.
    margin
        The cosine margin ``m`` (0 gives the plain normalised softmax).
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.2) -> None:
        super().__init__(embedding_dim, num_classes)
        _check_scale(scale)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.scale = scale
        self.margin = margin

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.scores(embeddings)
        target = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * (cos - self.margin * target)


@LOSSES.register("aam-softmax")
class AAMSoftmax(AngularHead):
    """AAM-Softmax / ArcFace: an additive angular margin (Deng et al., 2019).

    ``L = CE(s cos(theta_j + m [j = y]), y)``: the target angle is widened by ``m``
    radians, a margin of constant geodesic width on the sphere. The usual first choice
    for ECAPA-TDNN / ResNet speaker encoders.

    ``cos(theta + m)`` rises again once ``theta + m > pi``, which would reward moving away
    from the class. Past ``theta = pi - m`` the target logit therefore continues as
    ``cos(theta) - m sin(m)`` (the reference implementation's choice), which keeps
    falling with ``theta``; ``easy_margin=True`` instead applies the margin only where
    ``cos(theta) > 0`` and leaves wider angles unpenalised.

    Parameters
    ----------
    scale
        The logit scale ``s``.
    margin
        The angular margin ``m`` in radians, ``0 <= m < pi``.
    easy_margin
        Apply the margin only to targets within 90 degrees.
    subcenters
        ``K`` rows per class, scored by their max (see ``subcenter-aam``); 1 is plain AAM.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.2,
        easy_margin: bool = False,
        subcenters: int = 1,
    ) -> None:
        super().__init__(embedding_dim, num_classes, rows_per_class=subcenters)
        _check_scale(scale)
        if not 0 <= margin < math.pi:
            raise ValueError(f"margin must lie in [0, pi), got {margin}")
        self.scale = scale
        self.margin = margin
        self.easy_margin = easy_margin
        self.subcenters = subcenters

    def target_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """``cos(theta + m)`` with the handling of wide angles described above."""
        m = self.margin
        sin = (1.0 - cos * cos).clamp_min(_EPS).sqrt()
        shifted = cos * math.cos(m) - sin * math.sin(m)
        if self.easy_margin:
            return torch.where(cos > 0, shifted, cos)
        return torch.where(cos > math.cos(math.pi - m), shifted, cos - m * math.sin(m))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.scores(embeddings)
        target = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(target, self.target_cosine(cos), cos)


@LOSSES.register("subcenter-aam")
class SubCenterAAM(AAMSoftmax):
    """Sub-centre ArcFace (Deng et al., 2020): AAM-Softmax over ``K`` sub-centres per class.

    Each class owns ``K`` rows; its cosine is the max over them, then the ArcFace margin
    applies as in :class:`AAMSoftmax`. Clean utterances gather around one dominant
    sub-centre while noisy or mislabelled ones can settle on another instead of dragging
    the class centre, which suits crowd-sourced or weakly labelled enrolment data.
    ``grow`` adds ``K`` rows per new class.

    Parameters
    ----------
    subcenters
        ``K``, the number of sub-centres per class.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.2,
        easy_margin: bool = False,
        subcenters: int = 3,
    ) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin, easy_margin, subcenters)


class MarginScheduler:
    """Ramp ``loss.margin`` linearly from 0 to ``target`` over ``warmup_steps`` steps, then hold.

    A full margin on a random head pushes every target logit down before the classes
    have separated, and training can stall; warming the margin up avoids that. Works
    with the additive losses (AM-, AAM- and sub-centre AAM-Softmax), whose margin is a
    real number. Call :meth:`step` once per optimiser step; pass ``start_step`` to resume
    an interrupted ramp.

    Examples
    --------
    >>> loss = AAMSoftmax(embedding_dim=4, num_classes=2)
    >>> scheduler = MarginScheduler(loss, target=0.2, warmup_steps=4)
    >>> loss.margin
    0.0
    >>> for _ in range(2):
    ...     scheduler.step()
    >>> loss.margin
    0.1
    """

    def __init__(self, loss: AMSoftmax | AAMSoftmax, *, target: float, warmup_steps: int, start_step: int = 0):
        if not isinstance(loss, (AMSoftmax, AAMSoftmax)):
            raise TypeError(f"MarginScheduler needs an additive-margin loss, got {type(loss).__name__}")
        if target < 0 or warmup_steps < 0 or start_step < 0:
            raise ValueError("target, warmup_steps and start_step must be >= 0")
        self.loss = loss
        self.target = target
        self.warmup_steps = warmup_steps
        self.step_count = start_step
        self.loss.margin = self.margin_at(start_step)

    def margin_at(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.target
        return self.target * step / self.warmup_steps

    def step(self) -> None:
        self.step_count += 1
        self.loss.margin = self.margin_at(self.step_count)
