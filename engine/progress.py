"""Progress of long work, reported through a callback: library code never draws.

A callback is called as ``on_progress(done, total, what)``: ``what`` names a phase
("training", "re-embedding", ...), and ``done`` counts up to ``total`` within it. The
CLI draws a bar per phase; the service or a notebook may do anything else with it.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]


def report(on_progress: Progress | None, done: int, total: int, what: str) -> None:
    """Call ``on_progress`` if there is one."""
    if on_progress is not None:
        on_progress(done, total, what)
