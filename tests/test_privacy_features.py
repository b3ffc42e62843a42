"""``[privacy] keep = "features"``: no audio is kept, and everything that read it still works.

Enrolled utterances keep only the encoder's input features; replay crops, re-embedding
under a new version, catching up on a rollback and accepting a held utterance all read
those features instead of audio.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from voiceprint.engine import Engine, audio, kept
from voiceprint.engine.embedder import Embedder
from voiceprint.engine.encoders import create_encoder
from voiceprint.engine.errors import IncompatibleFeatures
from voiceprint.engine.training import Crops

FRONTEND = "resemblyzer-mel"
CODEC = f"features-{FRONTEND}"
STORED_ATOL = 1e-4  # float16 storage moves an embedding value by at most ~5e-5 (measured)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(create_encoder("ge2e-lstm", pretrained=True), device="cpu")


# -- features and their codec -------------------------------------------------------------


@pytest.mark.data
def test_embedding_from_stored_features_equals_embedding_from_the_waveform(embedder, by_speaker):
    voices = by_speaker("vctk-4")
    speech = audio.load(voices[sorted(voices)[0]][0]).samples
    # Lengths around the window edges: shorter than one window (padded), exactly one,
    # one sample more, and lengths where the last window is kept or dropped.
    waves = [speech[:n] for n in (8000, 25600, 25601, 30000, 38000, 41000, 48000)] + [speech]
    reference = embedder.embed(waves)
    features = [embedder.features(w) for w in waves]
    assert all(f.dtype == np.float32 and f.shape[1] == 40 for f in features)
    np.testing.assert_allclose(embedder.embed_features(features), reference, rtol=0, atol=1e-6)

    stored = [kept.decode_features(kept.encode_features(f), codec=CODEC, frontend=FRONTEND) for f in features]
    assert all(s.dtype == np.float16 for s in stored)
    from_stored = embedder.embed_features(stored)
    np.testing.assert_allclose(from_stored, reference, rtol=0, atol=STORED_ATOL)
    assert np.min(np.sum(from_stored * reference, axis=1)) > 1 - 1e-5


def test_features_of_another_frontend_are_refused():
    data = kept.encode_features(np.random.default_rng(0).random((200, 40), dtype=np.float32))
    with pytest.raises(IncompatibleFeatures, match="fbank") as caught:
        kept.decode_features(data, codec=CODEC, frontend="fbank")
    assert caught.value.code == "incompatible_features"
    with pytest.raises(IncompatibleFeatures):
        kept.decode(data, CODEC, 16000, frontend="fbank")
    # The right frontend decodes them.
    assert kept.decode(data, CODEC, 16000, frontend=FRONTEND).shape == (200, 40)


def test_features_too_large_for_float16_are_kept_as_float32():
    features = np.full((170, 40), 1e6, dtype=np.float32)
    back = kept.decode_features(kept.encode_features(features), codec=CODEC, frontend=FRONTEND)
    assert back.dtype == np.float32 and np.array_equal(back, features)


def test_crops_mix_kept_speech_and_kept_features():
    encoder = create_encoder("ge2e-lstm")
    rng = np.random.default_rng(0)
    features = rng.random((300, 40), dtype=np.float32)
    short = rng.random((100, 40), dtype=np.float32)
    speech = rng.standard_normal(16000 * 3).astype(np.float32) * 0.1
    crops = Crops([features, short, speech], encoder, torch.device("cpu"), seed=0, noise=None)
    batch = crops.batch([0, 1, 2, 0])
    assert batch.shape == (4, 160, 40) and batch.dtype == torch.float32
    # A feature crop is a run of consecutive kept frames.
    first = batch[0].numpy()
    start = int(np.flatnonzero((features == first[0]).all(axis=1))[0])
    np.testing.assert_array_equal(first, features[start : start + 160])
    # Short features are zero-padded, as short speech is.
    np.testing.assert_array_equal(batch[1, :100].numpy(), short)
    assert not batch[1, 100:].any()
    assert batch[2].abs().sum() > 0


# -- an engine that keeps features only -------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def features_home(tmp_path_factory, dev_data, by_speaker):
    """vctk-4 (4 speakers) enrolled with keep = "features", refreshed into version 2 (the
    gate off, so that it is promoted whatever 3 steps do), one more utterance enrolled
    and one held for review under version 2, then version 1 made active again."""
    voices = by_speaker("vctk-4")
    ann, bob = sorted(voices)[:2]
    late, stranger = voices[ann][-1], voices[bob][-1]
    home = tmp_path_factory.mktemp("features")
    (home / "config.toml").write_text(
        '[privacy]\nkeep = "features"\n\n'
        "[refresh]\nsteps = 3\nspeakers_per_batch = 4\nholdout_fraction = 0.3\nmin_holdout = 1\ngate = false\n"
        f'noise_dir = "{dev_data / "esc10-noise" / "008_-_Chainsaw"}"\n'
    )
    out: dict = {"ann": ann, "late": late, "stranger": stranger}
    warnings = _Records()
    logging.getLogger("voiceprint.engine.training").addHandler(warnings)
    try:
        with Engine.init(home=home) as eng:
            items = [(s, p, None) for s, paths in voices.items() for p in paths if p not in (late, stranger)]
            results = eng.enroll_many(items)
            enrolled = [r.utterance_id for r in results if not isinstance(r, Exception)]
            out["enrolled"] = enrolled
            out["kept"] = eng.store.embeddings.audio_many(enrolled)
            out["refresh"] = eng.refresh()
            out["utterances_v2"] = {u.id for u in eng.store.profiles.utterances(status="enrolled")}
            out["embedded_v2"] = set(eng.store.embeddings.version_embeddings(2)[0].tolist())
            # Forced: this is about catching up from features, not about whether 3 steps on
            # 4 speakers leave a consistency cut that this file passes.
            out["late_result"] = eng.enroll(ann, late, force=True)
            out["held_result"] = eng.enroll(ann, stranger)  # bob's voice under ann's name
            out["rollback"] = eng.rollback(1, reason="test")
            out["accepted"] = eng.accept_utterance(out["held_result"].utterance_id)
            out["missing_v1"] = eng.store.embeddings.missing_embeddings(1)
            ids, _, vectors = eng.store.embeddings.version_embeddings(1)
            out["v1"] = dict(zip(ids.tolist(), vectors))
            out["v1_waveform"] = eng.embedder(eng.active_version()).embed([audio.load(late).samples, audio.load(stranger).samples])
    finally:
        logging.getLogger("voiceprint.engine.training").removeHandler(warnings)
    out["warnings"] = warnings.messages
    out["home"] = home
    return out


@pytest.mark.data
def test_only_features_are_kept(features_home):
    stored = features_home["kept"]
    assert sorted(stored) == sorted(features_home["enrolled"]) and len(stored) >= 30
    for data, codec, rate in stored.values():
        assert codec == CODEC and rate == 16000
        with pytest.raises(sf.SoundFileError):
            sf.read(io.BytesIO(data))
        features = kept.decode_features(data, codec=codec, frontend=FRONTEND)
        assert features.dtype == np.float16 and features.shape[1] == 40 and len(features) >= 160


@pytest.mark.data
def test_a_refresh_trains_and_re_embeds_from_features(features_home):
    report = features_home["refresh"]
    assert report.status == "promoted" and report.version == 2, report.reasons
    assert report.metrics["training"]["steps"] == 3
    assert report.metrics["candidate"]["overall"]["probes"] == report.metrics["data"]["held_out"]
    # Every utterance was re-embedded under the candidate, from its features.
    assert features_home["embedded_v2"] == features_home["utterances_v2"]
    # Noise cannot be mixed into features: said once, not per crop.
    noise_warnings = [m for m in features_home["warnings"] if "without noise augmentation" in m]
    assert len(noise_warnings) == 1, features_home["warnings"]


@pytest.mark.data
def test_rollback_and_accept_embed_from_features(features_home):
    late, held = features_home["late_result"], features_home["held_result"]
    assert late.version == 2 and held.version == 2
    assert held.feedback == "INCONSISTENT_SPEAKER"
    assert features_home["rollback"]["embedded"] >= 1  # the late utterance, caught up from its features
    assert features_home["accepted"]["status"] == "enrolled"
    assert features_home["missing_v1"] == []
    # Under version 1, both equal what their audio would give (float16 storage aside).
    v1 = features_home["v1"]
    stored = np.stack([v1[late.utterance_id], v1[held.utterance_id]])
    np.testing.assert_allclose(stored, features_home["v1_waveform"], rtol=0, atol=STORED_ATOL)


@pytest.mark.data
def test_stored_features_are_refused_for_another_frontend(features_home):
    with Engine.open(home=features_home["home"]) as eng:
        uid = features_home["enrolled"][0]
        assert eng.refresher.load_kept([uid], FRONTEND)[uid].ndim == 2
        with pytest.raises(IncompatibleFeatures, match=f"utterance {uid}: "):
            eng.refresher.load_kept([uid], "fbank")
