"""Model checkpoints in the database, on SQLite and the real PostgreSQL server: blobs in
chunks, a second home loading weights it never had as a file, tampered bytes refused, a
bad cache file replaced, prune and delete_weights leaving no stored copy, and
`voiceprint db upgrade` importing the files of a home from before the weights moved."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from sqlalchemy import create_engine, text

from test_storage import new_version
from voiceprint import cli
from voiceprint.engine import Engine
from voiceprint.engine.encoders import create_encoder
from voiceprint.engine.errors import CheckpointError
from voiceprint.storage import Store
from voiceprint.storage.checkpoints import CHUNK_BYTES


def spoil_stored_checkpoint(url: str, sha256: str) -> None:
    """Flip one byte of the stored checkpoint ``sha256`` where it lies (as a bad disk or a
    hand in the database would), leaving its sha256 and size as recorded."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            where = {"s": sha256}
            data = bytearray(connection.execute(
                text("SELECT data FROM checkpoint_chunks WHERE sha256 = :s AND seq = 0"), where
            ).scalar_one())
            data[len(data) // 2] ^= 0xFF
            connection.execute(
                text("UPDATE checkpoint_chunks SET data = :d WHERE sha256 = :s AND seq = 0"), {**where, "d": bytes(data)}
            )
    finally:
        engine.dispose()


def forget_stored_checkpoints(url: str) -> None:
    """Delete every stored checkpoint: the database of a home from before migration 0011."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM checkpoint_chunks"))
            connection.execute(text("DELETE FROM checkpoint_blobs"))
    finally:
        engine.dispose()


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_blob_goes_in_and_comes_out_in_chunks_once_per_content(store: Store, tmp_path) -> None:
    data = torch.randint(0, 256, (2 * CHUNK_BYTES + 12345,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    assert store.checkpoints.blob(sha) is None
    assert store.checkpoints.put_file(sha, path) is True
    assert store.checkpoints.put_file(sha, path) is False  # content-addressed: stored once
    blob = store.checkpoints.blob(sha)
    assert (blob.sha256, blob.size_bytes, blob.chunks) == (sha, len(data), 3)
    chunks = list(store.checkpoints.chunks(sha))
    assert [len(c) for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, 12345] and b"".join(chunks) == data

    other = tmp_path / "other.pt"
    other.write_bytes(data[:-1] + b"x")
    with pytest.raises(CheckpointError, match="does not match"):
        store.checkpoints.put_file("0" * 64, other)  # the key is checked against the bytes
    assert store.checkpoints.blob("0" * 64) is None and store.counts()["checkpoint_chunks"] == 3

    # A version recording it keeps it, unless that version's weights are going too.
    version = new_version(store, checkpoint_sha256=sha)
    assert store.checkpoints.delete(sha, released=()) is False
    assert store.checkpoints.delete(sha, released={version}) is True
    assert store.checkpoints.blob(sha) is None and store.counts()["checkpoint_chunks"] == 0
    assert store.checkpoints.delete(sha, released={version}) is False
    with pytest.raises(CheckpointError, match="not stored"):
        list(store.checkpoints.chunks(sha))


def test_a_second_home_loads_a_version_it_never_had_as_a_file(db_url, tmp_path) -> None:
    with Engine.init(home=tmp_path / "a", db=db_url) as a:
        version = a.models.create(_tuned(0), name="ge2e-lstm", parent=1)
        assert a.store.checkpoints.blob(version.checkpoint_sha256).size_bytes == (tmp_path / "a" / version.checkpoint).stat().st_size
        made = a.models.embedder(version).encoder.state_dict()
    with Engine.open(home=tmp_path / "b", db=db_url) as b:  # a folder that does not exist: only the URL is shared
        loaded = b.models.embedder(b.version(version.number)).encoder.state_dict()
    assert loaded.keys() == made.keys() and all(torch.equal(loaded[k], v) for k, v in made.items())
    cached = tmp_path / "b" / version.checkpoint
    assert sha256_of(cached) == version.checkpoint_sha256
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temporary file left


def test_tampered_stored_bytes_are_refused_and_nothing_is_cached(db_url, tmp_path) -> None:
    with Engine.init(home=tmp_path / "a", db=db_url) as a:
        version = a.active_version()
    spoil_stored_checkpoint(db_url, version.checkpoint_sha256)
    with Store(db_url) as store:
        before = list(store.checkpoints.chunks(version.checkpoint_sha256))
    with Engine.open(home=tmp_path / "b", db=db_url) as b:
        for _ in range(2):  # the second try reads the database again: nothing bad was kept
            with pytest.raises(CheckpointError, match="version 1's checkpoint in the database is corrupted") as refused:
                b.models.embedder(version)
            assert str(tmp_path) not in str(refused.value)  # may reach a client: no path of the server
        assert list(b.store.checkpoints.chunks(version.checkpoint_sha256)) == before
        assert b.versions() == [version]
    assert list((tmp_path / "b" / "checkpoints").iterdir()) == []
    with Engine.open(home=tmp_path / "a", db=db_url) as a:  # a home whose cache file matches is not troubled
        a.models.embedder(version)


def test_a_corrupted_cache_file_is_not_served_but_replaced_from_the_database(db_url, tmp_path) -> None:
    with Engine.init(home=tmp_path / "a", db=db_url) as a:
        version = a.active_version()
        reference = a.models.embedder(version).encoder.state_dict()
    path = tmp_path / "a" / version.checkpoint
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with Engine.open(home=tmp_path / "a", db=db_url) as a:
        state = a.models.embedder(version).encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert sha256_of(path) == version.checkpoint_sha256  # replaced, not only worked around

    path.unlink()  # a cache file gone altogether is fetched again
    with Engine.open(home=tmp_path / "a", db=db_url) as a:
        a.models.embedder(version)
    assert sha256_of(path) == version.checkpoint_sha256


def _tuned(seed: int) -> torch.nn.Module:
    """The pretrained encoder, its weights moved a little: a version of weights of its own."""
    encoder = create_encoder("ge2e-lstm", pretrained=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in encoder.parameters():
            weight.add_(1e-3 * torch.randn(weight.shape, generator=generator))
    return encoder


def test_prune_and_delete_weights_leave_no_stored_copy(db_url, tmp_path) -> None:
    """In the database and this home's cache; a second home's cache file of a version pruned
    elsewhere goes at that home's own prune. Weights a kept version shares stay stored."""
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    with Engine.init(home=a_home, db=db_url) as a, Engine.open(home=b_home, db=db_url) as b:
        root = a.active_version()
        retired = a.models.create(_tuned(1), name="ge2e-lstm", parent=root.number)
        a.store.registry.set_alias("active", retired.number, actor="test", reason="test")
        b.models.embedder(b.version(retired.number))  # b caches it while it is active
        a.store.registry.set_alias("active", root.number, actor="test", reason="test")
        twin = a.models.create(create_encoder("ge2e-lstm", pretrained=True), name="ge2e-lstm", parent=root.number, status="rejected")
        assert twin.checkpoint_sha256 == root.checkpoint_sha256  # the very same weights as the root
        size = a.store.checkpoints.blob(retired.checkpoint_sha256).size_bytes
        twin_size = (a_home / twin.checkpoint).stat().st_size

        pruned = a.prune()
        assert pruned["versions"] == [
            {"version": retired.number, "status": "retired", "bytes": size},
            {"version": twin.number, "status": "rejected", "bytes": twin_size},  # its cache file; the stored copy is the root's
        ]
        assert a.store.checkpoints.blob(retired.checkpoint_sha256) is None
        assert a.store.checkpoints.blob(root.checkpoint_sha256) is not None
        assert not (a_home / retired.checkpoint).exists() and not (a_home / twin.checkpoint).exists()
        assert (b_home / retired.checkpoint).exists()  # another host's cache: a cannot reach it
        assert a.prune()["versions"] == []
        assert b.prune()["versions"] == [{"version": retired.number, "status": "retired", "bytes": size}]
        assert not (b_home / retired.checkpoint).exists()

        candidate = a.models.create(_tuned(2), name="ge2e-lstm", parent=root.number)
        a.models.delete_weights(candidate)  # as a refresh does when its training data was erased meanwhile
        assert a.store.checkpoints.blob(candidate.checkpoint_sha256) is None
        assert not (a_home / candidate.checkpoint).exists()
        with pytest.raises(CheckpointError):
            a.models.embedder(candidate)
    assert not (b_home / root.checkpoint).exists()
    with Engine.open(home=b_home, db=db_url) as b:  # the root, whose weights the pruned twin shared, is still stored
        b.models.embedder(root)
    assert sha256_of(b_home / root.checkpoint) == root.checkpoint_sha256


def test_db_upgrade_imports_the_checkpoint_files_of_an_old_home(db_url, tmp_path, capsys) -> None:
    home = tmp_path / "old"
    with Engine.init(home=home, db=db_url) as eng:
        tuned = eng.models.create(_tuned(3), name="ge2e-lstm", parent=1, status="rejected")
        spoilt = eng.models.create(_tuned(4), name="ge2e-lstm", parent=1, status="rejected")
        gone = eng.models.create(_tuned(5), name="ge2e-lstm", parent=1, status="rejected")
    forget_stored_checkpoints(db_url)
    bad = bytearray((home / spoilt.checkpoint).read_bytes())
    bad[200] ^= 0xFF
    (home / spoilt.checkpoint).write_bytes(bytes(bad))
    (home / gone.checkpoint).unlink()
    with Engine.open(home=home, db=db_url) as eng:  # before the upgrade, the files serve as they always did
        eng.models.embedder(eng.version(tuned.number))
        assert eng.store.counts()["checkpoint_blobs"] == 0  # and loading stores nothing

    argv = ["--home", str(home), "--db", db_url, "db", "upgrade"]
    assert cli.main(["--json", *argv]) == 1  # a file was refused
    done = json.loads(capsys.readouterr().out)["checkpoints"]
    assert (done["imported"], done["stored"], done["missing"]) == ([1, tuned.number], [], [gone.number])
    assert [m["version"] for m in done["mismatched"]] == [spoilt.number]
    assert "does not match its recorded sha256" in done["mismatched"][0]["error"]
    with Store(db_url) as store:
        assert store.checkpoints.blob(spoilt.checkpoint_sha256) is None
        assert {v.number for v in store.registry.list_versions() if store.checkpoints.blob(v.checkpoint_sha256)} == {1, tuned.number}

    (home / spoilt.checkpoint).unlink()
    assert cli.main(argv) == 0  # run again: nothing left it could import
    out, err = capsys.readouterr()
    assert "checkpoints: 0 imported from" in out and "2 stored already" in out
    assert f"version {spoilt.number}: its checkpoint is neither in" in err
    with Engine.open(home=tmp_path / "new", db=db_url) as other:  # another host gets the imported weights
        other.models.embedder(other.version(tuned.number))
