"""The read / prepare / finish pipeline behind ``voiceprint stream``."""

from __future__ import annotations

import threading
import time

import pytest

from engine.streaming import pipelined


def record_batches(sizes: list[int]):
    def prepare(batch):
        sizes.append(len(batch))
        return [x * 2 for x in batch]

    return prepare


def test_order_is_kept_and_waiting_items_are_batched():
    sizes: list[int] = []
    out = list(pipelined(range(100), record_batches(sizes), lambda ys: ys, batch_size=8))
    assert out == [x * 2 for x in range(100)]
    assert max(sizes) == 8 and sum(sizes) == 100
    assert len(sizes) < 50  # items that were already there went in batches


def test_a_slow_source_is_not_held_back_to_fill_a_batch():
    answered = threading.Event()
    sizes: list[int] = []

    def source():
        yield 1
        # The second item comes only after the first one was finished: a stream that
        # waited for a full batch would deadlock here.
        assert answered.wait(timeout=10), "first item was not finished before the second arrived"
        yield 2

    results = []
    for value in pipelined(source(), record_batches(sizes), lambda ys: ys, batch_size=64):
        results.append(value)
        answered.set()
    assert results == [2, 4] and sizes == [1, 1]


def test_errors_surface_after_the_items_before_them():
    def source():
        yield from range(5)
        raise ValueError("bad header")

    seen = []
    with pytest.raises(ValueError, match="bad header"):
        for value in pipelined(source(), lambda b: list(b), lambda ys: ys, batch_size=2):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


def test_an_error_in_prepare_is_raised_to_the_caller():
    def prepare(batch):
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        list(pipelined(range(3), prepare, lambda ys: ys, batch_size=2))


def test_closing_early_stops_the_stage_threads():
    before = {t.name for t in threading.enumerate()}
    results = pipelined(iter(range(10_000)), lambda b: list(b), lambda ys: ys, batch_size=4)
    assert next(results) == 0
    results.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = {t.name for t in threading.enumerate() if t.name.startswith("voiceprint-")} - before
        if not alive:
            break
        time.sleep(0.05)
    assert not alive
