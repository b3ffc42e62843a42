"""The centroid change feed and the 1:N index each process keeps current from it, on
SQLite and the real PostgreSQL server: one revision per committed transaction, only what
changed, removals as tombstones, a reader that follows the feed while writers commit
ends where a full read does, and another process's enrollments and erasures reach an
engine's answers within ``[index] refresh_s``."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from test_storage import enroll, new_version
from voiceprint.engine import Engine
from voiceprint.engine.audio import load as audio_load
from voiceprint.engine.errors import DuplicateUtterance
from voiceprint.engine.gallery import Gallery
from voiceprint.storage import Store


def audio_of(path) -> np.ndarray:
    return audio_load(path).samples


def _unit(rng: np.random.Generator, dim: int = 8) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_each_committed_transaction_is_one_revision_and_readers_get_only_what_changed(store: Store) -> None:
    rng = np.random.default_rng(0)
    v = new_version(store)
    assert store.profiles.centroid_revision() == 0
    for i, name in enumerate(("ann", "bob", "cy")):
        enroll(store, name, v, _unit(rng), f"{name}-1".encode())
    first = store.profiles.centroid_changes(v)
    assert first.revision == 3 and sorted(first.names) == ["ann", "bob", "cy"] and first.removed == []
    assert first.means.shape == (3, 8) and first.means.dtype == np.float32

    enroll(store, "ann", v, _unit(rng), b"ann-2")
    moved = store.profiles.centroid_changes(v, first.revision)
    assert (moved.revision, moved.names, moved.removed) == (4, ["ann"], [])
    np.testing.assert_allclose(moved.means[0], store.profiles.centroid("ann", v).mean)

    with pytest.raises(DuplicateUtterance):  # refused: nothing committed, no revision taken
        enroll(store, "ann", v, _unit(rng), b"ann-2")
    assert store.profiles.centroid_revision() == 4
    assert store.profiles.centroid_changes(v, 4).names == []

    bob = int(first.speaker_ids[first.names.index("bob")])
    store.profiles.erase_speaker("bob", actor="test")
    erased = store.profiles.centroid_changes(v, 4)
    assert (erased.revision, erased.names, erased.removed) == (5, [], [bob])

    cy = store.profiles.utterances("cy")[0]
    store.profiles.remove_utterance(cy.id)  # cy's last utterance: the centroid goes
    assert store.profiles.centroid_changes(v, 5).removed == [int(first.speaker_ids[first.names.index("cy")])]

    # A later version's rows are its own feed; dropping them reaches its readers too.
    v2 = new_version(store)
    enroll(store, "ann", v2, _unit(rng), b"ann-3")
    assert store.profiles.centroid_changes(v, 6).names == [] and store.profiles.centroid_changes(v2, 6).names == ["ann"]
    ann = int(first.speaker_ids[first.names.index("ann")])
    store.registry.discard_version_data(v2)
    assert store.profiles.centroid_changes(v2, 7).removed == [ann]

    # Applied in any steps, the changes rebuild exactly what a full read gives.
    gallery = Gallery()
    for since in (-1, 3, 5):
        gallery.apply(store.profiles.centroid_changes(v, since) if since < 0 else store.profiles.centroid_changes(v, gallery.revision))
    _, names, means, _ = gallery.snapshot()
    full = store.profiles.centroid_changes(v)
    assert names == full.names == ["ann"]
    np.testing.assert_array_equal(means, full.means)


def test_a_reader_following_the_feed_while_writers_commit_ends_where_a_full_read_does(db_url: str) -> None:
    """Writers in their own connections (as separate processes would be) enroll, move and
    erase profiles while a reader applies the feed as it goes; nothing it skipped or
    applied out of order shows in the end."""
    with Store(db_url) as store:
        store.schema.upgrade()
        v = new_version(store)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        try:
            with Store(db_url) as mine:
                for i in range(40):
                    name = f"w{w}-s{i % 6}"
                    enroll(mine, name, v, _unit(rng), f"{w}-{i}".encode())
                    if i % 13 == 12:
                        mine.profiles.erase_speaker(f"w{w}-s{(i + 1) % 6}", actor="test")
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    gallery, steps = Gallery(), 0
    with Store(db_url) as reader:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) or steps == 0:
            gallery.apply(reader.profiles.centroid_changes(v, gallery.revision))
            steps += 1
        for t in threads:
            t.join()
        gallery.apply(reader.profiles.centroid_changes(v, gallery.revision))
        full = reader.profiles.centroid_changes(v)
    assert not errors, errors
    assert steps > 3  # it really followed along
    _, names, means, _ = gallery.snapshot()
    order = np.argsort(names)
    expected = np.argsort(full.names)
    assert [names[i] for i in order] == [full.names[i] for i in expected]
    np.testing.assert_array_equal(means[order], full.means[expected])


@pytest.mark.data
def test_another_process_s_enrollments_and_erasures_reach_identify_within_refresh_s(db_url: str, tmp_path, by_speaker) -> None:
    """Engines on one database, each with its own home (as hosts would be): the readers'
    homes start empty, and load the active version's weights from the database."""
    voices = by_speaker("vctk-4")
    a, b, c, new = sorted(voices)
    homes = {}
    for name, refresh_s in (("writer", 0.5), ("reader", 0.5), ("slow", 3600)):
        homes[name] = tmp_path / name
        homes[name].mkdir()
        (homes[name] / "config.toml").write_text(f"[index]\nrefresh_s = {refresh_s}\n")
    with Engine.init(home=homes["writer"], db=db_url) as writer:
        for speaker in (a, b, c):
            for path in voices[speaker][:3]:
                writer.enroll(speaker, path)
        probe = voices[new][5]
        with Engine.open(home=homes["reader"], db=db_url) as reader, Engine.open(home=homes["slow"], db=db_url) as slow:
            assert new not in [h.speaker for h in reader.identify(probe).candidates]
            assert new not in [h.speaker for h in slow.identify(probe).candidates]
            for path in voices[new][:3]:
                writer.enroll(new, path)
            time.sleep(0.6)
            assert reader.identify(probe).candidates[0].speaker == new
            # The slow reader reads the feed only hourly, or right after a write of its own.
            assert new not in [h.speaker for h in slow.identify(probe).candidates]
            slow.enroll(a, voices[a][3])
            assert slow.identify(probe).candidates[0].speaker == new

            writer.erase_speaker(new)
            time.sleep(0.6)
            assert new not in [h.speaker for h in reader.identify(probe).candidates]
            status = reader.index_status()
            assert [(s["version"], s["kind"], s["speakers"], s["behind"]) for s in status] == [(1, "exact", 3, 0)]
            assert status[0]["memory_bytes"] >= 3 * 256 * 4


