"""Model versions, the aliases that point at them (with their history), and calibrations."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.orm import Session

from voiceprint.engine.errors import IncompleteVersion, NotInitialised, TrainingDataErased, UnknownVersion, VersionChanged
from voiceprint.storage import db, feed, ids
from voiceprint.storage import models as m
from voiceprint.storage.embeddings import missing_embeddings_query
from voiceprint.storage.records import AliasMove, ModelVersion

ACTIVE = "active"


class Registry:
    """Numbered model versions, aliases such as "active", and each version's calibrations."""

    def __init__(self, database: db.Database):
        self._db = database

    def create_version(
        self,
        *,
        encoder: str,
        config: dict,
        checkpoint: str,
        checkpoint_sha256: str,
        parent: int | None = None,
        status: str = "candidate",
        metrics: dict | None = None,
        note: str | None = None,
        trained_through: int = 0,
    ) -> ModelVersion:
        """Record a new model version, numbered one past the highest so far.

        ``trained_through`` is the highest utterance id its training saw: utterances
        after it are "new" to the version (what the next refresh learns from).
        ``checkpoint`` may hold ``{number}`` (e.g. ``checkpoints/v{number:04d}.pt``): it is
        filled in with the number decided here, so callers never guess it.
        """
        if status not in m.VERSION_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(m.VERSION_STATUSES)}")
        with self._db.session("create a model version", write=True) as s:
            if self._db.backend == "postgresql":
                # Serialise numbering between concurrent creators; readers and
                # enrollments (row-level key-share locks) are not blocked.
                s.execute(text("LOCK TABLE model_versions IN SHARE ROW EXCLUSIVE MODE"))
            if parent is not None:
                _version_row(s, parent)
            number = (s.scalar(select(func.max(m.ModelVersion.number))) or 0) + 1
            row = m.ModelVersion(
                number=number,
                parent=parent,
                status=status,
                encoder=encoder,
                config=config,
                checkpoint=checkpoint.format(number=number),
                checkpoint_sha256=checkpoint_sha256,
                metrics=metrics or {},
                note=note,
                created_at=db.now(),
                trained_through=trained_through,
            )
            s.add(row)
            s.flush()
            return _version_record(row, active_number=None)

    def get_version(self, number: int) -> ModelVersion:
        """One model version; :class:`UnknownVersion` if there is none numbered so."""
        with self._db.session(f"read model version {number}") as s:
            return _version_record(_version_row(s, number), _alias_target(s, ACTIVE))

    def list_versions(self) -> list[ModelVersion]:
        """Every model version, by ascending number."""
        with self._db.session("list model versions") as s:
            active = _alias_target(s, ACTIVE)
            rows = s.scalars(select(m.ModelVersion).order_by(m.ModelVersion.number))
            return [_version_record(row, active) for row in rows]

    def active_version(self) -> ModelVersion:
        """The version the "active" alias points at; :class:`NotInitialised` if none."""
        with self._db.session("read the active model version") as s:
            active = _alias_target(s, ACTIVE)
            if active is None:
                raise NotInitialised("no active model version: run `voiceprint init`")
            return _version_record(_version_row(s, active), active)

    def set_alias(
        self,
        alias: str,
        version: int,
        *,
        actor: str,
        reason: str,
        require_complete: bool = False,
        require_trained: Mapping[int, str] | None = None,
    ) -> None:
        """Point ``alias`` at ``version`` and append the move to the alias history.

        Moving "active" also marks the new version active and the one it replaces
        retired, in the same transaction.

        With ``require_complete`` the move happens only if every utterance has an
        embedding under ``version``; otherwise :class:`IncompleteVersion` is raised and
        nothing changes. The check runs after the alias row is locked, and enrollments
        hold a share lock on that row (see :meth:`voiceprint.storage.profiles.Profiles.enroll`), so
        no enrollment can slip in between the check and the move.

        ``require_trained`` (``{utterance id: content sha256}``, what ``version`` was
        trained on) moves it only if all of those utterances are still stored, else
        :class:`TrainingDataErased`; erasures hold the same share lock, so none commits
        between the check and the move unseen.
        """
        with self._db.session(f"move alias {alias!r} to version {version}", write=True) as s:
            target = _version_row(s, version)
            now = db.now()
            created = db.insert_ignoring_conflict(
                s, m.Alias.__table__, {"name": alias, "version": version, "updated_at": now}
            )
            # Locked so that two concurrent moves record each other as previous_version.
            row = s.execute(
                select(m.Alias).where(m.Alias.name == alias).with_for_update()
            ).scalar_one()
            previous = None if created else row.version
            if require_complete:
                missing = s.scalar(select(func.count()).select_from(missing_embeddings_query(version).subquery()))
                if missing:
                    raise IncompleteVersion(
                        f"version {version} has no embedding for {missing} utterance(s) yet"
                    )
            gone = deleted_utterances(s, require_trained or {})
            if gone:
                raise TrainingDataErased(
                    f"{gone} utterance(s) version {version} was trained on were erased or removed meanwhile"
                )
            row.version, row.updated_at = version, now
            if alias == ACTIVE:
                if previous is not None and previous != version:
                    _version_row(s, previous).status = "retired"
                target.status = "active"
            s.add(
                m.AliasMove(
                    alias=alias,
                    version=version,
                    previous_version=previous,
                    actor=actor,
                    reason=reason,
                    moved_at=now,
                )
            )

    def update_version(
        self, number: int, *, status: str | None = None, metrics: dict | None = None, note: str | None = None
    ) -> ModelVersion:
        """Change a version's status, metrics (replaced whole) or note.

        The "active" status belongs to the alias: it is set only by :meth:`set_alias`.
        """
        if status is not None and status not in m.VERSION_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(m.VERSION_STATUSES)}")
        if status == "active":
            raise ValueError("a version becomes active by moving the alias: use set_alias")
        with self._db.session(f"update model version {number}", write=True) as s:
            row = _version_row(s, number)
            if status is not None:
                row.status = status
            if metrics is not None:
                row.metrics = metrics
            if note is not None:
                row.note = note
            s.flush()
            return _version_record(row, _alias_target(s, ACTIVE))

    def alias_history(self, alias: str = ACTIVE) -> list[AliasMove]:
        """Every move of ``alias``, oldest first."""
        with self._db.session(f"read the history of alias {alias!r}") as s:
            rows = s.scalars(
                select(m.AliasMove).where(m.AliasMove.alias == alias).order_by(m.AliasMove.id)
            )
            return [
                AliasMove(r.alias, r.version, r.previous_version, r.actor, r.reason, r.moved_at)
                for r in rows
            ]

    def add_calibration(self, version: int, params: dict) -> tuple[int, datetime]:
        """Store a calibration of ``version``; the newest one is the one in use."""
        doing = f"store a calibration of version {version}"
        with self._db.version_checked(version), self._db.session(doing, write=True) as s:
            now = db.now()
            new_id = s.execute(
                insert(m.Calibration).returning(m.Calibration.id),
                {"version": version, "params": params, "created_at": now},
            ).scalar_one()
            return new_id, now

    def latest_calibration(self, version: int) -> tuple[int, datetime, dict] | None:
        """``(id, created_at, params)`` of the newest calibration of ``version``, or None."""
        with self._db.session(f"read the calibration of version {version}") as s:
            row = s.scalars(
                select(m.Calibration).where(m.Calibration.version == version).order_by(m.Calibration.id.desc()).limit(1)
            ).first()
            return None if row is None else (row.id, row.created_at, dict(row.params))

    def deleted_training_data(self, trained: Mapping[int, str]) -> int:
        """How many of ``trained`` (``{utterance id: content sha256}``) are no longer stored."""
        with self._db.session("check the training data of a candidate") as s:
            return deleted_utterances(s, trained)

    def discard_version_data(self, version: int) -> None:
        """Delete every embedding and centroid stored under ``version`` (an abandoned candidate)."""
        with self._db.session(f"discard the embeddings of version {version}", write=True) as s:
            feed.delete_centroids(s, m.Centroid.version == version)
            s.execute(delete(m.Embedding).where(m.Embedding.version == version))
            s.execute(delete(m.Calibration).where(m.Calibration.version == version))


