"""The Python API: Engine.init/open, enrollment feedback, open-set identification."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from voiceprint.engine import Engine
from voiceprint.engine.errors import DuplicateUtterance, InvalidInput, NotInitialised, SchemaOutdated, UnknownSpeaker

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def voices(dev_data) -> dict[str, list[Path]]:
    folder = dev_data / "librispeech-test-other"
    with open(folder / "manifest.csv", newline="") as fh:
        out: dict[str, list[Path]] = {}
        for row in csv.DictReader(fh):
            out.setdefault(row["speaker"], []).append(folder / row["path"])
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory, voices):
    """Five LibriSpeech speakers enrolled from 3 utterances each; five others never enrolled."""
    eng = Engine.init(home=tmp_path_factory.mktemp("home"))
    enrolled = sorted(voices)[:5]
    results = eng.enroll_many([(s, p, None) for s in enrolled for p in voices[s][:3]])
    assert all(not isinstance(r, Exception) for r in results), results
    yield eng
    eng.close()


def test_known_speakers_are_identified(engine, voices):
    for speaker in sorted(voices)[:5]:
        result = engine.identify(voices[speaker][-1], top=3)
        assert result.decision == speaker
        assert [h.score for h in result.candidates] == sorted((h.score for h in result.candidates), reverse=True)


def test_strangers_are_unknown(engine, voices):
    strangers = sorted(voices)[5:]
    decisions = [engine.identify(voices[s][0]).decision for s in strangers]
    # Open set: nobody enrolled may be named for a voice that was never enrolled.
    assert decisions.count(None) >= len(strangers) - 1, decisions


def test_verify_accepts_the_owner_and_rejects_others(engine, voices):
    owner, other = sorted(voices)[:2]
    assert engine.verify(owner, voices[owner][-1]).accepted
    assert not engine.verify(owner, voices[other][-1]).accepted
    with pytest.raises(UnknownSpeaker):
        engine.verify("nobody", voices[owner][-1])


def test_bytes_and_paths_are_the_same_utterance(engine, voices):
    path = voices[sorted(voices)[0]][4]
    by_path = engine.identify(path)
    by_bytes = engine.identify(path.read_bytes(), name="upload.flac")
    assert by_bytes.source == "upload.flac"
    assert by_bytes.candidates[0] == by_path.candidates[0]


def test_same_audio_twice_is_refused(engine, voices):
    speaker = sorted(voices)[0]
    before = engine.store.counts()
    with pytest.raises(DuplicateUtterance):
        engine.enroll(speaker, voices[speaker][0])
    assert engine.store.counts() == before


def _reencoded(path: Path, fmt: str, subtype: str, rate: int | None = None, gain: float = 1.0) -> bytes:
    samples, native = sf.read(path, dtype="float32")
    if rate is not None:
        samples = torchaudio.functional.resample(torch.from_numpy(samples), native, rate).numpy()
    out = io.BytesIO()
    sf.write(out, np.clip(samples * gain, -1, 1), rate or native, format=fmt, subtype=subtype)
    return out.getvalue()


# What [enrollment] duplicate_cosine catches; 8 kHz and gain-changed copies score below
# two different utterances of one speaker, so no cosine cut can catch them (README).
@pytest.mark.parametrize("encoding", [
    ("MP3", "MPEG_LAYER_III", None, 1.0), ("WAV", "PCM_16", None, 1.0), ("OGG", "VORBIS", None, 1.0), ("MP3", "MPEG_LAYER_III", 44100, 1.0),
])
def test_the_same_recording_re_encoded_is_refused_like_the_same_bytes(engine, voices, encoding):
    speaker = sorted(voices)[0]
    fmt, subtype, rate, gain = encoding
    before = engine.store.counts()
    with pytest.raises(DuplicateUtterance) as same_bytes:
        engine.enroll(speaker, voices[speaker][1])
    with pytest.raises(DuplicateUtterance, match="already enrolled for the speaker") as re_encoded:
        engine.enroll(speaker, _reencoded(voices[speaker][1], fmt, subtype, rate, gain), name="upload")
    assert re_encoded.value.code == same_bytes.value.code == "duplicate_utterance"
    assert engine.store.counts() == before  # nothing stored, held ones included


def test_another_recording_of_the_same_speaker_is_no_duplicate(tmp_path, voices):
    speaker = sorted(voices)[1]
    with Engine.init(home=tmp_path / "home") as eng:
        eng.enroll(speaker, voices[speaker][0])
        for path in voices[speaker][1:]:  # every other utterance of this speaker, re-encoded too
            result = eng.enroll(speaker, _reencoded(path, "MP3", "MPEG_LAYER_III"), name=path.name)
            assert result.utterance_id
        # The same MP3 for another speaker is not this check's business (as with equal bytes).
        eng.enroll("someone-else", _reencoded(voices[speaker][0], "MP3", "MPEG_LAYER_III"), name="copy")


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "x" * 201])
def test_bad_speaker_names(engine, voices, name):
    with pytest.raises(InvalidInput):
        engine.enroll(name, voices[sorted(voices)[0]][5])


def test_stream_results_come_back_in_order(engine, voices):
    speaker = sorted(voices)[6]
    items = [(speaker, p, None) for p in voices[speaker][:4]]
    items.insert(2, (speaker, Path("/nonexistent.wav"), None))
    results = list(engine.enroll_stream(iter(items), batch_size=2))
    assert [getattr(r, "count", None) for r in results] == [1, 2, None, 3, 4]
    mean = engine.store.profiles.centroid(speaker, 1).mean
    np.testing.assert_allclose(mean, engine.store.profiles.embeddings(speaker, 1).mean(axis=0), atol=1e-6)


def test_open_refuses_an_uninitialised_home_and_creates_nothing(tmp_path):
    with pytest.raises(NotInitialised, match="voiceprint init"):
        Engine.open(home=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_open_refuses_a_database_behind_the_code(tmp_path, fresh_pg_url):
    with pytest.raises(SchemaOutdated, match="voiceprint db upgrade"):
        Engine.open(home=tmp_path, db=fresh_pg_url)
