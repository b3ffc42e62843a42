"""Encoders: the registry contract, and parity of ge2e-lstm with the Resemblyzer package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voiceprint.engine.embedder import Embedder, window_starts
from voiceprint.engine.encoders import ENCODERS, create_encoder
from voiceprint.engine.errors import UnknownName
from voiceprint.engine.frontends import FRONTENDS, create_frontend


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_contract(name):
    torch.manual_seed(0)
    encoder = create_encoder(name)
    frontend = create_frontend(encoder.frontend)
    frames = torch.rand(3, encoder.window_frames, frontend.dims, requires_grad=True)

    out = encoder(frames)
    assert out.shape == (3, encoder.embedding_dim)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)

    out.sum().backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    # layer_groups() is what [refresh] frozen_layers freezes: every parameter, once each.
    grouped = [id(p) for group in encoder.layer_groups() for p in group]
    assert sorted(grouped) == sorted(id(p) for p in encoder.parameters())
    assert all(encoder.layer_groups())

    clone = create_encoder(name)
    clone.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(frames), encoder(frames))


@pytest.mark.parametrize("name", FRONTENDS.names())
def test_frontend_frames(name):
    frontend = create_frontend(name)
    features = frontend(torch.randn(2, 16000))
    assert features.shape == (2, 16000 // frontend.hop_length + 1, frontend.dims)
    assert torch.isfinite(features).all()


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UnknownName, match="ge2e-lstm"):
        create_encoder("no-such-encoder")


@pytest.mark.parametrize("seconds", [0.3, 1.0, 1.6, 1.7, 2.2, 3.0, 4.79, 10.0, 33.3])
def test_window_starts_follow_resemblyzer(seconds):
    from resemblyzer import VoiceEncoder

    n = int(seconds * 16000)
    _, mel_slices = VoiceEncoder.compute_partial_slices(n, rate=1.3, min_coverage=0.75)
    ours = window_starts(n, hop_length=160, window_frames=160, sample_rate=16000)
    assert ours == [s.start for s in mel_slices]


@pytest.fixture(scope="module")
def embedder():
    return Embedder(create_encoder("ge2e-lstm", pretrained=True))


@pytest.fixture(scope="module")
def resemblyzer_waves(dev_data):
    from resemblyzer import preprocess_wav

    files = sorted((dev_data / "librispeech-test-other").rglob("*.flac"))
    # One file from each speaker folder: different voices, lengths from ~3 to ~20 s.
    per_speaker = {}
    for f in files:
        per_speaker.setdefault(f.parent.name, f)
    return [preprocess_wav(f) for f in per_speaker.values()]


@pytest.mark.data
def test_embeddings_match_resemblyzer(embedder, resemblyzer_waves):
    from resemblyzer import VoiceEncoder

    theirs = VoiceEncoder("cpu", verbose=False)
    ours = embedder.embed(resemblyzer_waves)
    for wave, mine in zip(resemblyzer_waves, ours):
        reference = theirs.embed_utterance(wave)
        assert float(np.dot(reference, mine)) >= 0.999


@pytest.mark.data
def test_batched_equals_one_by_one(embedder, resemblyzer_waves):
    batched = embedder.embed(resemblyzer_waves)
    single = np.stack([embedder.embed([w])[0] for w in resemblyzer_waves])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


@pytest.mark.data
def test_small_batches_bound_memory_but_not_results(resemblyzer_waves):
    encoder = create_encoder("ge2e-lstm", pretrained=True)
    big = Embedder(encoder, batch_windows=256).embed(resemblyzer_waves[:3])
    small = Embedder(encoder, batch_windows=2).embed(resemblyzer_waves[:3])
    np.testing.assert_allclose(big, small, atol=1e-5)
