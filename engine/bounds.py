"""The ranges numbers must lie in: configuration keys, ids, command-line flags.

One :class:`Bounds` both checks a configuration key (``engine/config.py``) and parses a
flag (:func:`flag`, an argparse ``type=``), so a value refused in ``config.toml`` is
refused the same way, with the same words, on the command line; :class:`OneLineParser`
reports it there in one line.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

# Every id the schema stores (utterances, versions, jobs, API keys) is an INTEGER column:
# 32-bit signed on PostgreSQL, so no row can have a larger id on either backend
# (tests/test_bounds.py checks this against storage/models.py).
MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class Bounds:
    """An interval: ``at_least``/``above`` below, ``at_most``/``below`` above (None: open-ended).

    >>> Bounds(at_least=1).problem(0)
    'must be at least 1, got 0'
    >>> Bounds(above=0, below=1).problem(0.5) is None
    True
    """

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` lies outside, in words that follow a name; None when it is inside."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        for limit, words, inside in (
            (self.at_least, "at least", lambda v, x: v >= x),
            (self.above, "above", lambda v, x: v > x),
            (self.at_most, "at most", lambda v, x: v <= x),
            (self.below, "below", lambda v, x: v < x),
        ):
            if limit is not None and not inside(value, limit):
                return f"must be {words} {_number(limit)}, got {_number(value)}"
        return None


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)  # :g would print 2**31 - 1 as 2.14748e+09


ID = Bounds(at_least=1, at_most=MAX_ID)


def flag(bounds: Bounds, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type=``: the text read as ``kind``, refused outside ``bounds``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        problem = bounds.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


identifier = flag(ID)
COUNT = ID  # how many of something stored (--top, --enroll, --min-new): no more than there can be ids

UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_INTERVAL_S = 365 * 86400  # a schedule further apart than a year is a typo, and far past it datetime overflows


def interval_problem(text: str) -> tuple[int | None, str | None]:
    """``90s``, ``15m``, ``6h``, ``2d`` -> (seconds, None), or (None, why not).

    Counted in whole seconds (no timedelta), so an absurd number is refused, not overflowed.

    >>> interval_problem("6h")
    (21600, None)
    """
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text or "")
    if not match:
        return None, f"{text!r}: write a whole number and a unit s, m, h or d (e.g. 6h)"
    seconds = int(match.group(1)) * UNIT_S[match.group(2)]
    if not 1 <= seconds <= MAX_INTERVAL_S:
        return None, f"{text!r}: must be from 1s to {MAX_INTERVAL_S // 86400}d"
    return seconds, None


def interval(text: str) -> str:
    """An argparse ``type=`` for an interval (:func:`interval_problem`): checked, handed on as written."""
    problem = interval_problem(text)[1]
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


class OneLineParser(argparse.ArgumentParser):
    """The command line's parser: a refused argument is one line and exit 2, like every
    other error of ``voiceprint`` (the usage is one ``-h`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"voiceprint: error: {message} (see {self.prog} -h)\n")
