"""DA-MoE's dynamic expert allocation (Aghdam et al. 2024): a per-token number of experts from the
token's importance in the block's attention.

DA-MoE gives token t a number of experts proportional to its importance s_t, within a budget. Here the
budget is an average: k_t = clamp(round(k̄ · s_t / s̄), 1, k_max), with k̄ the configured ``top_k`` and
s̄ the mean importance, so tokens of average importance get k̄ experts, more important ones up to
k_max, and every token at least one. s̄ is the batch's mean in training and, as BatchNorm does, a
running mean of those in evaluation: a token's k then depends on the token alone, so a KV-cached decode
allocates exactly as a full forward does (the batch's mean would make it depend on the other tokens).
Rounding and the clamps move the realised mean a little off k̄; ``last_k`` keeps the last allocation
so callers can report it (BENCHMARKS.md 5 does), and the FLOP counter counts k̄.

s_t is :func:`peer_model.attention.self_attention_share` (why that and not the paper's column sums:
see there).
"""
from __future__ import annotations

import torch
from torch import nn


class DynamicK(nn.Module):
    def __init__(self, mean_k: int, max_k: int, momentum: float = 0.1):
        super().__init__()
        self.mean_k, self.max_k, self.momentum = mean_k, max_k, momentum
        self.register_buffer("mean_importance", torch.ones(()))  # persistent: a checkpoint keeps it
        self.last_k: torch.Tensor | None = None

    def forward(self, importance: torch.Tensor) -> torch.Tensor:
        """importance: (M,) → k per token, (M,) int64 in [1, max_k]."""
        s = importance.detach().float().reshape(-1)
        if self.training:
            mean = s.mean()
            with torch.no_grad():
                self.mean_importance.lerp_(mean.to(self.mean_importance.dtype), self.momentum)
        else:
            mean = self.mean_importance.float()
        k = (self.mean_k * s / mean.clamp_min(1e-6)).round().clamp_(1, self.max_k).long()
        self.last_k = k
        return k


def kept_slots(k: torch.Tensor, width: int) -> torch.Tensor:
    """(M,) k per token → (M, width) bool: the first k[m] of ``width`` ranked slots."""
    return torch.arange(width, device=k.device) < k.unsqueeze(1)
