"""Store against real SQLite and PostgreSQL databases (no mocks).

Embeddings are random unit vectors: the storage layer is under test, not the encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from datetime import UTC

import numpy as np
import pytest
from sqlalchemy.engine import make_url

from voiceprint.engine.centroids import RunningCentroid
from voiceprint.engine.errors import (
    DuplicateUtterance,
    IncompleteVersion,
    InvalidInput,
    NotInitialised,
    RefreshBusy,
    StorageError,
    UnknownSpeaker,
    UnknownVersion,
    VersionChanged,
)
from voiceprint.storage import Store

DIM = 256


def unit_vector(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal(dim).astype(np.float32)
    return x / np.linalg.norm(x)


def cosine64(vector: np.ndarray, mean: np.ndarray) -> float:
    a, b = np.asarray(vector, dtype=np.float64), np.asarray(mean, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def new_version(store: Store, **overrides) -> int:
    fields = dict(
        encoder="ge2e-lstm",
        config={"encoder": {"name": "ge2e-lstm"}},
        checkpoint="checkpoints/v.pt",
        checkpoint_sha256="0" * 64,
    )
    return store.registry.create_version(**(fields | overrides)).number


def enroll(store: Store, speaker: str, version: int, embedding: np.ndarray, content: bytes, **options):
    return store.profiles.enroll(
        speaker=speaker,
        version=version,
        source=f"{speaker}.wav",
        content_sha256=hashlib.sha256(content).hexdigest(),
        duration_s=3.0,
        speech_s=2.5,
        quality={"clipping_ratio": 0.0, "rms_dbfs": -30.0, "input_sample_rate": 44100},
        audio=b"fLaC" + content,
        codec="flac",
        sample_rate=16000,
        embedding=embedding,
        **options,
    )


def test_versions_aliases_and_history(store: Store) -> None:
    with pytest.raises(NotInitialised):
        store.registry.active_version()
    v1 = store.registry.create_version(
        encoder="ge2e-lstm",
        config={"a": 1},
        checkpoint="v1.pt",
        checkpoint_sha256="1" * 64,
        metrics={"eer": 0.05},
        note="pretrained",
    )
    assert (v1.number, v1.status, v1.parent, v1.active) == (1, "candidate", None, False)
    assert v1.created_at.tzinfo == UTC
    v2 = new_version(store, parent=1)

    store.registry.set_alias("active", 1, actor="init", reason="first version")
    assert store.registry.active_version().number == 1
    assert store.registry.get_version(1).status == "active"

    store.registry.set_alias("active", v2, actor="refresh", reason="passed the gate")
    versions = store.registry.list_versions()
    assert [(v.number, v.status, v.active, v.parent) for v in versions] == [
        (1, "retired", False, None),
        (2, "active", True, 1),
    ]
    assert versions[0].config == {"a": 1} and versions[0].metrics == {"eer": 0.05}
    assert versions[1].metrics == {}

    store.registry.set_alias("active", 1, actor="alice", reason="rollback")
    assert store.registry.active_version().number == 1
    assert store.registry.get_version(2).status == "retired"
    history = store.registry.alias_history()
    assert [(h.version, h.previous_version, h.actor, h.reason) for h in history] == [
        (1, None, "init", "first version"),
        (2, 1, "refresh", "passed the gate"),
        (1, 2, "alice", "rollback"),
    ]
    assert all(h.alias == "active" and h.moved_at.tzinfo == UTC for h in history)

    # Other aliases move without touching statuses.
    store.registry.set_alias("staging", 2, actor="ci", reason="try it")
    assert store.registry.get_version(2).status == "retired"
    assert len(store.registry.alias_history("staging")) == 1


def test_a_checkpoint_name_takes_the_number_the_store_assigns(store: Store) -> None:
    new_version(store)
    named = new_version(store, checkpoint="checkpoints/v{number:04d}.pt")
    assert named == 2
    assert store.registry.get_version(2).checkpoint == "checkpoints/v0002.pt"


def test_unknown_versions(store: Store) -> None:
    with pytest.raises(UnknownVersion):
        store.registry.get_version(7)
    with pytest.raises(UnknownVersion):
        new_version(store, parent=7)
    with pytest.raises(UnknownVersion):
        store.registry.set_alias("active", 7, actor="x", reason="y")
    with pytest.raises(ValueError, match="status"):
        new_version(store, status="shiny")
    assert store.registry.list_versions() == []
    assert store.counts()["alias_history"] == 0


def test_enroll_keeps_centroids_equal_to_the_mean_of_embeddings(store: Store) -> None:
    rng = np.random.default_rng(0)
    version = new_version(store)
    means: dict[str, np.ndarray] = {}
    for i in range(40):
        speaker = ("bob", "alice")[i % 2]
        result = enroll(store, speaker, version, unit_vector(rng), f"{speaker}-{i}".encode())
        if speaker in means:
            np.testing.assert_array_equal(result.previous_mean, means[speaker])
        else:
            assert result.previous_mean is None
        means[speaker] = result.mean
        assert result.count == i // 2 + 1
        assert result.utterance.speaker == speaker and result.version == version

    for speaker in ("alice", "bob"):
        stored = store.profiles.embeddings(speaker, version)
        assert stored.shape == (20, DIM) and stored.dtype == np.float32
        centroid = store.profiles.centroid(speaker, version)
        assert centroid.count == 20
        np.testing.assert_allclose(centroid.mean, stored.astype(np.float64).mean(0), atol=1e-6)
        np.testing.assert_allclose(centroid.mean, means[speaker], atol=1e-12)

    names, matrix = store.profiles.centroid_matrix(version)
    assert names == ["alice", "bob"]
    assert matrix.shape == (2, DIM) and matrix.dtype == np.float32
    np.testing.assert_allclose(matrix[0], store.profiles.centroid("alice", version).mean, atol=1e-6)

    summaries = store.profiles.speakers()
    assert [(s.name, s.utterances, s.speech_s) for s in summaries] == [
        ("alice", 20, 50.0),
        ("bob", 20, 50.0),
    ]
    assert store.profiles.has_speaker("alice") and not store.profiles.has_speaker("carol")

    utterances = store.profiles.utterances("alice")
    assert len(utterances) == 20 and len(store.profiles.utterances()) == 40
    first = utterances[0]
    assert first.quality["input_sample_rate"] == 44100 and first.created_at.tzinfo == UTC
    assert store.profiles.utterance_audio(first.id) == (b"fLaCalice-1", "flac", 16000)


def test_duplicate_content_stores_nothing(store: Store) -> None:
    rng = np.random.default_rng(1)
    version = new_version(store)
    enroll(store, "alice", version, unit_vector(rng), b"same audio")
    before = store.counts()
    with pytest.raises(DuplicateUtterance, match="alice"):
        enroll(store, "alice", version, unit_vector(rng), b"same audio")
    assert store.counts() == before
    assert store.profiles.centroid("alice", version).count == 1
    # The same recording may be enrolled for another speaker (a mislabel is theirs to fix).
    enroll(store, "bob", version, unit_vector(rng), b"same audio")


def test_failed_enrollment_of_a_new_speaker_stores_nothing(store: Store) -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(UnknownVersion):
        enroll(store, "alice", 1, unit_vector(rng), b"x")
    version = new_version(store)
    enroll(store, "alice", version, unit_vector(rng), b"x")
    before = store.counts()
    with pytest.raises(ValueError, match="stores 256"):
        enroll(store, "bob", version, unit_vector(rng, dim=192), b"y")
    with pytest.raises(ValueError, match="finite"):
        enroll(store, "bob", version, np.full(DIM, np.nan, dtype=np.float32), b"y")
    assert store.counts() == before
    assert not store.profiles.has_speaker("bob")


def test_unknown_speakers(store: Store) -> None:
    rng = np.random.default_rng(3)
    v1, v2 = new_version(store), new_version(store)
    enroll(store, "alice", v1, unit_vector(rng), b"a")
    for call in (
        lambda: store.profiles.centroid("nobody", v1),
        lambda: store.profiles.centroid("alice", v2),
        lambda: store.profiles.embeddings("nobody", v1),
        lambda: store.profiles.utterances("nobody"),
    ):
        with pytest.raises(UnknownSpeaker):
            call()
    assert store.profiles.embeddings("alice", v2).shape == (0, 0)
    names, matrix = store.profiles.centroid_matrix(v2)
    assert names == [] and matrix.shape == (0, 0)


def test_records_are_frozen(store: Store) -> None:
    rng = np.random.default_rng(4)
    version = new_version(store)
    store.registry.set_alias("active", version, actor="t", reason="t")
    result = enroll(store, "alice", version, unit_vector(rng), b"a")
    records = [
        result,
        result.utterance,
        store.registry.get_version(version),
        store.registry.alias_history()[0],
        store.profiles.speakers()[0],
        store.profiles.centroid("alice", version),
    ]
    for record in records:
        assert dataclasses.is_dataclass(record)
        field = dataclasses.fields(record)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, None)


@pytest.mark.postgres
def test_url_password_is_masked(fresh_pg_url: str) -> None:
    # The test server trusts local connections, so any password is accepted.
    url = make_url(fresh_pg_url).set(password="s3cret").render_as_string(hide_password=False)
    with Store(url) as store:
        assert "s3cret" not in store.url + repr(store) + str(store)
        assert "***" in store.url


def test_unopenable_databases_raise_storage_error(tmp_path) -> None:
    with pytest.raises(StorageError, match="open the database"):
        Store(f"sqlite:///{tmp_path / 'missing' / 'voiceprint.db'}")
    with pytest.raises(StorageError) as raised:
        Store("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/voiceprint")
    assert "s3cret" not in str(raised.value) and "127.0.0.1:1" in str(raised.value)
    with pytest.raises(StorageError, match="unsupported"):
        Store("mysql://localhost/voiceprint")


def test_in_memory_sqlite_shares_one_database() -> None:
    with Store("sqlite://") as store:
        store.schema.upgrade()
        version = new_version(store)
        enroll(store, "alice", version, unit_vector(np.random.default_rng(5)), b"a")
        assert store.profiles.has_speaker("alice")


def test_concurrent_enrollments(db_url: str, store: Store) -> None:
    """Writers with their own Store (own connections) race on three shared speakers."""
    version = new_version(store)
    workers, per_worker, speakers = 8, 20, ("alice", "bob", "carol")
    barrier = threading.Barrier(workers)
    acknowledged: list[list[tuple[str, int, np.ndarray]]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        rng = np.random.default_rng(100 + worker)
        try:
            with Store(db_url) as own:
                barrier.wait()
                for i in range(per_worker):
                    speaker = speakers[(worker + i) % len(speakers)]
                    vector = unit_vector(rng)
                    result = enroll(own, speaker, version, vector, f"{worker}/{i}".encode())
                    acknowledged[worker].append((speaker, result.utterance.id, vector))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    done = [entry for entries in acknowledged for entry in entries]
    assert len(done) == workers * per_worker
    stored_ids = {u.id: u.speaker for u in store.profiles.utterances()}
    assert stored_ids == {utterance_id: speaker for speaker, utterance_id, _ in done}
    for speaker in speakers:
        mine = sorted((uid, vec) for s, uid, vec in done if s == speaker)
        stored = store.profiles.embeddings(speaker, version)
        np.testing.assert_array_equal(stored, np.stack([vec for _, vec in mine]))
        centroid = store.profiles.centroid(speaker, version)
        assert centroid.count == len(mine)
        np.testing.assert_allclose(centroid.mean, stored.astype(np.float64).mean(0), atol=1e-6)


# -- refresh support --------------------------------------------------------------------


def test_enrollment_for_a_replaced_version_is_refused(store: Store) -> None:
    rng = np.random.default_rng(3)
    v1, v2 = new_version(store), new_version(store)
    store.registry.set_alias("active", v1, actor="t", reason="init")
    enroll(store, "ann", v1, unit_vector(rng), b"a", expect_active=True)
    store.registry.set_alias("active", v2, actor="t", reason="refresh")
    before = store.counts()
    with pytest.raises(VersionChanged):
        enroll(store, "ann", v1, unit_vector(rng), b"b", expect_active=True)
    assert store.counts() == before


def test_add_embeddings_builds_exact_centroids_and_skips_repeats(store: Store) -> None:
    rng = np.random.default_rng(4)
    v1, v2 = new_version(store), new_version(store)
    ids = [enroll(store, spk, v1, unit_vector(rng), spk.encode() + bytes([i])).utterance.id
           for i, spk in enumerate(["ann", "ann", "bob", "ann"])]
    assert [uid for uid, _ in store.embeddings.missing_embeddings(v2)] == ids
    vectors = {uid: unit_vector(rng) for uid in ids}
    assert store.embeddings.add_embeddings(v2, [(ids[0], vectors[ids[0]]), (ids[2], vectors[ids[2]])]) == 2
    # A retry of an already stored one (after a crash) is skipped, not counted twice.
    assert store.embeddings.add_embeddings(v2, list(vectors.items())) == 2
    assert store.embeddings.missing_embeddings(v2) == []
    ann = store.profiles.centroid("ann", v2)
    expected = np.mean([vectors[i].astype(np.float64) for i in (ids[0], ids[1], ids[3])], axis=0)
    assert ann.count == 3 and np.allclose(ann.mean, expected, atol=1e-7)
    got_ids, speakers, matrix = store.embeddings.version_embeddings(v2)
    assert got_ids.tolist() == ids and speakers == ["ann", "ann", "bob", "ann"]
    assert np.array_equal(matrix[2], vectors[ids[2]])
    with pytest.raises(ValueError):
        store.embeddings.add_embeddings(v2, [(ids[0], np.full(DIM, np.nan))])
    store.registry.discard_version_data(v2)
    assert store.embeddings.version_embeddings(v2)[0].size == 0 and store.profiles.centroid_matrix(v2)[0] == []


def test_alias_moves_only_to_a_complete_version_when_asked(store: Store) -> None:
    rng = np.random.default_rng(5)
    v1, v2 = new_version(store), new_version(store)
    store.registry.set_alias("active", v1, actor="t", reason="init")
    uid = enroll(store, "ann", v1, unit_vector(rng), b"x").utterance.id
    with pytest.raises(IncompleteVersion, match="1 utterance"):
        store.registry.set_alias("active", v2, actor="t", reason="refresh", require_complete=True)
    assert store.registry.active_version().number == v1 and len(store.registry.alias_history()) == 1
    store.embeddings.add_embeddings(v2, [(uid, unit_vector(rng))])
    store.registry.set_alias("active", v2, actor="t", reason="refresh", require_complete=True)
    assert store.registry.active_version().number == v2


def test_a_job_reason_says_each_part_once(store: Store) -> None:
    # The service worker's reason starts with the request's own; it read
    # "requested over HTTP; requested over HTTP; 57 pending" before.
    asked = store.jobs.queue_job("refresh", "requested over HTTP")
    taken, _ = store.jobs.start_job("refresh", "requested over HTTP; 57 pending", owner="host:1")
    assert taken.id == asked.id and taken.reason == "requested over HTTP; 57 pending"


def test_dry_run_and_real_refresh_requests_never_cover_each_other(store: Store) -> None:
    real = store.jobs.queue_job("refresh", "drift")
    dry = store.jobs.queue_job("refresh", "try it", dry_run=True)
    dry_too = store.jobs.queue_job("refresh", "try it again", dry_run=True)
    real_too = store.jobs.queue_job("refresh", "request")
    assert (real.dry_run, dry.dry_run) == (False, True)
    assert store.jobs.oldest_queued("refresh") == real
    # A dry run takes the oldest queued dry run and covers the other, never a real request.
    job, _ = store.jobs.start_job("refresh", "manual", owner="host:1", dry_run=True)
    assert job.id == dry.id and job.dry_run and job.status == "running"
    assert store.jobs.get_job(dry_too.id).result == {"covered_by": dry.id}
    assert [j.status for j in (store.jobs.get_job(real.id), store.jobs.get_job(real_too.id))] == ["queued", "queued"]
    store.jobs.update_job(job.id, status="succeeded", result={})
    # A real refresh takes the real requests, and a dry run queued meanwhile waits for its own.
    later_dry = store.jobs.queue_job("refresh", "try", dry_run=True)
    job, _ = store.jobs.start_job("refresh", "schedule", owner="host:1")
    assert job.id == real.id and not job.dry_run
    assert store.jobs.get_job(real_too.id).result == {"covered_by": real.id}
    assert store.jobs.get_job(later_dry.id).status == "queued" and store.jobs.oldest_queued("refresh") == later_dry
    store.jobs.update_job(job.id, status="succeeded", result={})
    # With nothing of its kind queued, a dry run is a new job that says so.
    fresh, _ = store.jobs.start_job("refresh", "manual", owner="host:1", dry_run=True)
    assert fresh.id == later_dry.id
    store.jobs.update_job(fresh.id, status="succeeded", result={})
    alone, _ = store.jobs.start_job("refresh", "manual", owner="host:1", dry_run=True)
    assert alone.id > fresh.id and alone.dry_run and store.jobs.get_job(alone.id).dry_run
    assert store.jobs.oldest_queued("refresh") is None


def test_jobs_lifecycle_and_interrupted_cleanup(store: Store) -> None:
    rng = np.random.default_rng(6)
    v1 = new_version(store)
    uid = enroll(store, "ann", v1, unit_vector(rng), b"x").utterance.id
    first = store.jobs.queue_job("refresh", "drift")
    second = store.jobs.queue_job("refresh", "request")
    job, interrupted = store.jobs.start_job("refresh", "schedule", owner="host:1")
    assert job.id == first.id and job.status == "running" and interrupted == []
    assert job.reason == "drift; schedule"
    assert store.jobs.get_job(second.id).status == "skipped"
    assert store.jobs.get_job(second.id).result == {"covered_by": first.id}
    # The process dies after storing part of a candidate ...
    candidate = new_version(store, parent=v1)
    store.jobs.update_job(job.id, version=candidate)
    store.embeddings.add_embeddings(candidate, [(uid, unit_vector(rng))])
    # ... and the next job, holding the lock, cleans up after it.
    nxt, interrupted = store.jobs.start_job("rollback", "manual", owner="host:2")
    assert [j.id for j in interrupted] == [job.id]
    dead = store.jobs.get_job(job.id)
    assert dead.status == "failed" and "interrupted" in dead.result["error"] and dead.finished_at
    assert store.registry.get_version(candidate).status == "rejected"
    assert store.embeddings.version_embeddings(candidate)[0].size == 0
    done = store.jobs.update_job(nxt.id, status="succeeded", result={"ok": 1})
    assert done.finished_at is not None and done.result == {"ok": 1}
    assert [j.id for j in store.jobs.list_jobs(status="succeeded")] == [nxt.id]
    with pytest.raises(InvalidInput):
        store.jobs.get_job(999)


def test_update_version(store: Store) -> None:
    v1 = new_version(store)
    updated = store.registry.update_version(v1, status="rejected", metrics={"eer": 0.1}, note="worse")
    assert (updated.status, updated.metrics, updated.note) == ("rejected", {"eer": 0.1}, "worse")
    with pytest.raises(ValueError):
        store.registry.update_version(v1, status="active")  # only the alias makes a version active
    with pytest.raises(UnknownVersion):
        store.registry.update_version(99, note="x")


def test_exclusive_lock_is_held_across_connections(db_url: str, store: Store) -> None:
    other = Store(db_url)
    try:
        with store.exclusive("refresh"):
            with pytest.raises(RefreshBusy):
                with other.exclusive("refresh"):
                    pass  # pragma: no cover
            with other.exclusive("something-else"):
                pass  # other names are independent
        with other.exclusive("refresh"):
            pass  # released on exit
    finally:
        other.close()


def test_remove_then_re_add_restores_every_versions_centroid_exactly(store: Store) -> None:
    rng = np.random.default_rng(5)
    v1, v2 = new_version(store), new_version(store)
    first = [unit_vector(rng) for _ in range(4)]
    ids = [enroll(store, "ann", v1, vec, b"ann%d" % i).utterance.id for i, vec in enumerate(first)]
    enroll(store, "bob", v1, unit_vector(rng), b"bob")
    second = {uid: unit_vector(rng) for uid in ids}
    store.embeddings.add_embeddings(v2, list(second.items()))
    before = {v: store.profiles.centroid("ann", v) for v in (v1, v2)}

    removed = store.profiles.remove_utterance(ids[1])
    assert removed.speaker == "ann" and removed.status == "enrolled"
    for v, vectors in ((v1, first), (v2, [second[i] for i in ids])):
        rest = [vec for i, vec in enumerate(vectors) if i != 1]
        c = store.profiles.centroid("ann", v)
        assert c.count == 3 and np.allclose(c.mean, np.mean(np.array(rest, dtype=np.float64), axis=0), atol=1e-12)
    assert store.embeddings.audio_many([ids[1]]) == {} and ids[1] not in store.embeddings.version_embeddings(v1)[0]

    back = enroll(store, "ann", v1, first[1], b"ann1").utterance.id  # same content: allowed again
    store.embeddings.add_embeddings(v2, [(back, second[ids[1]])])
    for v in (v1, v2):
        c = store.profiles.centroid("ann", v)
        assert c.count == 4
        np.testing.assert_allclose(c.sum, before[v].sum, rtol=0, atol=1e-12)
    assert store.profiles.centroid("bob", v1).count == 1
    with pytest.raises(InvalidInput):
        store.profiles.remove_utterance(10_000)


def test_removing_the_last_utterance_empties_the_profile(store: Store) -> None:
    rng = np.random.default_rng(6)
    v1 = new_version(store)
    uid = enroll(store, "ann", v1, unit_vector(rng), b"only").utterance.id
    store.profiles.remove_utterance(uid)
    assert store.profiles.centroid_matrix(v1)[0] == []
    assert [(s.name, s.utterances) for s in store.profiles.speakers()] == [("ann", 0)]


def test_held_utterances_stay_out_of_the_profile_until_accepted(store: Store) -> None:
    rng = np.random.default_rng(7)
    v1, v2 = new_version(store), new_version(store)
    kept = [unit_vector(rng) for _ in range(2)]
    for i, vec in enumerate(kept):
        enroll(store, "ann", v1, vec, b"a%d" % i)
    before = store.profiles.centroid("ann", v1)
    odd = unit_vector(rng)
    expected = cosine64(odd, before.mean)
    assert expected < 0.5  # random directions in 256-D: far below the cut
    held = enroll(store, "ann", v1, odd, b"odd", consistency_cut=0.5, consistency_min_count=2)
    assert held.similarity_before == pytest.approx(expected, abs=1e-9)
    assert held.pending and held.count == 2 and held.speech_s == pytest.approx(5.0)
    np.testing.assert_array_equal(held.previous_mean, before.mean)
    assert np.array_equal(store.profiles.centroid("ann", v1).sum, before.sum)
    assert [s.pending for s in store.profiles.speakers()] == [1]
    assert [u.id for u in store.profiles.utterances(status="pending")] == [held.utterance.id]
    # Held utterances take no part in re-embedding, cohorts or refresh training.
    assert held.utterance.id not in [uid for uid, _ in store.embeddings.missing_embeddings(v2)]
    assert held.utterance.id not in store.embeddings.version_embeddings(v1)[0]
    assert held.utterance.id not in store.embeddings.cohort_embeddings(v1, per_speaker=10)[0]
    assert store.profiles.count_utterances_after(0) == 2

    late = unit_vector(rng)  # "active" moved to v2 while it waited: accepting adds its v2 embedding
    accepted = store.profiles.accept_utterance(held.utterance.id, {v2: late})
    assert accepted.status == "enrolled"
    c1, c2 = store.profiles.centroid("ann", v1), store.profiles.centroid("ann", v2)
    assert c1.count == 3 and np.allclose(c1.mean, np.mean(np.array(kept + [odd], dtype=np.float64), axis=0), atol=1e-12)
    assert c2.count == 1 and np.allclose(c2.mean, late, atol=1e-7)
    with pytest.raises(InvalidInput):
        store.profiles.accept_utterance(held.utterance.id)  # no longer pending


def test_consistency_cut_holds_only_a_profile_big_enough_to_judge(store: Store) -> None:
    rng = np.random.default_rng(8)
    v1 = new_version(store)
    vectors = [unit_vector(rng) for _ in range(4)]
    options = {"consistency_cut": 0.99, "consistency_min_count": 2}  # no random pair is that close

    first = enroll(store, "ann", v1, vectors[0], b"0", **options)
    assert not first.pending and first.similarity_before is None and first.previous_mean is None

    # One utterance is below min_count: too few to judge by, admitted whatever the cosine.
    second = enroll(store, "ann", v1, vectors[1], b"1", **options)
    assert not second.pending and second.count == 2
    assert second.similarity_before == pytest.approx(cosine64(vectors[1], vectors[0]), abs=1e-6)
    assert second.similarity_before < 0.99

    mean = store.profiles.centroid("ann", v1).mean
    third = enroll(store, "ann", v1, vectors[2], b"2", **options)
    assert third.pending and third.count == 2
    assert third.similarity_before == pytest.approx(cosine64(vectors[2], mean), abs=1e-9)
    assert store.profiles.centroid("ann", v1).count == 2

    # Without a cut nothing is held, and the cosine is still reported.
    fourth = enroll(store, "ann", v1, vectors[3], b"3", consistency_min_count=2)
    assert not fourth.pending and fourth.count == 3
    assert fourth.similarity_before == pytest.approx(cosine64(vectors[3], mean), abs=1e-9)


def test_admits_compares_the_cosine_to_the_mean_with_the_cut() -> None:
    centroid = RunningCentroid(dim=3)
    assert centroid.admits(np.array([1.0, 0.0, 0.0]), cut=0.9, min_count=1) == (True, None)
    centroid.learn_one(np.array([1.0, 0.0, 0.0])).learn_one(np.array([0.0, 1.0, 0.0]))
    vector = np.array([2.0, 0.0, 0.0], dtype=np.float32)  # cosine 1/sqrt(2) to the mean [.5, .5, 0]
    ok, similarity = centroid.admits(vector, cut=0.9, min_count=2)
    assert not ok and similarity == pytest.approx(2**-0.5, abs=1e-12)
    assert centroid.admits(vector, cut=0.9, min_count=3) == (True, similarity)  # too few to judge
    assert centroid.admits(vector, cut=None, min_count=0) == (True, similarity)  # no cut, no check
    assert centroid.admits(vector, cut=similarity, min_count=0)[0]  # at the cut is not below it


def test_calibrations_are_kept_per_version_newest_first(store: Store) -> None:
    v1 = new_version(store)
    assert store.registry.latest_calibration(v1) is None
    store.registry.add_calibration(v1, {"slope": 1.0})
    newest, _ = store.registry.add_calibration(v1, {"slope": 2.0})
    got = store.registry.latest_calibration(v1)
    assert got[0] == newest and got[2] == {"slope": 2.0}
    with pytest.raises(UnknownVersion):
        store.registry.add_calibration(999, {})
    store.registry.discard_version_data(v1)
    assert store.registry.latest_calibration(v1) is None
