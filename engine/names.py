"""Speaker names: the one policy every entry point (CLI, Python, HTTP) applies."""

from __future__ import annotations

from engine.errors import InvalidInput

MAX_SPEAKER_NAME = 200


def check_speaker_name(name: str) -> str:
    """The name as stored (surrounding whitespace removed), or :class:`InvalidInput`.

    >>> check_speaker_name("  alice ")
    'alice'
    """
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InvalidInput("speaker name is empty")
    if len(cleaned) > MAX_SPEAKER_NAME:
        raise InvalidInput(f"speaker name is longer than {MAX_SPEAKER_NAME} characters")
    if any(not ch.isprintable() for ch in cleaned):
        raise InvalidInput(f"speaker name {cleaned!r} contains control characters")
    return cleaned
