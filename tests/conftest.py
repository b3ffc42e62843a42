"""Shared fixtures.

Database tests run against SQLite (a file in tmp_path) and a real PostgreSQL server.
An unreachable server fails those tests unless VOICEPRINT_SKIP_PG=1 says to skip them,
so a missing database is never mistaken for a pass.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from voiceprint.engine import manifests
from voiceprint.storage import Store

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pg_url() -> str:
    """Admin URL of the test PostgreSQL server (env VOICEPRINT_TEST_PG_URL)."""
    url = os.environ.get("VOICEPRINT_TEST_PG_URL", DEFAULT_PG_URL)
    engine = create_engine(url)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        message = (
            f"PostgreSQL at {make_url(url).render_as_string()} is unreachable "
            f"({str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}); start it, point "
            "VOICEPRINT_TEST_PG_URL at one, or set VOICEPRINT_SKIP_PG=1 to skip PostgreSQL tests"
        )
        if os.environ.get("VOICEPRINT_SKIP_PG") == "1":
            pytest.skip(message)
        pytest.fail(message)
    finally:
        engine.dispose()
    return url


@contextmanager
def new_pg_database(pg_url: str) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped on exit."""
    name = f"vp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def fresh_pg_url(pg_url: str) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    with new_pg_database(pg_url) as url:
        yield url


@pytest.fixture(scope="module")
def module_pg_url(pg_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database shared by one test module's tests."""
    with new_pg_database(pg_url) as url:
        yield url


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty database of each supported backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'voiceprint.db'}"
    return request.getfixturevalue("fresh_pg_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A Store on an empty database migrated to the newest revision."""
    store = Store(db_url)
    store.schema.upgrade()
    yield store
    store.close()


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """The shared development speech (env VOICEPRINT_DEV_DATA, default ``../shared/data``)."""
    root = Path(os.environ.get("VOICEPRINT_DEV_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        message = f"development data not found at {root}; set VOICEPRINT_DEV_DATA, or VOICEPRINT_SKIP_DATA=1 to skip"
        if os.environ.get("VOICEPRINT_SKIP_DATA") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return root


@pytest.fixture(scope="session")
def by_speaker(dev_data: Path) -> Callable[[str], dict[str, list[Path]]]:
    """``by_speaker("vctk-4")``: a data set's files by speaker, in manifest order."""

    def read(name: str) -> dict[str, list[Path]]:
        return manifests.by_speaker(dev_data / name / "manifest.csv")

    return read