def deleted_utterances(session: Session, wanted: Mapping[int, str], chunk: int = 500) -> int:
    """How many of ``wanted`` (``{id: content sha256}``) are gone. The hash is compared as
    well as the id: before migration 0005, SQLite handed a deleted highest id to the next
    utterance."""
    numbers = sorted(wanted)
    present = 0
    for start in range(0, len(numbers), chunk):  # bounded IN lists (SQLite limits parameters)
        rows = session.execute(
            select(m.Utterance.id, m.Utterance.content_sha256).where(m.Utterance.id.in_(numbers[start : start + chunk]))
        )
        present += sum(wanted[uid] == sha for uid, sha in rows)
    return len(wanted) - present


def _version_row(session: Session, number: int) -> m.ModelVersion:
    row = ids.get(session, m.ModelVersion, number)
    if row is None:
        raise UnknownVersion(f"model version {number} does not exist")
    return row


def _alias_target(session: Session, alias: str) -> int | None:
    return session.scalar(select(m.Alias.version).where(m.Alias.name == alias))


def _version_record(row: m.ModelVersion, active_number: int | None) -> ModelVersion:
    return ModelVersion(
        number=row.number,
        parent=row.parent,
        status=row.status,
        encoder=row.encoder,
        config=row.config,
        checkpoint=row.checkpoint,
        checkpoint_sha256=row.checkpoint_sha256,
        metrics=row.metrics,
        note=row.note,
        created_at=row.created_at,
        active=row.number == active_number,
        trained_through=row.trained_through,
    )


def require_active(s: Session, version: int) -> None:
    """:class:`VersionChanged` unless ``version`` is the active one, checked inside a
    writing transaction (enrollments, unlabeled utterances)."""
    # A share lock: enrollments run side by side, but an alias move waits for them, and
    # they wait for it (see Registry.set_alias(require_complete=True)).
    active = s.execute(
        select(m.Alias.version).where(m.Alias.name == ACTIVE).with_for_update(read=True)
    ).scalar()
    if active != version:
        raise VersionChanged(f"the active version is now {active}, not {version}")
