"""Three overlapping stages for a stream of work: read, prepare, finish.

A reader thread pulls items from the source as they arrive. A preparer thread takes the
first waiting item plus whatever else is already waiting (up to a batch) and prepares
them together. The caller's thread finishes each prepared batch and yields its results
in the order the items came in.

So a slow, interactive source is handled item by item with no added latency, a file is
handled in full batches, and preparing batch k+1 (decoding, VAD) overlaps finishing
batch k (embedding, committing), which keeps both cores busy.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")

_DONE = object()
_POLL_S = 0.1


@dataclass(frozen=True)
class _Failure:
    """An exception raised in a stage thread, re-raised in the caller's thread."""

    error: BaseException


# Long on purpose: the reader and preparer stages are closures sharing one stop event
# and two bounded queues; as separate functions they would pass all of that around.
def pipelined(
    items: Iterable[Item],
    prepare: Callable[[Sequence[Item]], Prepared],
    finish: Callable[[Prepared], Sequence[Result]],
    *,
    batch_size: int,
) -> Iterator[Result]:
    """Yield ``finish(prepare(batch))`` results item by item, batches formed as items arrive.

    >>> list(pipelined(range(5), lambda batch: [x * 10 for x in batch], lambda ys: ys, batch_size=2))
    [0, 10, 20, 30, 40]

    An exception in ``items`` or ``prepare`` is raised here once every item before it has
    been finished. Closing the iterator early stops the stages at their next step.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    waiting: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    # One batch being prepared while one waits here and one is finished: bounded memory.
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(target: queue.Queue, value: object) -> bool:
        while not stop.is_set():
            try:
                target.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(source: queue.Queue) -> object:
        while not stop.is_set():
            try:
                return source.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _DONE

    def read() -> None:
        try:
            for item in items:
                if not put(waiting, item):
                    return
        except BaseException as exc:  # surfaced in the caller's thread, in order
            put(waiting, _Failure(exc))
            return
        put(waiting, _DONE)

    def prepare_batches() -> None:
        ended: object = None
        while ended is None:
            batch: list = []
            value = get(waiting)
            while True:
                if value is _DONE or isinstance(value, _Failure):
                    ended = value
                    break
                batch.append(value)
                if len(batch) >= batch_size:
                    break
                try:
                    value = waiting.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    prepared: object = (prepare(batch),)
                except BaseException as exc:
                    prepared, ended = _Failure(exc), _DONE
                if not put(ready, prepared):
                    return
        put(ready, ended)

    threads = [
        threading.Thread(target=read, name="voiceprint-read", daemon=True),
        threading.Thread(target=prepare_batches, name="voiceprint-prepare", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        while True:
            value = ready.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield from finish(value[0])
    finally:
        stop.set()
