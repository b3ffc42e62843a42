"""Alembic environment.

There is no alembic.ini: :class:`voiceprint.storage.schema.Schema` builds the Config in code and passes
its own connection in ``config.attributes["connection"]``, so migrations run inside the
store's transaction, with its SQLite pragmas (foreign keys, WAL, busy timeout).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from voiceprint.storage.models import Base, include_object

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=include_object,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.begin() as own_connection:
        run_migrations(own_connection)
    engine.dispose()
