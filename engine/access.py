"""API keys: made here, shown once, stored only as a digest.

A key is 32 random bytes (``secrets``). The database keeps its SHA-256 digest: a fast
hash is enough because the keys are random and long, so there is no dictionary to guess
from (unlike passwords, which need a slow hash).
"""

from __future__ import annotations

import hashlib
import secrets

from voiceprint.storage import ApiKey, Store

KEY_PREFIX = "vp_"
MAX_KEY_LENGTH = 200


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(store: Store, role: str, *, note: str, actor: str) -> tuple[ApiKey, str]:
    """Store a new key of ``role``; returns its record and the key itself (never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return store.keys.add_key(prefix=key[:10], digest=digest(key), role=role, note=note, actor=actor), key


def authenticate(store: Store, key: str | None) -> ApiKey | None:
    """The live key record for ``key``, or None (no key, unknown or revoked)."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    return store.keys.key_by_digest(digest(key))
