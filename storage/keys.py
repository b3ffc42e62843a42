"""API keys (their digests, never the keys) and the audit log of who changed what."""

from __future__ import annotations

from sqlalchemy import func, select

from voiceprint.engine.errors import InvalidInput
from voiceprint.storage import db, ids
from voiceprint.storage import models as m
from voiceprint.storage.records import ApiKey, AuditEntry


# Audited actions that change stored profiles after the fact (see Keys.profile_changes).
PROFILE_CHANGES = ("erase_speaker", "remove_utterance", "accept_utterance")


class Keys:
    """API keys with their roles, and the audit entries written alongside them."""

    def __init__(self, database: db.Database):
        self._db = database

    def add_key(self, *, prefix: str, digest: str, role: str, note: str, actor: str) -> ApiKey:
        """Store an API key's digest (never the key) with its role."""
        if role not in m.KEY_ROLES:
            raise InvalidInput(f"role {role!r}; valid: {', '.join(m.KEY_ROLES)}")
        with self._db.session("store an API key", write=True) as s:
            row = m.ApiKey(prefix=prefix, digest=digest, role=role, note=note, created_at=db.now())
            s.add(row)
            s.flush()
            s.add(m.AuditEntry(action="create_key", actor=actor, detail={"key": row.id, "role": role}, at=row.created_at))
            return _key_record(row)

    def key_by_digest(self, digest: str) -> ApiKey | None:
        """The live (not revoked) key with this digest, or None."""
        with self._db.session("look up an API key") as s:
            row = s.scalars(select(m.ApiKey).where(m.ApiKey.digest == digest, m.ApiKey.revoked_at.is_(None))).first()
            return None if row is None else _key_record(row)

    def list_keys(self) -> list[ApiKey]:
        with self._db.session("list API keys") as s:
            return [_key_record(row) for row in s.scalars(select(m.ApiKey).order_by(m.ApiKey.id))]

    def revoke_key(self, key_id: int, *, actor: str) -> ApiKey:
        with self._db.session(f"revoke API key {key_id}", write=True) as s:
            row = ids.get(s, m.ApiKey, key_id)
            if row is None:
                raise InvalidInput(f"no API key {key_id}")
            if row.revoked_at is None:
                row.revoked_at = db.now()
                s.add(m.AuditEntry(action="revoke_key", actor=actor, detail={"key": key_id}, at=row.revoked_at))
            s.flush()
            return _key_record(row)

    def profile_changes(self) -> int:
        """How many erasures, removals and accepted held utterances have happened: the
        changes that reach back into stored profiles. Processes caching what was computed
        from stored embeddings (the AS-norm cohort, the domain centre) compare this to
        know when to drop what they hold."""
        with self._db.session("count profile changes") as s:
            return s.scalar(
                select(func.count()).select_from(m.AuditEntry).where(m.AuditEntry.action.in_(PROFILE_CHANGES))
            )

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` audit entries, newest first."""
        with self._db.session("read the audit log") as s:
            rows = s.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit))
            return [AuditEntry(r.id, r.action, r.actor, dict(r.detail), r.at) for r in rows]


def _key_record(row: m.ApiKey) -> ApiKey:
    return ApiKey(row.id, row.prefix, row.role, row.note, row.created_at, row.revoked_at)
