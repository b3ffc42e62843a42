"""Feature extraction: waveform (16 kHz) -> frames of features, with torchaudio.

Each front end is an ``nn.Module`` mapping ``[batch, samples]`` to ``[batch, frames, dims]``
and is registered by name; an encoder names the front end it was trained with.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from voiceprint.engine.registry import Registry

FRONTENDS: Registry[type[nn.Module]] = Registry("frontend")


@FRONTENDS.register("resemblyzer-mel")
class ResemblyzerMel(nn.Module):
    """40-band power mel spectrogram, 25 ms windows every 10 ms, no log compression.

    These settings reproduce Resemblyzer's librosa features (Slaney mel scale and area
    normalisation, centred frames with zero padding), which its GE2E LSTM was trained on.
    One frame per 160 samples plus one: ``frames = samples // 160 + 1``.
    """

    sample_rate = 16_000
    hop_length = 160
    dims = 40

    def __init__(self) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=400,
            hop_length=self.hop_length,
            n_mels=self.dims,
            mel_scale="slaney",
            norm="slaney",
            center=True,
            pad_mode="constant",
            power=2.0,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.mel(waveform).transpose(-1, -2)


def create_frontend(name: str) -> nn.Module:
    return FRONTENDS.get(name)()
