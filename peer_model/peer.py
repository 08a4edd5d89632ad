"""The PEER layer (He 2024, "Mixture of A Million Experts", Algorithm 1).

For each token x and each of h heads: q = BatchNorm(W_q x) split in two halves; the k experts with the
best product-key scores are retrieved (exactly, see retrieval.py); g = softmax over their k scores;
the head's output is Σ_i g_i σ(u_iᵀx) v_i. The layer returns the sum over heads. All heads share one
expert pool and one pair of sub-key sets (the paper's choice).

The pool grows with :meth:`PEER.grow`: new sub-keys and expert rows are appended, ids never move
(see pool.py). A boolean ``trainable`` row mask freezes any set of experts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import PEERConfig
from .experts import expert_mix, expert_mix_reference
from .pool import ExpertGrid, Segment
from .retrieval import multihead_retrieve


class PEER(nn.Module):
    def __init__(self, d_model: int, config: PEERConfig, grid: ExpertGrid | None = None):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.grid = grid or ExpertGrid.square(config.sub_keys)
        half = config.d_key // 2
        self.query = nn.Linear(d_model, config.heads * config.d_key, bias=False)
        self.query_norm = nn.BatchNorm1d(config.heads * config.d_key) if config.query_batchnorm else nn.Identity()
        self.sub_keys1 = nn.Parameter(torch.randn(self.grid.rows, half) * half**-0.5)
        self.sub_keys2 = nn.Parameter(torch.randn(self.grid.cols, half) * half**-0.5)
        n = self.grid.num_experts
        self.expert_down = nn.Parameter(torch.randn(n, d_model).mul_(d_model**-0.5))  # u_i
        self.expert_up = nn.Parameter(torch.randn(n, d_model).mul_(d_model**-0.5 / math.sqrt(config.heads)))  # v_i
        self.register_buffer("trainable", torch.ones(n, dtype=torch.bool), persistent=False)
        self.register_buffer("usage_counts", torch.zeros(n, dtype=torch.long), persistent=False)
        self.track_usage = False
        self.reference = False  # True: brute-force retrieval and plain autograd experts (for tests)

    @property
    def num_experts(self) -> int:
        return self.grid.num_experts

    @property
    def segments(self) -> list[Segment]:
        return self.grid.segments

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (M, d) → (gates, ids), both (M, heads * k); gates sum to 1 within each head."""
        cfg = self.config
        return multihead_retrieve(self.query_norm(self.query(x)), self.sub_keys1, self.sub_keys2, self.grid,
                                  cfg.d_key, cfg.top_k, self.reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (M, d)
        gates, ids = self.route(x)
        if self.track_usage:
            self.usage_counts.index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        if self.reference:
            out = expert_mix_reference(x, ids, gates, self.expert_down, self.expert_up, self.config.activation)
        else:
            frozen_rows = None if bool(self.trainable.all()) else self.trainable
            out = expert_mix(x, ids, gates, self.expert_down, self.expert_up, self.config.activation, frozen_rows)
        return out.view(shape).to(x.dtype)

    # ---- growth and freezing -------------------------------------------------------------------

    @torch.no_grad()
    def grow(self, num_experts: int | None = None, *, rows: int | None = None, cols: int | None = None,
             tag: str = "", key_scale: float = 0.5) -> Segment:
        """Append experts; returns their segment. Give ``num_experts`` (rounded up to fill the grid)
        or the new grid shape ``rows``/``cols``.

        New up-vectors start at zero, so a new expert adds nothing until trained; the output moves
        only by the gate mass new experts take from old ones when retrieval picks them instead. New
        sub-keys are therefore drawn at ``key_scale`` × the RMS of the existing ones: at 0.5, on a
        trained model whose pool was doubled, new experts still won 5% of the selections (so they get
        gradients and learn) while held-out loss moved by < 1%; at 1.0 they won 30% and the loss
        rose by 11% (measured in tests/test_growth.py's setting).
        """
        if num_experts is not None:
            rows, cols = self.grid.plan_growth(num_experts)
        rows = self.grid.rows if rows is None else rows
        cols = self.grid.cols if cols is None else cols
        segment = self.grid.grow(rows, cols, tag)
        self.sub_keys1 = _extended(self.sub_keys1, rows, _like_rms(self.sub_keys1, key_scale))
        self.sub_keys2 = _extended(self.sub_keys2, cols, _like_rms(self.sub_keys2, key_scale))
        self.expert_down = _extended(self.expert_down, segment.end, _like_rms(self.expert_down))
        self.expert_up = _extended(self.expert_up, segment.end, torch.zeros_like)
        self.trainable = torch.cat([self.trainable, self.trainable.new_ones(segment.size)])
        self.usage_counts = torch.cat([self.usage_counts, self.usage_counts.new_zeros(segment.size)])
        return segment

    def set_trainable(self, ids: torch.Tensor | slice, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) expert rows; frozen rows stay bit-identical in training."""
        self.trainable[ids] = trainable

    def freeze_segments(self, indices: list[int]) -> None:
        for index in indices:
            seg = self.grid.segments[index]
            self.set_trainable(slice(seg.start, seg.end), False)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()


def _like_rms(table: torch.Tensor, scale: float = 1.0):
    """Initialiser: Gaussian rows with ``scale`` × the RMS of ``table``."""
    rms = table.detach().float().pow(2).mean().sqrt().item() * scale
    return lambda t: torch.randn_like(t) * rms


def _extended(param: nn.Parameter, rows: int, init) -> nn.Parameter:
    """A new parameter with ``param``'s rows unchanged and ``rows - len(param)`` rows from ``init``."""
    extra = param.new_empty(rows - param.shape[0], *param.shape[1:])
    return nn.Parameter(torch.cat([param.detach(), init(extra)]), requires_grad=param.requires_grad)
