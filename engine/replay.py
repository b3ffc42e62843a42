"""What old data goes back into a refresh: a bounded, speaker-balanced reservoir.

A refresh learns from the utterances that arrived since the active version was trained,
plus a replayed sample of older ones so that the encoder does not forget the speakers it
already knew. The sample must stay the same size however long the history grows (so a
refresh costs the same after a year as after a week) and must not let the most talkative
speakers crowd out the others.

:class:`SpeakerReservoir` is class-balanced reservoir sampling (Chrysakis & Moens, "Online
Continual Learning from Imbalanced Data", ICML 2020): while there is room every item is
kept; once full, an item of a speaker that is not among the largest in the reservoir
evicts a random item of the largest speaker, and an item of a largest speaker replaces
one of that speaker's own items with the usual reservoir probability. Every speaker
seen ends up with about ``capacity / speakers`` items (all of its items if it has fewer),
each a uniform sample of that speaker's stream.

:func:`herded_sample` is the other rule (``[refresh] replay_selection = "herding"``): the
same balanced shares, but each speaker's share is chosen by herding on the parent's
embeddings, so that the few utterances kept still average to where the speaker's
centroid lies.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np


class SpeakerReservoir:
    """A speaker-balanced sample of at most ``capacity`` items from a stream.

    Follows river's habits: ``learn_one`` returns ``self``; hyper-parameters (``capacity``,
    ``seed``) are kept under their own names, apart from the learned state.

    >>> reservoir = SpeakerReservoir(capacity=4, seed=0)
    >>> for i in range(100):
    ...     _ = reservoir.learn_one("talkative", i)
    >>> _ = reservoir.learn_one("quiet", 100).learn_one("quiet", 101)
    >>> sorted(len(items) for items in reservoir.by_speaker().values())
    [2, 2]
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._items: dict[Hashable, list[Any]] = {}
        self._seen: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return sum(len(items) for items in self._items.values())

    def learn_one(self, speaker: Hashable, item: Any) -> SpeakerReservoir:
        self._seen[speaker] = self._seen.get(speaker, 0) + 1
        own = self._items.setdefault(speaker, [])
        if len(self) < self.capacity:
            own.append(item)
            return self
        largest = max(len(items) for items in self._items.values())
        if len(own) < largest:
            # Make room by evicting from a speaker holding more than its share.
            biggest = [s for s, items in self._items.items() if len(items) == largest]
            victim = self._items[biggest[self._rng.integers(len(biggest))]]
            victim.pop(int(self._rng.integers(len(victim))))
            own.append(item)
        elif self._rng.random() < len(own) / self._seen[speaker]:
            own[int(self._rng.integers(len(own)))] = item
        return self

    def by_speaker(self) -> dict[Hashable, list[Any]]:
        """The sample, grouped by speaker (speakers with nothing kept are left out)."""
        return {speaker: list(items) for speaker, items in self._items.items() if items}

    def items(self) -> list[Any]:
        return [item for items in self._items.values() for item in items]


def balanced_shares(counts: dict[Hashable, int], capacity: int) -> dict[Hashable, int]:
    """How many items each speaker keeps in a sample of ``capacity``: the same share for
    everyone, and what a speaker with fewer items leaves is shared among the others.

    >>> balanced_shares({"a": 1, "b": 10, "c": 10}, 9)
    {'a': 1, 'b': 4, 'c': 4}
    """
    shares, left = {}, capacity
    ordered = sorted(counts, key=lambda s: counts[s])
    for k, speaker in enumerate(ordered):
        shares[speaker] = min(counts[speaker], left // (len(ordered) - k))
        left -= shares[speaker]
    return {speaker: shares[speaker] for speaker in counts}


def herding(vectors: np.ndarray, k: int) -> list[int]:
    """Rows of ``vectors`` chosen one at a time so that the mean of those chosen stays as
    close as possible to the mean of all (herding, as iCaRL picks its exemplars: Rebuffi
    et al., 2017): a small sample that still places the speaker's centroid where it is.

    >>> herding(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4]]), 1)
    [2]
    """
    target = vectors.mean(axis=0)
    total = np.zeros_like(target)
    chosen: list[int] = []
    for i in range(min(k, len(vectors))):
        gaps = np.linalg.norm(target - (total + vectors) / (i + 1), axis=1)
        gaps[chosen] = np.inf
        best = int(np.argmin(gaps))
        chosen.append(best)
        total += vectors[best]
    return chosen


def herded_sample(items: list, speaker_of, vector_of: dict, capacity: int) -> list:
    """A speaker-balanced sample of at most ``capacity`` of ``items``, each speaker's share
    chosen by :func:`herding` on ``vector_of[item.id]`` (items without a vector are left out)."""
    groups: dict[Hashable, list] = {}
    for item in items:
        if item.id in vector_of:
            groups.setdefault(speaker_of(item), []).append(item)
    shares = balanced_shares({s: len(g) for s, g in groups.items()}, capacity)
    sample = []
    for speaker, group in groups.items():
        picked = herding(np.stack([vector_of[item.id] for item in group]), shares[speaker])
        sample += [group[i] for i in picked]
    return sample
