"""Turn an audio file or its bytes into 16 kHz mono speech with a quality report.

The first step of every utterance's path: decode (soundfile: WAV, FLAC, OGG, MP3),
downmix to mono, resample to 16 kHz, keep only the speech that silero-vad finds, and
normalise its level. Bad input raises one of the :class:`voiceprint.engine.errors.AudioError`
subclasses, with a one-line message that names the source.

The VAD does not use ``silero_vad.get_speech_timestamps``: that loops in Python over
512-sample chunks. The JIT model's ``audio_forward`` runs the whole (padded) batch in
one call, and only the cheap probabilities-to-segments step stays in Python.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio

from voiceprint.engine.config import AudioConfig
from voiceprint.engine.errors import (
    AudioError,
    EmptyAudio,
    MissingAudio,
    NonFiniteAudio,
    NoSpeech,
    PathNotAllowed,
    TooLong,
    TooShort,
    UndecodableAudio,
)

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000

_CLIP_LEVEL = 0.999  # |x| at or above this counts as clipped
_PEAK_CEILING = 0.99  # the level gain is limited so the peak stays below full scale
_VAD_CHUNK = 512  # samples per silero-vad probability at 16 kHz (fixed by the model)
SNR_FRAME = SAMPLE_RATE // 50  # 20 ms frames for the SNR estimate
# Kept around each speech segment: onsets, releases and breaths carry speaker information.
# 150 ms beat 50 ms by 4 points of top-1 on speechocean762 (README, "Results").
_VAD_PAD_MS = 150
_VAD_MIN_SILENCE_MS = 300  # shorter pauses stay inside a segment: natural rhythm is kept
# Padded samples per VAD forward pass: as much as one 10-minute utterance needs anyway,
# so a large load_many costs no more memory than the longest input allowed by default.
_VAD_MAX_BATCH_SAMPLES = 600 * SAMPLE_RATE
# A batch step costs a fixed overhead plus a little per row, so padding a short signal to
# twice its length still beats a separate pass (measured on speechocean762 batches).
_VAD_BATCH_LENGTH_RATIO = 2.0

Source = str | os.PathLike | bytes


@dataclass(frozen=True)
class Quality:
    """What was measured on an input; stored with the utterance and shown to users."""

    duration_s: float  # input length
    speech_s: float  # after VAD
    clipping_ratio: float  # fraction of input samples with |x| >= 0.999 (before any gain)
    rms_dbfs: float  # level of the speech before normalisation
    snr_db: float  # speech power over the noise floor (see estimate_snr_db)
    input_sample_rate: int
    channels: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# eq=False: a dataclass __eq__ would compare the numpy arrays, whose truth value is ambiguous.
@dataclass(frozen=True, eq=False)
class Speech:
    """Speech ready for the frontends, plus where it came from."""

    samples: np.ndarray  # float32, 1-D, 16 kHz, speech only, level-normalised
    quality: Quality
    source: str  # file name (str(path)) or the name given for bytes input
    content_sha256: str  # sha256 hex of the original input bytes, used for de-duplication


@dataclass(frozen=True)
class _Decoded:
    """An input after decoding and resampling, waiting for the VAD."""

    samples: np.ndarray  # float32, 1-D, 16 kHz, full length
    source: str
    content_sha256: str
    duration_s: float
    clipping_ratio: float
    input_sample_rate: int
    channels: int


def load(source: Source, config: AudioConfig = AudioConfig(), *, name: str | None = None) -> Speech:
    """Decode one input and keep its level-normalised speech.

    Parameters
    ----------
    source
        A path, or the raw bytes of an audio file (WAV, FLAC, OGG or MP3).
    config
        Limits, VAD threshold and target level.
    name
        What to call the input in ``Speech.source`` and in error messages; defaults to
        the path, or ``"<bytes>"`` for bytes.

    Returns
    -------
    Speech

    Raises
    ------
    AudioError
        One of its subclasses (``MissingAudio``, ``EmptyAudio``, ``UndecodableAudio``,
        ``TooLong``, ``NonFiniteAudio``, ``NoSpeech``, ``TooShort``).
    """
    decoded = _decode(source, name, config)
    return _keep_speech(decoded, speech_probabilities([decoded.samples])[0], config)


def load_many(
    sources: Sequence[Source],
    config: AudioConfig = AudioConfig(),
    *,
    names: Sequence[str | None] | None = None,
) -> list[Speech | AudioError]:
    """Like ``[load(s) for s in sources]``, with one batched VAD pass for all of them.

    An input that fails gets its ``AudioError`` in its slot and the others go on, so
    one bad file in a batch of enrollments does not cost the rest. Every decoded input
    is held in memory until the VAD has run, so pass batches, not a whole corpus.

    Parameters
    ----------
    sources
        Paths or bytes, as for :func:`load`.
    config
        As for :func:`load`.
    names
        One name (or None) per source, as ``name`` for :func:`load`.

    Returns
    -------
    list of Speech or AudioError, in the order of ``sources``
    """
    if names is None:
        names = [None] * len(sources)
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} names given for {len(sources)} sources")
    results: list[Speech | AudioError | _Decoded] = []
    for source, name in zip(sources, names):
        try:
            results.append(_decode(source, name, config))
        except AudioError as exc:
            results.append(exc)
    pending = [i for i, r in enumerate(results) if isinstance(r, _Decoded)]
    probabilities = speech_probabilities([results[i].samples for i in pending])
    for i, probs in zip(pending, probabilities):
        try:
            results[i] = _keep_speech(results[i], probs, config)
        except AudioError as exc:
            results[i] = exc
    return results


def _decode(source: Source, name: str | None, config: AudioConfig) -> _Decoded:
    """Check, decode, downmix and resample one input; everything before the VAD."""
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name if name is not None else "<bytes>" if is_bytes else str(source)
    # The label is stored as text: a file name that is not UTF-8 (os.fsdecode's surrogates)
    # gets "?" in their place rather than failing its commit, and with it the batch.
    label = label.encode("utf-8", "replace").decode("utf-8")
    try:
        if is_bytes:
            data = _read_checked(io.BytesIO(source), label, config)
        else:
            data = _read_file(check_root(source, config.roots), label, config)
        return _decode_bytes(data, label, config)
    except (OSError, ValueError, RuntimeError) as exc:
        # No check foresaw it (a decoder's own complaint about one odd file): it is still
        # this input's failure alone, so the batch around it goes on.
        logger.warning("%s: unexpected error while decoding", label, exc_info=True)
        raise UndecodableAudio(f"{label}: cannot be decoded ({exc})") from None


def _decode_bytes(data: bytes, label: str, config: AudioConfig) -> _Decoded:
    try:
        frames, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.SoundFileError as exc:
        raise UndecodableAudio(f"{label}: cannot be decoded ({_reason(exc)})") from None
    if frames.size == 0:
        raise EmptyAudio(f"{label}: contains no audio frames")
    duration_s = len(frames) / rate
    if duration_s > config.max_duration_s:  # the header understated the length
        raise TooLong(f"{label}: {duration_s:.1f} s is longer than the limit of {config.max_duration_s:g} s")
    if not np.isfinite(frames).all():
        raise NonFiniteAudio(f"{label}: contains NaN or infinite samples")
    if not frames.any():
        raise NoSpeech(f"{label}: is digital silence")

    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    return _Decoded(
        samples=resample(mono, rate),
        source=label,
        content_sha256=hashlib.sha256(data).hexdigest(),
        duration_s=duration_s,
        clipping_ratio=float(np.mean(np.abs(frames) >= _CLIP_LEVEL)),
        input_sample_rate=rate,
        channels=frames.shape[1],
    )


def check_root(path: str | os.PathLike, roots: str) -> Path:
    """``path`` resolved, provided it lies inside one of ``roots`` (``os.pathsep``-separated;
    empty allows anywhere). Symlinks and ".." are resolved first, so neither can lead out.

    Raises
    ------
    PathNotAllowed
        The resolved path is outside every root.
    MissingAudio
        The path cannot name a file (a NUL byte in it, a symlink loop).
    """
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        # A NUL byte, a symlink loop, the home of an unknown "~user": no file is named.
        raise MissingAudio(f"{os.fspath(path)!r}: not a usable path ({exc})") from None
    allowed = [Path(r).expanduser().resolve() for r in roots.split(os.pathsep) if r.strip()]
    if allowed and not any(resolved.is_relative_to(root) for root in allowed):
        raise PathNotAllowed(f"{path}: outside the folders audio may be read from ([audio] roots)")
    return resolved


def _read_file(path: Path, label: str, config: AudioConfig) -> bytes:
    """The checked bytes of the regular file at ``path``.

    Only regular files: opening a FIFO waits for a writer that may never come, a device
    (/dev/zero) never ends, and opening some devices has effects of its own, so the path
    is looked at before it is opened. It is opened without blocking and looked at again
    through the open file, in case it was swapped in between.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            with open(fd, "rb") as fh:
                mode = os.fstat(fd).st_mode
                if stat.S_ISREG(mode):
                    return _read_checked(fh, label, config)
    except OSError as exc:
        raise MissingAudio(f"{label}: cannot be read ({exc.strerror or exc})") from None
    raise MissingAudio(f"{label}: not a regular file ({_kind(mode)})")


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def _read_checked(fh: BinaryIO, label: str, config: AudioConfig) -> bytes:
    """Read an input's bytes, after checking its header so that too long input is never read."""
    if fh.seek(0, io.SEEK_END) == 0:
        raise EmptyAudio(f"{label}: is empty (0 bytes)")
    fh.seek(0)
    try:
        info = sf.info(fh)
    except sf.SoundFileError as exc:
        raise UndecodableAudio(f"{label}: not a readable audio file ({_reason(exc)})") from None
    if info.frames == 0:
        raise EmptyAudio(f"{label}: contains no audio frames")
    if info.duration > config.max_duration_s:
        raise TooLong(f"{label}: {info.duration:.1f} s is longer than the limit of {config.max_duration_s:g} s")
    fh.seek(0)
    return fh.read()


