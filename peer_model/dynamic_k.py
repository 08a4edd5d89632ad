"""DA-MoE's dynamic expert allocation (Aghdam et al. 2024): a per-token number of experts from the
token's importance in the block's attention.

DA-MoE gives token t a number of experts proportional to its importance s_t, within a budget. Here
k_t = clamp(round(c · s_t), 1, k_max), every token at least one expert and at most k_max, and the budget
is the average: in training, c is solved on the batch so that the tokens' mean k is the configured
``top_k`` = k̄ (the smallest c whose mean reaches k̄; a first allocation proportional to s_t / s̄
lost 15-30% of the budget to the clamps, since importance is heavy-tailed). In evaluation c is a running
mean of the training values, as BatchNorm does with its statistics: a token's k then depends on the
token alone, so a KV-cached decode allocates exactly as a full forward does (the batch's c would make
it depend on the other tokens), and the mean k is k̄ only as far as the text resembles the training
batches; ``last_k`` keeps the last allocation so callers can report it (BENCHMARKS.md 5b does). The FLOP
counter counts k̄.

s_t is :func:`peer_model.attention.self_attention_share` (why that and not the paper's column sums:
see there).
"""
from __future__ import annotations

import torch
from torch import nn


class DynamicK(nn.Module):
    GRID = 64  # candidate scales per search round (two rounds: log-spaced, then linear in the bracket)

    def __init__(self, mean_k: int, max_k: int, momentum: float = 0.1):
        super().__init__()
        self.mean_k, self.max_k, self.momentum = mean_k, max_k, momentum
        # c, persistent (a checkpoint keeps it); k̄ gives uniform importance (s = 1) k̄ experts
        self.register_buffer("scale", torch.tensor(float(mean_k)))
        self.last_k: torch.Tensor | None = None

    def allocate(self, importance: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """k = clamp(round(scale · importance), 1, max_k), int64; ``scale`` broadcasts (a grid of them too)."""
        return (scale * importance).round().clamp_(1, self.max_k).long()

    def calibrate(self, importance: torch.Tensor) -> torch.Tensor:
        """The smallest scale c at which the mean of :meth:`allocate` reaches ``mean_k`` (to 1/64 of a
        log-grid step), or the largest mean the clamps allow when none does. Two vectorised rounds."""
        s = importance.float().reshape(-1)
        positive = s[s > 0]
        if positive.numel() == 0:  # no importance anywhere: one expert each, whatever c
            return self.scale.new_tensor(float(self.mean_k))
        # c reaches k̄ once the top (k̄ - 1) / (max_k - 1) of the tokens get max_k (the rest get >= 1); below
        # 0.5 / max(s) every token gets 1
        share = (self.mean_k - 1) / max(self.max_k - 1, 1)
        quantile = torch.quantile(s, 1 - share)
        top = self.max_k / (quantile if quantile > 0 else positive.min())
        bottom = 0.5 / s.max()
        coarse = bottom * (top / bottom) ** torch.linspace(0, 1, self.GRID, device=s.device)  # log-spaced, ascending
        hit = self._first_reaching(s, coarse)
        high = coarse[hit]
        low = coarse[hit - 1] if hit > 0 else high.new_zeros(())
        fine = torch.linspace(0, 1, self.GRID + 1, device=s.device)[1:] * (high - low) + low
        return fine[self._first_reaching(s, fine)]

    def _first_reaching(self, s: torch.Tensor, scales: torch.Tensor) -> int:
        means = self.allocate(s, scales.unsqueeze(1)).float().mean(1)  # (grid,), non-decreasing
        reached = (means >= self.mean_k - 1e-6).nonzero()
        return int(reached[0]) if reached.numel() else len(scales) - 1

    def forward(self, importance: torch.Tensor) -> torch.Tensor:
        """importance: (M,) → k per token, (M,) int64 in [1, max_k]."""
        s = importance.detach().float().reshape(-1)
        if self.training:
            scale = self.calibrate(s)
            with torch.no_grad():
                self.scale.lerp_(scale.to(self.scale.dtype), self.momentum)
        else:
            scale = self.scale.float()
        k = self.allocate(s, scale)
        self.last_k = k
        return k


def kept_slots(k: torch.Tensor, width: int) -> torch.Tensor:
    """(M,) k per token → (M, width) bool: the first k[m] of ``width`` ranked slots."""
    return torch.arange(width, device=k.device) < k.unsqueeze(1)
