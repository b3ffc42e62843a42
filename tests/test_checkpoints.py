"""Checkpoints are verified by sha256 and refuse damage with a typed error."""

from __future__ import annotations

import pytest
import torch

from voiceprint.engine.checkpoints import load_checkpoint, save_checkpoint, sha256_bytes, write_verified
from voiceprint.engine.encoders import create_encoder
from voiceprint.engine.errors import CheckpointError


def test_round_trip(tmp_path):
    encoder = create_encoder("ge2e-lstm", pretrained=True)
    sha = save_checkpoint(encoder.state_dict(), tmp_path / "v1.pt")
    state = load_checkpoint(tmp_path / "v1.pt", sha)
    assert state.keys() == encoder.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = tmp_path / "v1.pt"
    sha = save_checkpoint({"w": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, sha)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "nope.pt", "0" * 64)


def test_pickled_code_is_not_executed(tmp_path):
    # weights_only=True: a checkpoint holding an arbitrary object is refused even when its checksum is right.
    import hashlib

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": print}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(path, hashlib.sha256(path.read_bytes()).hexdigest())


def test_streamed_bytes_take_the_name_only_when_their_sha256_matches(tmp_path):
    data = bytes(range(256)) * 1000
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    path = tmp_path / "cache" / "v1.pt"  # the folder is made
    with pytest.raises(CheckpointError, match="version 1 is corrupted"):
        write_verified(iter(pieces), path, sha256_bytes(data[:-1] + b"x"), label="version 1")
    assert list(path.parent.iterdir()) == []  # neither the name nor a temporary file
    write_verified(iter(pieces), path, sha256_bytes(data), label="version 1")
    assert path.read_bytes() == data and [p.name for p in path.parent.iterdir()] == ["v1.pt"]
