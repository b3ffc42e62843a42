"""Batch samplers for fine-tuning: speaker-balanced batches for metric losses, plain shuffled
batches for classification losses.

Both yield lists of int indices into ``labels`` (usable as a DataLoader ``batch_sampler``)
and are deterministic for a seed: epoch ``e`` is drawn from ``(seed, e)``, and each call
of ``iter`` starts the next epoch, so that two samplers built alike yield the same sequence
of epochs while consecutive epochs differ.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np


class SpeakerBalancedSampler:
    """Batches of ``N`` distinct speakers times ``M`` distinct utterances, speaker-major.

    Indices ``[k * M, (k + 1) * M)`` of a batch belong to its ``k``-th speaker, so the
    encoder's output reshapes with ``embeddings.view(N, M, D)``. An epoch visits every
    eligible speaker once, in a shuffled order, ``N`` per batch; the last batch is filled
    up with speakers drawn from the rest, so every batch is full and there are
    ``ceil(S / N)`` batches for ``S`` eligible speakers. Each visit draws ``M`` of the
    speaker's utterances without replacement, so a speaker with many utterances is
    covered over several epochs, not in one.

    Speakers with fewer than ``M`` utterances are skipped: filling their slots with
    repeats would put identical embeddings in a batch, which makes positives trivially
    easy and biases centroids. Classification batches (``ClassBatchSampler``) still use
    them.

    >>> sampler = SpeakerBalancedSampler(["a", "a", "b", "b", "c"], 2, 2, seed=0)
    >>> len(sampler), [len(batch) for batch in sampler]
    (1, [4])
    """

    def __init__(
        self,
        labels: Sequence[Hashable],
        speakers_per_batch: int,
        utterances_per_speaker: int,
        seed: int = 0,
    ) -> None:
        if speakers_per_batch < 2 or utterances_per_speaker < 2:
            raise ValueError(
                "metric losses need at least 2 speakers and 2 utterances per speaker, got "
                f"speakers_per_batch={speakers_per_batch}, utterances_per_speaker={utterances_per_speaker}"
            )
        self.speakers_per_batch = speakers_per_batch
        self.utterances_per_speaker = utterances_per_speaker
        self.seed = seed
        by_speaker: dict[Hashable, list[int]] = {}
        # Elements of a tensor hash by identity, so arrays and tensors become plain lists first.
        for index, label in enumerate(labels.tolist() if hasattr(labels, "tolist") else labels):
            by_speaker.setdefault(label, []).append(index)
        self._utterances = [
            np.asarray(indices) for indices in by_speaker.values() if len(indices) >= utterances_per_speaker
        ]
        if len(self._utterances) < speakers_per_batch:
            raise ValueError(
                f"{len(self._utterances)} speakers have at least {utterances_per_speaker} utterances; "
                f"a batch needs {speakers_per_batch}"
            )
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self._utterances) / self.speakers_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self._epoch])
        self._epoch += 1
        return iter(self._epoch_batches(rng))

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        n, m = self.speakers_per_batch, self.utterances_per_speaker
        order = rng.permutation(len(self._utterances))
        shortfall = -len(order) % n
        if shortfall:
            # Fill-ins come from speakers not already in the last batch, so it stays distinct.
            last = order[len(order) - (n - shortfall):]
            candidates = np.setdiff1d(order, last)
            order = np.concatenate([order, rng.choice(candidates, size=shortfall, replace=False)])
        batches = []
        for start in range(0, len(order), n):
            picks = [rng.choice(self._utterances[s], size=m, replace=False) for s in order[start : start + n]]
            batches.append(np.concatenate(picks).tolist())
        return batches


class ClassBatchSampler:
    """Shuffled batches of ``batch_size`` items; each epoch yields every item exactly once.

    For the classification losses, which need no particular batch composition. The last
    batch of an epoch holds the remainder and may be smaller.

    >>> [len(batch) for batch in ClassBatchSampler([0, 0, 1, 1, 2], batch_size=2, seed=0)]
    [2, 2, 1]
    """

    def __init__(self, labels: Sequence[Hashable], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(labels) == 0:
            raise ValueError("cannot sample batches from no items")
        self.num_items = len(labels)
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.num_items / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self._epoch])
        self._epoch += 1
        order = rng.permutation(self.num_items).tolist()
        size = self.batch_size
        return iter([order[start : start + size] for start in range(0, self.num_items, size)])
