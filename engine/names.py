"""Speaker names: the one policy every entry point (CLI, Python, HTTP, streams) applies.

A name is compared and stored in Unicode NFC with surrounding whitespace removed, so
``"alice "`` and ``"alice"`` (and the two spellings of ``"Zoë"``) are one speaker
wherever they are typed. A *new* name must also be addressable as one segment of a
URL path, or the service could enroll a speaker it can never fetch or erase: no ``/``,
and not ``.`` or ``..`` (clients resolve those before sending).
"""

from __future__ import annotations

import unicodedata

from voiceprint.engine.errors import InvalidInput

MAX_SPEAKER_NAME = 200
DOT_SEGMENTS = {".", ".."}


def normalise_speaker_name(name: str) -> str:
    """The name as it is compared: NFC, surrounding whitespace removed; refuses only
    what no stored name can be (empty, control characters), so names stored before
    the URL rule stay reachable for lookup and erasure.

    >>> normalise_speaker_name("  Zoe\\u0308 ") == "Zo\\u00eb"
    True
    """
    cleaned = unicodedata.normalize("NFC", name).strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InvalidInput("speaker name is empty")
    if any(not ch.isprintable() for ch in cleaned):
        raise InvalidInput(f"speaker name {cleaned!r} contains control characters")
    return cleaned


def check_speaker_name(name: str) -> str:
    """The name as stored, or :class:`InvalidInput` naming the rule it breaks.

    >>> check_speaker_name("  alice ")
    'alice'
    >>> check_speaker_name("a/b")
    Traceback (most recent call last):
    ...
    voiceprint.engine.errors.InvalidInput: speaker name 'a/b' contains '/', which a URL path cannot carry
    """
    cleaned = normalise_speaker_name(name)
    if len(cleaned) > MAX_SPEAKER_NAME:
        raise InvalidInput(f"speaker name is longer than {MAX_SPEAKER_NAME} characters")
    if "/" in cleaned:
        raise InvalidInput(f"speaker name {cleaned!r} contains '/', which a URL path cannot carry")
    if cleaned in DOT_SEGMENTS:
        raise InvalidInput(f"speaker name {cleaned!r} is a URL dot segment; choose another name")
    return cleaned
