"""Lifecycle events and access lines, logged one line each as ``key=value`` pairs (logfmt).

Events go to the ``voiceprint.events`` logger, the service's access lines to
``voiceprint.access``; both are plain :mod:`logging`, so whoever runs the code picks
handlers and levels (``voiceprint serve`` shows them at INFO). A line is machine-readable:
:func:`parse` reads it back. Nothing here may carry a speaker's name or a file name
(voiceprints are biometric data): callers pass ids, counts, versions and fixed texts.

>>> logfmt(event="refresh_finished", job=3, outcome="rejected", why='EER worse "overall"')
'event=refresh_finished job=3 outcome=rejected why="EER worse \\\\"overall\\\\""'
>>> parse(logfmt(a=1, b="two words", c=None, d=True))
{'a': '1', 'b': 'two words', 'c': '-', 'd': 'true'}
"""

from __future__ import annotations

import json
import logging
import re
import shlex

EVENTS = logging.getLogger("voiceprint.events")
ACCESS = logging.getLogger("voiceprint.access")

_BARE = re.compile(r"[A-Za-z0-9_.:/{}@+\-]+")


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        value = f"{value:.1f}"
    text = str(value)
    # Anything but a plain token is JSON-quoted, newlines included: one event, one line.
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def logfmt(**fields: object) -> str:
    """``key=value`` pairs in the given order; values with spaces or quotes JSON-quoted."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def parse(line: str) -> dict[str, str]:
    """The fields of a :func:`logfmt` line (values as text)."""
    return dict(part.split("=", 1) for part in shlex.split(line))


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log the event ``name`` with ``fields`` on the ``voiceprint.events`` logger."""
    EVENTS.log(level, logfmt(event=name, **fields))
