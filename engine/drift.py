"""Drift signals that may ask for an early refresh. They never refresh anything themselves.

The stream watched is the genuine score of each enrollment: the cosine between a new
utterance and its own speaker's centroid just before the utterance is merged. When the
channel, the microphones or the population change, these scores sink; river's ADWIN
notices the change in their mean and the Engine queues a refresh request, which the
scheduler (or the next manual refresh) picks up.
"""

from __future__ import annotations

import math

from river import drift


class GenuineScoreDrift:
    """ADWIN over genuine scores, flagging a *fall* in their mean.

    Follows river's drift-detector habits: ``update(score)`` returns ``self`` and
    ``drift_detected`` says whether that very update found a change. A rise in genuine
    scores is good news (e.g. after a refresh), so only falls are reported.

    Parameters
    ----------
    delta
        ADWIN's confidence: smaller means fewer false alarms and later detection.
    grace_period
        Scores seen before any check is made.

    >>> detector = GenuineScoreDrift()
    >>> scores = [0.85, 0.87, 0.83] * 100 + [0.55, 0.6, 0.5] * 100
    >>> first = [i for i, s in enumerate(scores) if detector.update(s).drift_detected][0]
    >>> 300 <= first < 400  # after the fall (ADWIN checks every 32 scores), not before
    True
    """

    def __init__(self, delta: float = 0.002, grace_period: int = 30) -> None:
        self.delta = delta
        self.grace_period = grace_period
        self._adwin = drift.ADWIN(delta=delta, grace_period=grace_period)
        self.drift_detected = False
        self.n_seen = 0

    def update(self, score: float) -> GenuineScoreDrift:
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"a genuine score must be finite, got {score}")
        before = self._adwin.estimation
        self._adwin.update(score)
        self.n_seen += 1
        # ADWIN drops the older part of its window on a change, so the estimate jumps
        # to the recent mean; a jump downwards is a fall in genuine scores.
        self.drift_detected = self._adwin.drift_detected and self._adwin.estimation < before
        return self

    @property
    def mean(self) -> float:
        """Mean genuine score over ADWIN's current window."""
        return float(self._adwin.estimation)
