"""Utterance embeddings from a window-level encoder.

An utterance is cut into overlapping windows of the encoder's length (1.6 s for the
GE2E LSTM), 1.3 windows per second, each window is embedded, and the utterance
embedding is the L2-normalised mean of its window embeddings. This is the d-vector
recipe of Resemblyzer, kept window for window so that the pretrained model sees what it
was trained on. Windows of many utterances are batched into few forward passes, which is
where most of the speed comes from on a CPU.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from voiceprint.engine.errors import InvalidInput
from voiceprint.engine.frontends import create_frontend

WINDOWS_PER_SECOND = 1.3
MIN_COVERAGE = 0.75  # a last window less than 75 % covered by audio is dropped


def window_step(*, hop_length: int, sample_rate: int) -> int:
    """Frames from one window's start to the next (1.3 windows per second).

    >>> window_step(hop_length=160, sample_rate=16000)
    77
    """
    return round(sample_rate / WINDOWS_PER_SECOND / hop_length)


def window_starts(n_samples: int, *, hop_length: int, window_frames: int, sample_rate: int) -> list[int]:
    """Frame index where each window of an utterance of ``n_samples`` starts.

    There is always at least one window; a short utterance is zero-padded to fill it.

    >>> window_starts(16000 * 3, hop_length=160, window_frames=160, sample_rate=16000)
    [0, 77, 154]
    """
    n_frames = math.ceil((n_samples + 1) / hop_length)
    step = window_step(hop_length=hop_length, sample_rate=sample_rate)
    starts = list(range(0, max(1, n_frames - window_frames + step + 1), step))
    last = starts[-1] * hop_length
    coverage = (n_samples - last) / (window_frames * hop_length)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return starts


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Embedder:
    """Turn 16 kHz speech waveforms into L2-normalised utterance embeddings.

    Parameters
    ----------
    encoder
        A registered encoder (see ``engine.encoders``); it is put in eval mode and moved
        to ``device``.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ...
    batch_windows
        Windows per forward pass; bounds memory whatever the number of utterances.
    """

    def __init__(self, encoder: nn.Module, *, device: str = "auto", batch_windows: int = 256) -> None:
        self.device = pick_device(device)
        self.encoder = encoder.eval().to(self.device)
        self.frontend = create_frontend(encoder.frontend).to(self.device)
        self.window_frames = encoder.window_frames
        self.batch_windows = batch_windows

    @property
    def dim(self) -> int:
        return self.encoder.embedding_dim

    @property
    def window_s(self) -> float:
        """Seconds of audio one window reads: a clip this long is embedded as one window."""
        return self.window_frames * self.frontend.hop_length / self.frontend.sample_rate

    @torch.inference_mode()
    def features(self, waveform: np.ndarray) -> np.ndarray:
        """The encoder input of one utterance, ``[frames, dims]`` float32, for keeping instead
        of its audio: :meth:`embed_features` gives the same embedding from it as
        :meth:`embed` from the waveform."""
        return self._features(waveform).cpu().numpy()

    def _features(self, waveform: np.ndarray) -> torch.Tensor:
        """Features of the waveform zero-padded to fill its last window, cut after that window.

        The padding must go in before the frontend, whose centred frames near the end
        see it. The cut keeps the windows' frames and nothing else, so their starts follow
        from the frame count alone (:meth:`_cut`) and no sample count has to be kept.
        """
        hop = self.frontend.hop_length
        starts = window_starts(
            len(waveform), hop_length=hop, window_frames=self.window_frames, sample_rate=self.frontend.sample_rate
        )
        covered = starts[-1] + self.window_frames
        needed = covered * hop
        wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if needed >= len(wave):
            wave = torch.nn.functional.pad(wave, (0, needed - len(wave)))
        return self.frontend(wave.to(self.device))[:covered]

    def _cut(self, features: torch.Tensor) -> torch.Tensor:
        """Windows ``[n_windows, window_frames, dims]`` of features from :meth:`_features`."""
        step = window_step(hop_length=self.frontend.hop_length, sample_rate=self.frontend.sample_rate)
        starts = range(0, len(features) - self.window_frames + 1, step)
        return torch.stack([features[s : s + self.window_frames] for s in starts])

    def windows(self, waveform: np.ndarray) -> torch.Tensor:
        """Feature windows ``[n_windows, window_frames, dims]`` of one utterance."""
        return self._cut(self._features(waveform))

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings ``[len(waveforms), dim]`` (float32) of 16 kHz mono waveforms."""
        return self._embed([self.windows(w) for w in waveforms])

    @torch.inference_mode()
    def embed_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings ``[len(features), dim]`` (float32) of utterances given by :meth:`features`
        (any float dtype: stored features are float16)."""
        per_utterance = []
        for f in features:
            if f.ndim != 2 or f.shape[1] != self.frontend.dims or len(f) < self.window_frames:
                raise InvalidInput(
                    f"features of shape {f.shape} do not fit this encoder: "
                    f"at least {self.window_frames} frames of {self.frontend.dims} dims expected"
                )
            per_utterance.append(self._cut(torch.as_tensor(f, dtype=torch.float32, device=self.device)))
        return self._embed(per_utterance)

    def _embed(self, per_utterance: list[torch.Tensor]) -> np.ndarray:
        """Utterance embeddings from each utterance's windows, batched across utterances."""
        if len(per_utterance) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        owner = torch.repeat_interleave(
            torch.arange(len(per_utterance), device=self.device),
            torch.tensor([len(w) for w in per_utterance], device=self.device),
        )
        windows = torch.cat(per_utterance)
        sums = torch.zeros(len(per_utterance), self.dim, device=self.device)
        for start in range(0, len(windows), self.batch_windows):
            chunk = windows[start : start + self.batch_windows]
            sums.index_add_(0, owner[start : start + self.batch_windows], self.encoder(chunk).float())
        embeddings = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return embeddings.cpu().numpy().astype(np.float32)
