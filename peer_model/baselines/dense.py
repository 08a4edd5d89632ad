"""Dense feed-forward blocks: the GELU MLP of the non-expert blocks, and SwiGLU (Shazeer 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """down(act(up(x))); act is exact GELU, or its tanh approximation (GPT-2's "gelu_new")."""

    aux_loss = None

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) ⊙ up(x)); ``d_ff`` hidden units (use 2/3 of a GELU MLP's for equal parameters)."""

    aux_loss = None

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def dense_mlp(d_model: int, d_ff: int, kind: str = "gelu", bias: bool = False) -> nn.Module:
    """The dense feed-forward named by ``ModelConfig.mlp``."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias)
    return FeedForward(d_model, d_ff, kind, bias)
