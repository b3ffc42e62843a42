"""Long recordings, read block by block: decode, downmix, resample, voice activity.

An enrollment or a probe is one short file, read whole (:mod:`voiceprint.engine.audio`). A
meeting or a call can last hours, so it is read here in blocks of ``block_s`` seconds and
kept on its own timeline: nothing is cut out, and the speech is given as regions in
seconds from the start of the recording. Memory is bounded by the block, not the file.

The VAD starts afresh on each block; a turn that crosses a block boundary becomes two
regions, which the diarization joins again when both get the same speaker.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from voiceprint.engine import audio
from voiceprint.engine.audio import SAMPLE_RATE, Source
from voiceprint.engine.config import AudioConfig
from voiceprint.engine.errors import EmptyAudio, MissingAudio, NonFiniteAudio, NoSpeech, TooLong, UndecodableAudio


@dataclass(frozen=True, eq=False)
class Block:
    """``samples`` (16 kHz mono float32) starting ``offset_s`` into the recording, and the
    speech in it as ``(start_s, end_s)`` regions on the recording's timeline."""

    offset_s: float
    samples: np.ndarray
    speech: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class RecordingInfo:
    source: str
    duration_s: float
    sample_rate: int
    channels: int


def open_recording(source: Source, config: AudioConfig, max_duration_s: float, *, name: str | None = None) -> tuple[RecordingInfo, sf.SoundFile]:
    """Check a recording and open it for reading; the header is read, no audio yet.

    Raises the same typed errors as :func:`voiceprint.engine.audio.load` (missing, not a
    regular file, empty, undecodable, too long), with ``max_duration_s`` as the limit.
    """
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name if name is not None else "<bytes>" if is_bytes else str(source)
    if is_bytes:
        if len(source) == 0:
            raise EmptyAudio(f"{label}: is empty (0 bytes)")
        handle = io.BytesIO(bytes(source))
    else:
        path = audio.check_root(source, config.roots)
        try:
            # Only regular files: a named pipe or a device would block or never end.
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise MissingAudio(f"{label}: cannot be read ({exc.strerror or exc})") from None
        if not stat.S_ISREG(mode):
            raise MissingAudio(f"{label}: not a regular file")
        if os.path.getsize(path) == 0:
            raise EmptyAudio(f"{label}: is empty (0 bytes)")
        handle = str(path)  # libsndfile opens and closes it itself
    try:
        sound = sf.SoundFile(handle)
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise UndecodableAudio(f"{label}: not a readable audio file ({getattr(exc, 'error_string', None) or exc})") from None
    info = RecordingInfo(label, sound.frames / sound.samplerate, sound.samplerate, sound.channels)
    if sound.frames == 0:
        sound.close()
        raise EmptyAudio(f"{label}: contains no audio frames")
    if info.duration_s > max_duration_s:
        sound.close()
        raise TooLong(f"{label}: {info.duration_s:.1f} s is longer than the limit of {max_duration_s:g} s")
    return info, sound


def blocks(info: RecordingInfo, sound: sf.SoundFile, config: AudioConfig, *, block_s: float = 60.0) -> Iterator[Block]:
    """The recording in blocks of ``block_s`` seconds, each with its speech regions.

    Raises ``NonFiniteAudio`` on a block with NaN or infinite samples, and ``NoSpeech``
    at the end when no block held any speech.
    """
    frames_per_block = max(1, round(block_s * info.sample_rate))
    offset_frames, any_speech = 0, False
    with sound:
        while True:
            try:
                frames = sound.read(frames_per_block, dtype="float32", always_2d=True)
            except (sf.SoundFileError, RuntimeError) as exc:
                raise UndecodableAudio(f"{info.source}: cannot be decoded after {offset_frames / info.sample_rate:.1f} s ({exc})") from None
            if len(frames) == 0:
                break
            if not np.isfinite(frames).all():
                raise NonFiniteAudio(f"{info.source}: contains NaN or infinite samples")
            mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
            samples = audio.resample(mono, info.sample_rate)
            offset_s = offset_frames / info.sample_rate
            regions: tuple[tuple[float, float], ...] = ()
            if samples.any():
                probs = audio.speech_probabilities([samples])[0]
                regions = tuple(
                    (offset_s + s["start"] / SAMPLE_RATE, offset_s + s["end"] / SAMPLE_RATE)
                    for s in audio.speech_segments(probs, len(samples), config)
                )
            any_speech = any_speech or bool(regions)
            yield Block(offset_s, samples, regions)
            offset_frames += len(frames)
    if not any_speech:
        raise NoSpeech(f"{info.source}: no speech found")


def block_count(info: RecordingInfo, block_s: float = 60.0) -> int:
    return max(1, math.ceil(info.duration_s / block_s))
