"""API keys and roles.

A key is 32 random bytes (``secrets``), shown once when created; the database keeps
only its SHA-256 digest. A fast hash is enough here because the keys are random and
long: there is no dictionary to guess from, unlike passwords, which need a slow hash.
"""

from __future__ import annotations

import hashlib
import secrets

from storage import ApiKey, Store

KEY_PREFIX = "vp_"
# Which roles may call a route that needs ``role``: admin may do everything.
GRANTS = {"admin": {"admin"}, "enroll": {"enroll", "admin"}, "query": {"query", "admin"}}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(store: Store, role: str, *, note: str = "", actor: str) -> tuple[ApiKey, str]:
    """Store a new key of ``role``; returns its record and the key itself (never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return store.add_key(prefix=key[:10], digest=digest(key), role=role, note=note, actor=actor), key


def authenticate(store: Store, key: str | None) -> ApiKey | None:
    """The live key record for ``key``, or None (no key, unknown or revoked)."""
    if not key or len(key) > 200:
        return None
    return store.key_by_digest(digest(key))


def allows(key: ApiKey, role: str) -> bool:
    return key.role in GRANTS[role]
