"""Low-rank updates of an encoder's weight matrices (LoRA, Hu et al., 2021).

Each trained weight matrix ``W`` (out x in) becomes ``W + B A`` with ``A`` (rank x in)
and ``B`` (out x rank); only the factors learn, the parent's weights stay fixed, and
``B`` starts at zero so training starts exactly at the parent. The forward pass runs
the unchanged module with the summed weights substituted for one call
(``torch.func.functional_call``), which also works for ``nn.LSTM``'s fused gate
matrices. After training the update is merged into the weights, so a version's
checkpoint has the encoder's usual shape and loads like any other.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call


class LowRankUpdate(nn.Module):
    """Factors ``A``, ``B`` of rank ``rank`` for every matrix among ``encoder``'s ``weights``
    (vectors such as biases stay as the parent's)."""

    def __init__(self, encoder: nn.Module, weights: list[nn.Parameter], rank: int, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        chosen = {id(w) for w in weights}
        self.names = [name for name, p in encoder.named_parameters() if id(p) in chosen and p.ndim == 2]
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        params = dict(encoder.named_parameters())
        for name in self.names:
            out_features, in_features = params[name].shape
            # A as nn.Linear initialises a layer (uniform, bound 1/sqrt(in)); B at zero.
            bound = 1 / math.sqrt(in_features)
            a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            self.a.append(nn.Parameter(a.to(params[name].device)))
            self.b.append(nn.Parameter(torch.zeros(out_features, rank, device=params[name].device)))

    def weights(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        """``encoder``'s parameters with every adapted matrix replaced by ``W + B A``."""
        params = dict(encoder.named_parameters())
        for name, a, b in zip(self.names, self.a, self.b):
            params[name] = params[name] + b @ a
        return params

    def forward(self, encoder: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(encoder, self.weights(encoder), (inputs,))

    @torch.no_grad()
    def merge_into(self, encoder: nn.Module) -> None:
        """Add the learnt update to ``encoder``'s own weights (done once, after training)."""
        params = dict(encoder.named_parameters())
        for name, a, b in zip(self.names, self.a, self.b):
            params[name].add_(b @ a)
