"""The schema changes only through Alembic, and the revisions match the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from voiceprint.engine.errors import SchemaOutdated
from voiceprint.storage import Store
from voiceprint.storage.models import Base, include_object

MODEL_TABLES = {table.name for table in Base.metadata.sorted_tables}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_define_the_expected_tables() -> None:
    assert MODEL_TABLES == {
        "speakers",
        "utterances",
        "utterance_audio",
        "model_versions",
        "aliases",
        "alias_history",
        "embeddings",
        "centroids",
        "jobs",
        "calibrations",
        "api_keys",
        "audit_log",
        "unlabeled_utterances",
        "unlabeled_embeddings",
        "diarization_jobs",
        "centroid_feed",
        "centroid_tombstones",
        "checkpoint_blobs",
        "checkpoint_chunks",
    }


def test_empty_to_head_to_base_to_head(db_url: str) -> None:
    with Store(db_url) as store:
        assert store.schema.current_revision() is None
        assert _tables(db_url) == set()

        store.schema.upgrade()
        assert store.schema.current_revision() == store.schema.head_revision()
        assert _tables(db_url) == MODEL_TABLES | {"alembic_version"}

        store.schema.downgrade()
        assert store.schema.current_revision() is None
        assert _tables(db_url) == {"alembic_version"}

        store.schema.upgrade()
        assert store.schema.current_revision() == store.schema.head_revision()
        assert _tables(db_url) == MODEL_TABLES | {"alembic_version"}


def test_autogenerate_finds_no_difference(store: Store, db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_autogenerate_ignores_the_scheduler_table(store: Store, db_url: str, tmp_path) -> None:
    from voiceprint.engine import scheduler

    scheduler.set_schedule(str(tmp_path), db_url, every="1h")  # APScheduler creates its table
    assert "apscheduler_jobs" in _tables(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "include_object": include_object}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_check_schema(db_url: str) -> None:
    with Store(db_url) as store:
        with pytest.raises(SchemaOutdated, match="voiceprint db upgrade"):
            store.schema.check_schema()
        store.schema.upgrade()
        store.schema.check_schema()
        store.schema.downgrade()
        with pytest.raises(SchemaOutdated, match=f"code expects {store.schema.head_revision()}"):
            store.schema.check_schema()


def test_upgrading_keeps_the_rows_of_tables_that_reference_a_copied_table(db_url: str) -> None:
    """0003 alters `utterances`, which SQLite does by copying the table and dropping the
    old one; with foreign keys on, that drop cascaded to the kept audio (every
    utterance_audio row of a 0002 database was lost on upgrade)."""
    with Store(db_url) as store:
        store.schema.upgrade("0002")
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO speakers (id, name, created_at) VALUES (1, 'ann', '2026-01-01')"))
        connection.execute(text(
            "INSERT INTO utterances (id, speaker_id, source, content_sha256, duration_s, speech_s, quality, created_at) "
            "VALUES (1, 1, 'a.flac', 'x', 1.0, 1.0, '{}', '2026-01-01')"
        ))
        connection.execute(
            text("INSERT INTO utterance_audio (utterance_id, codec, sample_rate, data) VALUES (1, 'flac', 16000, :d)"),
            {"d": b"\x00\x01"},
        )
    engine.dispose()
    with Store(db_url) as store:
        store.schema.upgrade()
        assert [(u.id, u.status) for u in store.profiles.utterances()] == [(1, "enrolled")]
        assert store.profiles.utterance_audio(1)[0] == b"\x00\x01"
        if store._db.backend == "sqlite":  # the connection the migration used has its foreign keys back on
            with store._db.write_engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def _insert_utterance(connection) -> int:
    connection.execute(text(
        "INSERT INTO utterances (speaker_id, source, content_sha256, duration_s, speech_s, quality, created_at) "
        "VALUES (1, 'a.flac', :sha, 1.0, 1.0, '{}', '2026-01-01')"
    ), {"sha": str(connection.execute(text("SELECT count(*) FROM utterances")).scalar()) + "-x"})
    return connection.execute(text("SELECT max(id) FROM utterances")).scalar()


def test_a_deleted_newest_utterance_id_is_never_issued_again(db_url: str) -> None:
    """A version's trained_through is an utterance id: a reused id would read as trained on."""
    with Store(db_url) as store:
        store.schema.upgrade()
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO speakers (id, name, created_at) VALUES (1, 'ann', '2026-01-01')"))
        _insert_utterance(connection)
        newest = _insert_utterance(connection)
        connection.execute(text("DELETE FROM utterances WHERE id = :i"), {"i": newest})
        assert _insert_utterance(connection) > newest
    engine.dispose()


def test_the_upgrade_to_0005_issues_ids_above_every_version_s_trained_through(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    with Store(url) as store:
        store.schema.upgrade("0004")
    engine = create_engine(url)
    with engine.begin() as connection:  # utterances 1..9 were trained on by version 1, then erased
        connection.execute(text(
            "INSERT INTO model_versions (number, encoder, status, config, checkpoint, checkpoint_sha256, metrics, "
            "created_at, trained_through) VALUES (1, 'ge2e', 'active', '{}', 'c', 's', '{}', '2026-01-01', 9)"
        ))
        connection.execute(text("INSERT INTO speakers (id, name, created_at) VALUES (1, 'ann', '2026-01-01')"))
    with Store(url) as store:
        store.schema.upgrade()
    with engine.begin() as connection:
        assert _insert_utterance(connection) == 10
    engine.dispose()


def _stored_funcs(url: str) -> list[str]:
    import pickle

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return sorted(pickle.loads(blob)["func"] for (blob,) in connection.execute(text("SELECT job_state FROM apscheduler_jobs")))
    finally:
        engine.dispose()


def test_a_schedule_stored_before_the_voiceprint_package_survives_the_upgrade(db_url: str, tmp_path) -> None:
    """0007: APScheduler names the stored job's function by import path, which moved from
    ``engine.scheduler`` to ``voiceprint.engine.scheduler``; a job it cannot import is
    dropped with a log line, so the upgrade must rewrite the path or lose the schedule."""
    from voiceprint.engine import scheduler

    with Store(db_url) as store:
        store.schema.upgrade()
    scheduler.set_schedule(str(tmp_path), db_url, every="2h", min_new=50)
    written = _stored_funcs(db_url)
    assert written and all(f == "voiceprint.engine.scheduler:run_scheduled_refresh" for f in written)

    with Store(db_url) as store:
        store.schema.downgrade("0006")  # as an installation from before the package stored it
    assert _stored_funcs(db_url) == sorted(f.replace("voiceprint.engine.", "engine.") for f in written)

    with Store(db_url) as store:
        store.schema.upgrade()
    assert _stored_funcs(db_url) == written
    listed = scheduler.list_schedule(db_url)  # APScheduler restores (imports) every job
    assert len(listed) == len(written)
