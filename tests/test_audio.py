"""engine.audio on real speech from ../shared/data and on generated signals."""

import csv
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from voiceprint.engine import audio, kept
from voiceprint.engine.config import AudioConfig
from voiceprint.engine.errors import (
    EmptyAudio,
    MissingAudio,
    NonFiniteAudio,
    NoSpeech,
    TooLong,
    TooShort,
    UndecodableAudio,
)

REPO = Path(__file__).resolve().parents[1]
SR = audio.SAMPLE_RATE
LOOSE = AudioConfig(min_speech_s=0.1)  # fsdd digits and noise bursts are shorter than the default


def manifest(root: Path, subset: str, n: int) -> list[Path]:
    with open(root / subset / "manifest.csv", newline="") as fh:
        return [root / subset / row["path"] for row in list(csv.DictReader(fh))[:n]]


@pytest.fixture(scope="module")
def utterance(dev_data) -> Path:
    return manifest(dev_data, "speechocean762-train", 1)[0]


@pytest.fixture(scope="module")
def waveform(utterance) -> np.ndarray:
    samples, rate = sf.read(utterance, dtype="float32")
    assert rate == SR
    return samples


def wav_bytes(samples: np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def level_dbfs(samples: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


# --- errors ---------------------------------------------------------------------------


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(MissingAudio, match="nope.wav"):
        audio.load(missing)
    with pytest.raises(MissingAudio, match=str(tmp_path)):
        audio.load(tmp_path)


def load_within(source, seconds: float = 10):
    """``audio.load(source)``'s error, failing (not hanging) if it does not answer in time."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(audio.load(source))
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"loading {source} did not return within {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo", "directory", "/dev/zero", "/dev/urandom"])
def test_only_regular_files_are_opened(tmp_path, kind):
    """A FIFO blocked open() until a writer came; a device would be read for ever."""
    if kind in ("fifo", "link to a fifo"):
        path = tmp_path / "pipe.wav"
        os.mkfifo(path)
        if kind == "link to a fifo":
            (tmp_path / "link.wav").symlink_to(path)
            path = tmp_path / "link.wav"
    else:
        path = tmp_path if kind == "directory" else Path(kind)
    error = load_within(path)
    assert isinstance(error, MissingAudio) and "not a regular file" in str(error), error
    assert str(path) in str(error)


@pytest.mark.parametrize(
    "path",
    ["a\0b.wav", "/tmp/" + "x" * 5000 + ".wav", "~no-such-user-voiceprint/a.wav", "\ud800.wav"],
    ids=["nul byte", "name too long", "unknown user", "lone surrogate"],
)
def test_a_path_that_names_no_file_is_missing_audio(path):
    with pytest.raises(MissingAudio):
        audio.load(path)


def test_a_symlink_loop_is_missing_audio(tmp_path):
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    with pytest.raises(MissingAudio):
        audio.load(tmp_path / "a.wav")


@pytest.mark.data
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_missing_audio(tmp_path, utterance):
    path = tmp_path / "locked.flac"
    path.write_bytes(utterance.read_bytes())
    path.chmod(0)
    with pytest.raises(MissingAudio, match="cannot be read"):
        audio.load(path)


@pytest.mark.data
def test_a_file_name_that_is_not_utf8_still_loads_with_a_storable_source(tmp_path, utterance):
    """os.fsdecode keeps such a name as surrogates, which no database accepts as text."""
    path = tmp_path / os.fsdecode(b"j\xf6rg.flac")
    path.write_bytes(utterance.read_bytes())
    speech = audio.load(path)
    assert speech.source.encode("utf-8") == str(tmp_path / "j?rg.flac").encode()


@pytest.mark.data
def test_one_bad_path_fails_alone_in_load_many(tmp_path, utterance):
    os.mkfifo(tmp_path / "pipe.wav")
    sources = [utterance, "a\0b.wav", tmp_path / "pipe.wav", tmp_path, tmp_path / "nope.wav", "x" * 5000, utterance]
    results = load_many_within(sources)
    assert isinstance(results[0], audio.Speech) and isinstance(results[-1], audio.Speech)
    assert all(isinstance(r, MissingAudio) for r in results[1:-1]), results


def load_many_within(sources, seconds: float = 60):
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(audio.load_many(sources, LOOSE)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive() and outcome, "load_many hung or raised"
    return outcome[0]


def test_empty_file_bytes_and_zero_frames(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(EmptyAudio, match="empty.wav"):
        audio.load(empty)
    with pytest.raises(EmptyAudio, match="upload.wav"):
        audio.load(b"", name="upload.wav")
    with pytest.raises(EmptyAudio):
        audio.load(wav_bytes(np.zeros(0, np.float32)))


def test_undecodable(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(UndecodableAudio, match="notes.txt"):
        audio.load(text)
    with pytest.raises(UndecodableAudio, match="<bytes>"):
        audio.load(np.random.default_rng(0).bytes(10_000))
    with pytest.raises(UndecodableAudio):
        audio.load(wav_bytes(np.zeros(SR, np.float32))[:20])  # cut inside the header


def test_too_long_with_small_limit(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, np.random.default_rng(0).uniform(-0.1, 0.1, 30 * SR).astype(np.float32), SR)
    with pytest.raises(TooLong, match="long.flac"):
        audio.load(path, AudioConfig(max_duration_s=10))


def test_too_long_is_decided_from_the_header(tmp_path):
    # A valid WAV whose header announces two hours at 48 kHz (a 690 MB sparse file):
    # decoding it would allocate 1.4 GB of float32 and take seconds.
    rate, frames = 48_000, 2 * 3600 * 48_000
    data_bytes = frames * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    path = tmp_path / "two_hours.wav"
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + data_bytes)
    assert sf.info(path).duration == pytest.approx(7200)

    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TooLong, match="two_hours.wav"):
            audio.load(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 10 * 2**20  # neither the file's bytes nor its samples were read


def test_non_finite():
    for bad in (np.nan, np.inf, -np.inf):
        samples = np.random.default_rng(0).uniform(-0.5, 0.5, SR).astype(np.float32)
        samples[SR // 2] = bad
        with pytest.raises(NonFiniteAudio):
            audio.load(wav_bytes(samples, subtype="FLOAT"))


def test_no_speech_in_silence_and_low_noise():
    with pytest.raises(NoSpeech):
        audio.load(wav_bytes(np.zeros(3 * SR, np.float32)))
    noise = np.random.default_rng(0).normal(0, 0.003, 3 * SR).astype(np.float32)
    with pytest.raises(NoSpeech, match="noise.wav"):
        audio.load(wav_bytes(noise), name="noise.wav")


@pytest.mark.data
def test_too_short(utterance):
    with pytest.raises(TooShort, match=utterance.name):
        audio.load(utterance, AudioConfig(min_speech_s=30))


# --- decoding, resampling, downmix ------------------------------------------------------


@pytest.mark.data
def test_8khz_flac_is_resampled(dev_data):
    path = manifest(dev_data, "fsdd", 1)[0]
    info = sf.info(path)
    speech = audio.load(path, LOOSE)
    q = speech.quality
    assert (q.input_sample_rate, q.channels) == (8000, 1)
    assert q.duration_s == pytest.approx(info.duration)
    assert len(speech.samples) / SR == pytest.approx(q.speech_s)
    # The digit fills most of the file, so the speech kept has about twice its 8 kHz frames.
    assert 0.5 * info.frames * 2 < len(speech.samples) <= info.frames * 2


@pytest.mark.data
def test_44khz_ogg_noise_is_resampled(dev_data):
    paths = sorted((dev_data / "esc10-noise").glob("*/*.ogg"))
    results = audio.load_many(paths, AudioConfig(min_speech_s=0.1, vad_threshold=0.2))
    speeches = [r for r in results if isinstance(r, audio.Speech)]
    assert speeches, "some noise bursts pass a permissive VAD"
    assert all(isinstance(r, (NoSpeech, TooShort)) for r in results if not isinstance(r, audio.Speech))
    for speech in speeches:
        assert speech.quality.input_sample_rate == 44_100
        assert len(speech.samples) / SR == pytest.approx(speech.quality.speech_s)
        assert speech.quality.speech_s <= speech.quality.duration_s


@pytest.mark.data
def test_44khz_stereo_ogg_of_speech_matches_the_16khz_original(tmp_path, utterance, waveform):
    original = audio.load(utterance)
    path = tmp_path / "speech.ogg"
    up = torchaudio.functional.resample(torch.from_numpy(waveform), SR, 44_100).numpy()
    sf.write(path, np.stack([up, up], axis=1), 44_100, format="OGG", subtype="VORBIS")
    speech = audio.load(path)
    assert (speech.quality.input_sample_rate, speech.quality.channels) == (44_100, 2)
    assert speech.quality.speech_s == pytest.approx(original.quality.speech_s, abs=0.1)
    assert speech.quality.rms_dbfs == pytest.approx(original.quality.rms_dbfs, abs=1.0)


@pytest.mark.data
def test_stereo_is_downmixed(tmp_path, utterance, waveform):
    mono = audio.load(utterance)
    both = tmp_path / "both.wav"
    sf.write(both, np.stack([waveform, waveform], axis=1), SR, subtype="FLOAT")
    same = audio.load(both)
    assert same.quality.channels == 2
    np.testing.assert_array_equal(same.samples, mono.samples)

    left = tmp_path / "left.wav"
    sf.write(left, np.stack([waveform, np.zeros_like(waveform)], axis=1), SR, subtype="FLOAT")
    half = audio.load(left)
    # A mean of the channels: half the amplitude, 6 dB lower before normalisation.
    assert half.quality.rms_dbfs == pytest.approx(mono.quality.rms_dbfs - 6.02, abs=0.1)


@pytest.mark.data
def test_mp3_decodes(tmp_path, utterance, waveform):
    path = tmp_path / "speech.mp3"
    sf.write(path, waveform, SR, format="MP3", subtype="MPEG_LAYER_III")
    speech = audio.load(path)
    assert speech.quality.input_sample_rate == SR
    assert speech.quality.speech_s == pytest.approx(audio.load(utterance).quality.speech_s, abs=0.2)


# --- VAD and level ---------------------------------------------------------------------


@pytest.mark.data
def test_vad_removes_added_silence(utterance, waveform):
    original = audio.load(utterance)
    silence = np.zeros(2 * SR, np.float32)
    padded = audio.load(wav_bytes(np.concatenate([silence, waveform, silence]), subtype="FLOAT"))
    assert padded.quality.duration_s == pytest.approx(original.quality.duration_s + 4)
    assert padded.quality.speech_s == pytest.approx(original.quality.speech_s, abs=0.1)
    assert padded.quality.speech_s < padded.quality.duration_s - 3.5


@pytest.mark.data
def test_quiet_speech_is_raised_to_the_target_level(dev_data):
    config = LOOSE
    subsets = ("speechocean762-train", "librispeech-test-other", "vctk-4")
    paths = [path for subset in subsets for path in manifest(dev_data, subset, 4)]
    for path, speech in zip(paths, audio.load_many(paths, config)):
        assert isinstance(speech, audio.Speech), f"{path}: {speech}"
        assert speech.quality.clipping_ratio == 0.0
        if speech.quality.speech_s < 1.5:
            continue  # a child's 0.8 s utterance, quietened, is too faint for a second VAD pass
        # 6 dB below the target: quiet, but well within what the VAD hears as speech.
        factor = 10 ** ((config.target_dbfs - 6 - level_dbfs(speech.samples)) / 20)
        quiet = audio.load(wav_bytes(speech.samples * np.float32(factor), subtype="FLOAT"), config)
        peak = np.max(np.abs(quiet.samples))
        assert peak < 1.0
        if peak < 0.98:  # not limited by the peak
            assert level_dbfs(quiet.samples) == pytest.approx(config.target_dbfs, abs=0.5), path


@pytest.mark.data
def test_loud_speech_is_left_alone(waveform):
    loud = waveform / np.max(np.abs(waveform)) * np.float32(0.9)
    speech = audio.load(wav_bytes(loud, subtype="FLOAT"), AudioConfig(target_dbfs=-40.0))
    assert level_dbfs(speech.samples) == pytest.approx(speech.quality.rms_dbfs, abs=0.01)
    assert level_dbfs(speech.samples) > -40.0


@pytest.mark.data
def test_gain_is_limited_by_the_peak(utterance):
    speech = audio.load(utterance, AudioConfig(target_dbfs=-3.0))
    assert np.max(np.abs(speech.samples)) == pytest.approx(0.99, abs=1e-4)
    assert level_dbfs(speech.samples) < -6.0


@pytest.mark.data
def test_clipping_ratio_is_measured_on_the_input(waveform):
    samples = waveform.copy()
    samples[: SR // 10] = 1.0
    speech = audio.load(wav_bytes(samples, subtype="FLOAT"))
    assert speech.quality.clipping_ratio == pytest.approx((SR // 10) / len(samples))


# --- batching, bytes, determinism, storage ---------------------------------------------


@pytest.mark.data
def test_load_many_equals_load(dev_data, monkeypatch):
    paths = manifest(dev_data, "speechocean762-train", 6) + manifest(dev_data, "librispeech-test-other", 2)
    sources = paths[:4] + [b"not audio at all" * 10] + paths[4:] + [wav_bytes(np.zeros(SR, np.float32))]
    names = [None] * 4 + ["broken.wav"] + [None] * 5
    expected = []
    for source, name in zip(sources, names):
        try:
            expected.append(audio.load(source, name=name))
        except audio.AudioError as exc:
            expected.append(exc)

    def check(results):
        assert len(results) == len(expected)
        for got, want in zip(results, expected):
            assert type(got) is type(want)
            if isinstance(want, audio.Speech):
                np.testing.assert_array_equal(got.samples, want.samples)
                assert (got.quality, got.source, got.content_sha256) == (want.quality, want.source, want.content_sha256)
            else:
                assert str(got) == str(want)

    check(audio.load_many(sources, names=names))
    assert isinstance(expected[4], UndecodableAudio) and "broken.wav" in str(expected[4])
    # Bounded VAD batches (here one or two utterances each) give the same result.
    monkeypatch.setattr(audio, "_VAD_MAX_BATCH_SAMPLES", 8 * SR)
    check(audio.load_many(sources, names=names))


def test_load_many_names_must_match():
    with pytest.raises(ValueError):
        audio.load_many([b"a", b"b"], names=["only one"])


@pytest.mark.data
def test_bytes_equal_path(utterance):
    from_path = audio.load(utterance)
    from_bytes = audio.load(utterance.read_bytes(), name="upload.flac")
    assert from_path.source == str(utterance)
    assert from_bytes.source == "upload.flac"
    assert from_path.content_sha256 == from_bytes.content_sha256 == hashlib.sha256(utterance.read_bytes()).hexdigest()
    np.testing.assert_array_equal(from_path.samples, from_bytes.samples)
    assert from_path.quality == from_bytes.quality
    np.testing.assert_array_equal(audio.load(utterance).samples, from_path.samples)  # deterministic
    assert from_path.samples.dtype == np.float32 and from_path.samples.ndim == 1
    json.dumps(from_path.quality.to_dict())


@pytest.mark.data
def test_flac_round_trip(utterance):
    speech = audio.load(utterance).samples
    noise = np.random.default_rng(0).uniform(-1, 1, SR).astype(np.float32)
    for samples in (speech, noise):
        back = kept.decode_flac(kept.encode_flac(samples))
        assert back.dtype == np.float32 and back.shape == samples.shape
        assert np.max(np.abs(back - samples)) <= 1 / 32768  # half a step, except at +1.0
    with pytest.raises(UndecodableAudio):
        kept.decode_flac(b"garbage")


def test_vad_leaves_torch_thread_count_alone():
    # In a fresh process: importing silero_vad sets torch's thread count to 1 as a side effect.
    code = (
        "import numpy as np, soundfile as sf, io, torch\n"
        "torch.set_num_threads(3)\n"
        "from engine import audio\n"
        "buf = io.BytesIO(); sf.write(buf, np.random.default_rng(0).normal(0, 0.01, 16000), 16000, format='WAV')\n"
        "print(audio.load_many([buf.getvalue()])[0].__class__.__name__, torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["NoSpeech", "3"]


def test_the_running_vad_of_live_audio_judges_each_chunk_as_the_file_path_does(utterance):
    """LiveAudio feeds silero chunk by chunk with the session's own state; the model is
    causal, so at 16 kHz its probabilities equal the batched pass over the whole file,
    whatever sizes the frames came in."""
    from voiceprint.engine.live import LiveAudio

    samples, rate = sf.read(utterance, dtype="int16")
    assert rate == audio.SAMPLE_RATE
    live = LiveAudio(rate, "s16le", AudioConfig())
    data, step = samples.astype("<i2").tobytes(), 3001  # odd: samples split across frames
    for i in range(0, len(data), step):
        live.add(data[i:i + step])
        if i % (step * 7) == 0:
            live.detect()
    live.detect()
    whole = audio.speech_probabilities([samples.astype(np.float32) / 32768])[0]
    n = len(live._probs)
    assert n == len(samples) // 512
    np.testing.assert_allclose(live._probs, whole[:n], atol=1e-5)
    assert audio.load(live.wav()).samples.tobytes() == audio.load(utterance).samples.tobytes()
