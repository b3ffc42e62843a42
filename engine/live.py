"""Live audio: PCM arriving in frames of any size, judged while it arrives.

A :class:`LiveAudio` holds one session's audio. The voice activity is decided on the
stream itself: a silero-vad model of the session's own carries its state from chunk to
chunk, so each 32 ms is judged once, as it arrives; the speech found so far, the
clipping and the noise give the running feedback. What is stored or decided at the end
does not come from here: :meth:`LiveAudio.wav` gives the audio as the WAV file a client
would have uploaded, and that file takes the engine's one path (decode, VAD, quality,
embedding), so a streamed enrollment stores exactly what the upload stores.

At 16 kHz the running VAD sees the very samples the file path sees, and the two agree
chunk for chunk (the model is causal); at other rates each frame is resampled on its
own, which is close enough for feedback.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import torch

from voiceprint.engine import audio
from voiceprint.engine.config import AudioConfig, EnrollmentConfig
from voiceprint.engine.errors import MalformedStream, NonFiniteAudio, TooLong

# Sample formats a client may declare: numpy dtype, the scale soundfile reads it to
# [-1, 1) with, and the WAV subtype that stores it unchanged.
FORMATS = {"s16le": ("<i2", 32768.0, "PCM_16"), "f32le": ("<f4", 1.0, "FLOAT")}
RATES = (8_000, 192_000)  # the declared sample rate must lie in this range (inclusive)
_CHUNK = audio._VAD_CHUNK
_QUIET_S = 2.0  # this long without speech at the end of the stream: NO_SPEECH


class LiveAudio:
    """One session's mono PCM, with its running speech detection.

    >>> live = LiveAudio(16000, "s16le", AudioConfig())
    >>> live.add(np.zeros(8000, "<i2").tobytes() + b"\\x00")  # half a second and a stray byte
    >>> round(live.received_s, 2), live.speech_s()
    (0.5, 0.0)
    >>> live.wav()
    Traceback (most recent call last):
    ...
    voiceprint.engine.errors.MalformedStream: the stream ended inside a sample (1 stray byte(s) of s16le)
    """

    def __init__(self, rate: int, fmt: str, config: AudioConfig, *, max_bytes: int | None = None) -> None:
        if fmt not in FORMATS:
            raise MalformedStream(f"format {fmt!r} is not one of {sorted(FORMATS)}")
        if not isinstance(rate, int) or isinstance(rate, bool) or not RATES[0] <= rate <= RATES[1]:
            raise MalformedStream(f"rate {rate!r} is not a sample rate from {RATES[0]} to {RATES[1]} Hz")
        self.rate, self.format, self.config = rate, fmt, config
        self._dtype, self._scale, self._subtype = FORMATS[fmt]
        self.width = np.dtype(self._dtype).itemsize
        self.max_bytes = int(config.max_duration_s * rate) * self.width
        if max_bytes is not None:
            self.max_bytes = min(self.max_bytes, max_bytes)
        self._parts: list[np.ndarray] = []  # received samples, as sent
        self._stray = b""  # the start of a sample split across frames
        self._n = 0
        self._clipped = 0
        self._pending = np.empty(0, np.float32)  # 16 kHz samples not yet a whole VAD chunk
        self._unframed = np.empty(0, np.float32)  # 16 kHz samples short of a whole SNR frame
        self._powers: list[np.ndarray] = []  # 20 ms frame powers, for the SNR estimate
        self._probs: list[float] = []
        self._segmented: tuple[int, list[dict]] = (0, [])  # probabilities seen, their segments
        self._vad = None  # loaded on first use: only sessions that send audio need one

    @property
    def received_s(self) -> float:
        return self._n / self.rate

    def add(self, frame: bytes) -> None:
        """Take one frame; raises ``TooLong`` past ``[audio] max_duration_s`` and
        ``NonFiniteAudio`` for NaN or infinite float samples (the frame is then not kept)."""
        data = self._stray + frame
        whole = len(data) - len(data) % self.width
        if (self._n * self.width) + whole > self.max_bytes:
            raise TooLong(f"the stream passed its limit of {self.max_bytes} bytes "
                          f"({self.max_bytes // self.width / self.rate:g} s of {self.format} at {self.rate} Hz)")
        raw = np.frombuffer(data[:whole], self._dtype)
        samples = raw.astype(np.float32) / np.float32(self._scale)  # as soundfile reads them
        if not np.isfinite(samples).all():
            raise NonFiniteAudio("the stream holds NaN or infinite samples")
        self._stray = data[whole:]
        self._parts.append(raw)  # as sent: written back unscaled, so the WAV holds these very samples
        self._n += len(samples)
        self._clipped += int(np.count_nonzero(np.abs(samples) >= audio._CLIP_LEVEL))
        self._pending = np.concatenate([self._pending, audio.resample(samples, self.rate)])

    def detect(self) -> None:
        """Run the VAD over the whole chunks received since the last call (the costly part:
        call it from a worker thread, not an event loop)."""
        whole = len(self._pending) - len(self._pending) % _CHUNK
        if whole == 0:
            return
        if self._vad is None:
            self._vad = audio.new_vad_model()
        block, self._pending = self._pending[:whole], self._pending[whole:]
        framed = np.concatenate([self._unframed, block])
        cut = len(framed) - len(framed) % audio.SNR_FRAME
        self._powers.append(audio.frame_powers(framed[:cut]))
        self._unframed = framed[cut:]
        with torch.inference_mode():
            chunks = torch.from_numpy(block).reshape(-1, _CHUNK)
            self._probs.extend(float(self._vad(chunk[None], audio.SAMPLE_RATE)) for chunk in chunks)

    def _segments(self) -> list[dict]:
        seen, segments = self._segmented
        if seen != len(self._probs):  # asked for twice per update: cut once
            segments = audio.speech_segments(np.asarray(self._probs, np.float32), len(self._probs) * _CHUNK, self.config)
            self._segmented = (len(self._probs), segments)
        return segments

    def speech_s(self) -> float:
        """Speech found so far, by the rule the file path cuts speech with (padding included)."""
        return sum(s["end"] - s["start"] for s in self._segments()) / audio.SAMPLE_RATE

    def feedback(self, rules: EnrollmentConfig) -> str:
        """``NO_SPEECH``, ``CLIPPED``, ``TOO_NOISY`` or ``OK`` for the audio so far, judged as an
        enrollment's quality check would judge it."""
        segments = self._segments()
        heard = len(self._probs) * _CHUNK / audio.SAMPLE_RATE
        last = max((s["end"] for s in segments), default=0) / audio.SAMPLE_RATE
        if heard >= 1.0 and (not segments or heard - last >= _QUIET_S):
            return "NO_SPEECH"
        if self._n and self._clipped / self._n > rules.max_clipping_ratio:
            return "CLIPPED"
        if segments and audio.snr_of_frames(np.concatenate(self._powers), segments) < rules.min_snr_db:
            return "TOO_NOISY"
        return "OK"

    def wav(self) -> bytes:
        """The audio received, as a mono WAV file of the declared rate and sample format."""
        if self._stray:
            raise MalformedStream(f"the stream ended inside a sample ({len(self._stray)} stray byte(s) of {self.format})")
        out = io.BytesIO()
        samples = np.concatenate(self._parts) if self._parts else np.empty(0, self._dtype)
        sf.write(out, samples, self.rate, subtype=self._subtype, format="WAV")
        return out.getvalue()
