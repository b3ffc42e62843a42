"""Roles of the service's API keys: which routes a key may call.

Keys themselves (made, shown once, stored as a digest, checked) belong to the engine:
see :meth:`voiceprint.engine.Engine.create_key` and :meth:`voiceprint.engine.Engine.authenticate`.
"""

from __future__ import annotations

# Which roles may call a route that needs ``role``: admin may do everything.
GRANTS = {"admin": {"admin"}, "enroll": {"enroll", "admin"}, "query": {"query", "admin"}}


def allows(key, role: str) -> bool:
    """Whether an API key record (``key.role``) may call a route that needs ``role``."""
    return key.role in GRANTS[role]
