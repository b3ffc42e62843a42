"""The schema's Alembic revision: migrate up or down, and check it before use."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from voiceprint import migrations
from voiceprint.engine.errors import SchemaOutdated, StorageError
from voiceprint.storage.db import Database


class Schema:
    """Alembic migrations of one database (there is no alembic.ini: see migrations/env.py)."""

    def __init__(self, database: Database):
        self._db = database

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema up to ``revision`` (Alembic)."""
        with self._db.migration_session(f"upgrade the schema to {revision}") as s:
            command.upgrade(self._alembic_config(s), revision)

    def downgrade(self, revision: str = "base") -> None:
        """Migrate the schema down to ``revision`` (Alembic); ``base`` drops every table."""
        with self._db.migration_session(f"downgrade the schema to {revision}") as s:
            command.downgrade(self._alembic_config(s), revision)

    def current_revision(self) -> str | None:
        """The Alembic revision of the database, None when it was never migrated."""
        with self._db.session("read the schema revision") as s:
            return MigrationContext.configure(s.connection()).get_current_revision()

    def head_revision(self) -> str:
        """The newest Alembic revision this code knows."""
        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        if head is None:
            raise StorageError("the installed package holds no migration revision")
        return head

    def check_schema(self) -> None:
        """Raise :class:`SchemaOutdated` unless the database is at the code's revision."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutdated(
                f"database at {current or 'no revision (empty)'}, code expects {head}: "
                "run `voiceprint db upgrade`"
            )

    def _alembic_config(self, session: Session | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(Path(migrations.__file__).parent))
        # ConfigParser interpolates %, which URL-encoded passwords contain.
        config.set_main_option("sqlalchemy.url", self._db.url_with_password.replace("%", "%%"))
        if session is not None:
            # env.py migrates on this connection, inside this session's transaction.
            config.attributes["connection"] = session.connection()
        return config
