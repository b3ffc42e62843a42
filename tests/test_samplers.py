"""Batch samplers: batch shape, speaker-major order, determinism, coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voiceprint.engine.samplers import ClassBatchSampler, SpeakerBalancedSampler

# Seven speakers with 2..8 utterances, interleaved so that indices of one speaker are not contiguous.
COUNTS = {f"spk{k}": k + 2 for k in range(7)}
LABELS = [name for round_ in range(8) for name, count in COUNTS.items() if round_ < count]


def epochs(sampler, count=3):
    return [list(sampler) for _ in range(count)]


def test_batches_are_n_speakers_by_m_distinct_utterances_speaker_major():
    sampler = SpeakerBalancedSampler(LABELS, speakers_per_batch=3, utterances_per_speaker=4, seed=0)
    for batch in list(sampler):
        assert len(batch) == 12 and all(type(i) is int for i in batch)
        assert len(set(batch)) == 12  # no utterance twice
        speakers = np.array([LABELS[i] for i in batch]).reshape(3, 4)
        assert (speakers == speakers[:, :1]).all()  # row k is one speaker: view(N, M, D) works
        assert len(set(speakers[:, 0])) == 3


def test_speakers_with_too_few_utterances_are_skipped_and_the_rest_covered_each_epoch():
    sampler = SpeakerBalancedSampler(LABELS, speakers_per_batch=3, utterances_per_speaker=4, seed=0)
    eligible = {name for name, count in COUNTS.items() if count >= 4}  # 5 speakers -> 2 batches
    assert len(sampler) == 2
    for epoch in epochs(sampler):
        assert len(epoch) == len(sampler)
        assert {LABELS[i] for batch in epoch for i in batch} == eligible


def test_same_seed_same_epochs_and_epochs_differ():
    first = epochs(SpeakerBalancedSampler(LABELS, 2, 2, seed=7))
    assert first == epochs(SpeakerBalancedSampler(LABELS, 2, 2, seed=7))
    assert first != epochs(SpeakerBalancedSampler(LABELS, 2, 2, seed=8))
    assert first[0] != first[1]


def test_accepts_tensor_labels():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    batches = list(SpeakerBalancedSampler(labels, 3, 2, seed=0))
    assert sorted(batches[0]) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("n, m", [(8, 2), (3, 9), (1, 2), (2, 1)])
def test_impossible_batches_are_refused(n, m):
    with pytest.raises(ValueError):
        SpeakerBalancedSampler(LABELS, n, m)


def test_class_batches_cover_every_item_once_per_epoch():
    sampler = ClassBatchSampler(LABELS, batch_size=8, seed=0)
    assert len(sampler) == 5  # 35 items
    for epoch in epochs(sampler):
        assert [len(batch) for batch in epoch] == [8, 8, 8, 8, 3]
        flat = [i for batch in epoch for i in batch]
        assert sorted(flat) == list(range(len(LABELS)))
        assert flat != sorted(flat)  # shuffled


def test_class_batches_are_deterministic_for_a_seed():
    first = epochs(ClassBatchSampler(LABELS, 8, seed=3))
    assert first == epochs(ClassBatchSampler(LABELS, 8, seed=3))
    assert first != epochs(ClassBatchSampler(LABELS, 8, seed=4))
    assert first[0] != first[1]


def test_class_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError):
        ClassBatchSampler(LABELS, 0)
    with pytest.raises(ValueError):
        ClassBatchSampler([], 4)