@pytest.mark.data
def test_answers_do_not_wait_on_the_database_while_the_follower_reads_it(db_url: str, tmp_path, by_speaker) -> None:
    """The follower thread reads the feed and the scoring state every refresh_s; an
    answer reads the database only after this process's own writes. Counted on the real
    database connection, per thread."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine as SqlEngine

    voices = by_speaker("vctk-4")
    a, b, new = sorted(voices)[:3]
    homes = {name: tmp_path / name for name in ("writer", "reader")}
    for home in homes.values():
        home.mkdir()
        (home / "config.toml").write_text("[index]\nrefresh_s = 0.2\n")
    queries: list[int] = []  # the thread of each statement sent to any database

    def count(*_args) -> None:
        queries.append(threading.get_ident())

    with Engine.init(home=homes["writer"], db=db_url) as writer, Engine.open(home=homes["reader"], db=db_url) as reader:
        for speaker in (a, b):
            writer.enroll(speaker, voices[speaker][0])
        version = reader.active_version()
        embedder = reader.embedder(version)
        probe = embedder.embed([audio_of(voices[new][5])])[0]
        assert reader.recognizer.identify_embedding(probe, version).candidates[0].speaker != new  # builds; follower starts
        for path in voices[new][:3]:
            writer.enroll(new, path)
        event.listen(SqlEngine, "before_cursor_execute", count)
        try:
            deadline, seen = time.monotonic() + 3, False
            while time.monotonic() < deadline and not seen:
                seen = reader.recognizer.identify_embedding(probe, version).candidates[0].speaker == new
                time.sleep(0.01)
            answered_in = queries.count(threading.get_ident())
            for _ in range(30):  # a second and a half of answers: the follower reads about 8 times
                reader.recognizer.identify_embedding(probe, version)
                time.sleep(0.05)
            followed = len(queries) - queries.count(threading.get_ident())
            answered = queries.count(threading.get_ident())
        finally:
            event.remove(SqlEngine, "before_cursor_execute", count)
        assert seen, "another engine's enrollment never reached the reader's answers"
        assert answered_in == 0 and answered == 0  # not one statement on the answering thread
        assert followed >= 8  # the follower's reads (the writer enrolls nothing meanwhile)
        follower = reader.recognizer._follower
        assert follower is not None and follower.is_alive()
    assert not follower.is_alive()  # closing the engine stops it


@pytest.mark.data
def test_the_server_reports_the_index_it_holds(tmp_path, by_speaker) -> None:
    """GET /v1/index (admin only): the active version's gallery, built on first use."""
    from fastapi.testclient import TestClient

    from voiceprint.service import create_app

    voices = by_speaker("vctk-4")
    home = tmp_path / "home"
    with Engine.init(home=home) as eng:
        for speaker in sorted(voices)[:2]:
            eng.enroll(speaker, voices[speaker][0])
        admin, query = eng.create_key("admin", by="test")[1], eng.create_key("query", by="test")[1]
    with TestClient(create_app(str(home), None, background=False)) as client:
        assert client.get("/v1/index", headers={"X-API-Key": query}).status_code == 403
        held = client.get("/v1/index", headers={"X-API-Key": admin}).json()
    assert [(h["version"], h["kind"], h["speakers"], h["behind"]) for h in held] == [(1, "exact", 2, 0)]
    assert held[0]["revision"] == held[0]["feed_revision"] == 2