def _reason(exc: sf.SoundFileError) -> str:
    # libsndfile's own words; str(exc) would name an in-memory buffer by its address.
    return getattr(exc, "error_string", None) or str(exc)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 samples at ``rate`` -> 16 kHz."""
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples)
    with torch.inference_mode():
        return _resampler(rate)(torch.from_numpy(samples)).numpy()


@functools.lru_cache(maxsize=None)
def _resampler(rate: int) -> torchaudio.transforms.Resample:
    # Cached per input rate: building the windowed-sinc kernel costs more than applying it
    # to a short utterance, and real inputs come in a handful of rates.
    return torchaudio.transforms.Resample(rate, SAMPLE_RATE)


def _keep_speech(decoded: _Decoded, probs: np.ndarray, config: AudioConfig) -> Speech:
    """Cut the speech out of a decoded input and normalise its level."""
    label = decoded.source
    segments = speech_segments(probs, len(decoded.samples), config)
    if not segments:
        raise NoSpeech(f"{label}: no speech found")
    speech = np.concatenate([decoded.samples[s["start"]:s["end"]] for s in segments])
    speech_s = len(speech) / SAMPLE_RATE
    if speech_s < config.min_speech_s:
        raise TooShort(f"{label}: {speech_s:.2f} s of speech, at least {config.min_speech_s:g} s needed")
    rms = float(np.sqrt(np.mean(np.square(speech, dtype=np.float64))))
    if rms == 0.0:
        raise NoSpeech(f"{label}: the speech found is digital silence")
    rms_dbfs = 20.0 * math.log10(rms)
    gain = level_gain(speech, rms_dbfs, config)
    quality = Quality(
        duration_s=decoded.duration_s,
        speech_s=speech_s,
        clipping_ratio=decoded.clipping_ratio,
        rms_dbfs=rms_dbfs,
        snr_db=estimate_snr_db(decoded.samples, segments),
        input_sample_rate=decoded.input_sample_rate,
        channels=decoded.channels,
    )
    logger.debug("%s: %.2f s of speech in %.2f s", label, speech_s, decoded.duration_s)
    return Speech(
        samples=speech * np.float32(gain),  # float32 stays float32
        quality=quality,
        source=label,
        content_sha256=decoded.content_sha256,
    )


def level_gain(speech: np.ndarray, rms_dbfs: float, config: AudioConfig) -> float:
    """The gain that brings quiet speech to ``config.target_dbfs`` (never past the peak ceiling).

    Louder speech is left alone (gain 1): the GE2E encoder reads power (not log) mel
    features, and this is the rule its training data went through. Levelling loud speech
    down as well cost 4 points of top-1 accuracy.
    """
    gain = 10.0 ** ((config.target_dbfs - rms_dbfs) / 20.0)
    return max(1.0, min(gain, _PEAK_CEILING / float(np.max(np.abs(speech))))) if gain > 1.0 else 1.0


def estimate_snr_db(samples: np.ndarray, segments: list[dict]) -> float:
    """Signal-to-noise ratio of a recording, from its VAD segmentation.

    Speech power is the mean power of 20 ms frames inside speech; the noise floor is the
    median power of the frames outside it, or, when there is too little non-speech to
    trust (under 0.2 s), the 5th percentile of all frames (the quietest moments of the
    speech itself). Capped to [-20, 100] dB so that digital silence does not give inf.

    >>> rng = np.random.default_rng(0)
    >>> tone = np.sin(np.arange(32000) / 5.0).astype(np.float32)
    >>> noisy = np.concatenate([np.zeros(8000), tone, np.zeros(8000)]) + 0.01 * rng.standard_normal(48000)
    >>> round(estimate_snr_db(noisy, [{"start": 8000, "end": 40000}]))
    37
    """
    return snr_of_frames(frame_powers(samples), segments)


def frame_powers(samples: np.ndarray) -> np.ndarray:
    """Mean power of each whole 20 ms frame of a 16 kHz signal (what the SNR estimate reads)."""
    n = len(samples) // SNR_FRAME
    return np.mean(np.square(samples[: n * SNR_FRAME].reshape(n, SNR_FRAME), dtype=np.float64), axis=1)


def snr_of_frames(power: np.ndarray, segments: list[dict]) -> float:
    """:func:`estimate_snr_db` from the frame powers (a live stream keeps them as it goes)."""
    frame, n = SNR_FRAME, len(power)
    if n == 0:
        return 0.0
    speech = np.zeros(n, dtype=bool)
    for seg in segments:
        speech[seg["start"] // frame : -(-seg["end"] // frame)] = True
    if not speech.any():
        return 0.0
    quiet = power[~speech]
    noise = float(np.median(quiet)) if quiet.size >= 10 else float(np.percentile(power, 5))
    snr = 10.0 * math.log10(max(float(power[speech].mean()), 1e-20) / max(noise, 1e-20))
    return float(min(max(snr, -20.0), 100.0))


def speech_segments(probs: np.ndarray, n_samples: int, config: AudioConfig) -> list[dict]:
    """Speech as ``[{"start": sample, "end": sample}, ...]`` from :func:`speech_probabilities`."""
    return _silero().get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=config.vad_threshold,
        min_silence_duration_ms=_VAD_MIN_SILENCE_MS, speech_pad_ms=_VAD_PAD_MS, audio_length_samples=n_samples,
    )


def speech_probabilities(signals: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Silero-vad speech probability per 512-sample chunk of each 16 kHz signal.

    The model is causal, so zero padding after a signal does not change its own chunks'
    probabilities; each row is cut back to its chunk count. A forward pass steps through
    every chunk of its widest row, so signals are sorted by length and a batch holds
    lengths within a factor of ``_VAD_BATCH_LENGTH_RATIO`` of each other; batches are
    also bounded by ``_VAD_MAX_BATCH_SAMPLES``.
    """
    chunks = [-(-len(s) // _VAD_CHUNK) for s in signals]
    result: list[np.ndarray] = [np.empty(0, np.float32)] * len(signals)
    batch: list[int] = []
    for i in sorted(range(len(signals)), key=chunks.__getitem__):
        # Sorted ascending: batch[0] is the shortest member and i sets the padded width.
        if batch and (
            chunks[i] > _VAD_BATCH_LENGTH_RATIO * chunks[batch[0]]
            or (len(batch) + 1) * chunks[i] * _VAD_CHUNK > _VAD_MAX_BATCH_SAMPLES
        ):
            _run_vad_batch(signals, chunks, batch, result)
            batch = []
        batch.append(i)
    if batch:
        _run_vad_batch(signals, chunks, batch, result)
    return result


def _run_vad_batch(
    signals: Sequence[np.ndarray], chunks: list[int], batch: list[int], result: list[np.ndarray]
) -> None:
    padded = torch.zeros(len(batch), max(chunks[i] for i in batch) * _VAD_CHUNK)
    for row, i in enumerate(batch):
        padded[row, : len(signals[i])] = torch.from_numpy(signals[i])
    probs = _vad_forward(padded).numpy()
    for row, i in enumerate(batch):
        result[i] = probs[row, : chunks[i]]


_vad_lock = threading.Lock()
_vad_model: torch.jit.ScriptModule | None = None


def _vad_forward(batch: torch.Tensor) -> torch.Tensor:
    """Run silero-vad over a batch; one call at a time, as the JIT model keeps its state on itself.

    The model's per-chunk operations are too small to split across threads: with two
    threads instead of one, the forward pass was about 10% faster on a quiet 2-core
    machine but at times 5-30 times slower on a busy one, where the threads wait on each
    other. Under OpenMP the thread count is per OS thread, so lowering it here for the
    call leaves other threads alone.
    """
    global _vad_model
    with _vad_lock:
        if _vad_model is None:
            logger.info("loading the silero-vad model")
            _vad_model = new_vad_model()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _vad_model.audio_forward(batch, SAMPLE_RATE)
        finally:
            torch.set_num_threads(threads)


def new_vad_model() -> torch.jit.ScriptModule:
    """A silero-vad model: the one of the batched passes, or one of a stream's own (fed chunk
    by chunk, it keeps its recurrent state on itself, so two streams cannot share one)."""
    with warnings.catch_warnings():
        # silero-vad locates its file with the deprecated importlib.resources.path.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _silero().load_silero_vad()  # its state starts fresh on the first chunk


_import_lock = threading.Lock()


@functools.cache
def _silero():
    """The silero_vad package, imported without its side effect on torch's thread count.

    Its import calls ``torch.set_num_threads(1)``, which would leave every encoder in
    this process on one core. The lock keeps a concurrent first call from saving the
    temporary count of 1 as the one to restore.
    """
    with _import_lock:
        threads = torch.get_num_threads()
        try:
            import silero_vad
        finally:
            torch.set_num_threads(threads)
    return silero_vad
