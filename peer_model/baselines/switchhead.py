"""SwitchHead attention (Csordás et al., NeurIPS 2024, "SwitchHead: Accelerating Transformers with
Mixture-of-Experts Attention").

Few heads (``switchhead.n_heads``) with dense query and key projections; each head's value and output
projections are mixtures of ``num_experts`` experts (V_e: d → head_dim, O_e: head_dim → d). Per token
and head, a sigmoid of a linear score picks the ``top_k`` experts and weighs them by those sigmoid
scores, not renormalised (non-competing selection). The value side is selected from x at the source
(key) positions, the output side from x at the destination (query) positions, by separate weights:

    v_h(x_j) = Σ_{e ∈ topk} s_e(x_j) · x_j V_{h,e}        out(x_i) = Σ_h Σ_{e ∈ topk} s'_e(x_i) · a_h(i) O_{h,e}

where a_h is head h's attention output. RoPE and :func:`~peer_model.attention.attend` are shared with
:class:`~peer_model.attention.Attention`, so both KV cache modes work. With ``num_experts == 1`` there is
no selection (weight 1) and the layer is standard multi-head attention.

This reference computes every expert's projection with one einsum and masks the unselected ones out by
a zero weight (fine for E ≤ 8); a kernel would compute only the selected ones, and
:mod:`peer_model.flops` counts only the selected ones.

Init: Q, K and V experts N(0, 0.02), O experts N(0, 0.02 / √(2 · n_layers)), as the model initialises
multi-head attention; selection weights N(0, d^-0.5). V/O experts are plain parameters, not
``nn.Linear`` weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import KVCache, apply_rope, attend
from ..config import ModelConfig


class SwitchHeadAttention(nn.Module):
    aux_loss = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.switchhead
        d = config.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or d // cfg.n_heads
        if self.head_dim % 2:
            raise ValueError(f"the SwitchHead head size must be even for RoPE, got {self.head_dim}")
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        H, E, hd = self.n_heads, self.num_experts, self.head_dim
        self.q_proj = nn.Linear(d, H * hd, bias=False)
        self.k_proj = nn.Linear(d, H * hd, bias=False)
        self.v_experts = nn.Parameter(torch.randn(H, E, d, hd) * 0.02)
        self.o_experts = nn.Parameter(torch.randn(H, E, hd, d) * (0.02 / math.sqrt(2 * config.n_layers)))
        nn.init.normal_(self.q_proj.weight, std=0.02)
        nn.init.normal_(self.k_proj.weight, std=0.02)
        if E > 1:
            self.sel_v = nn.Linear(d, H * E, bias=False)  # source side
            self.sel_o = nn.Linear(d, H * E, bias=False)  # destination side
            nn.init.normal_(self.sel_v.weight, std=d**-0.5)
            nn.init.normal_(self.sel_o.weight, std=d**-0.5)
        else:
            self.sel_v = self.sel_o = None

    @property
    def cache_heads(self) -> int:
        return self.n_heads

    def gates(self, x: torch.Tensor, selection: nn.Linear | None) -> torch.Tensor:
        """x: (B, T, d) → (B, T, heads, E) expert weights: the sigmoid scores of the top_k experts of each
        token and head, zero for the others; all ones when there is a single expert."""
        B, T, _ = x.shape
        if selection is None:
            return x.new_ones(B, T, self.n_heads, 1)
        scores = torch.sigmoid(selection(x).view(B, T, self.n_heads, self.num_experts))
        if self.top_k < self.num_experts:
            kept, index = scores.topk(self.top_k, dim=-1)
            scores = torch.zeros_like(scores).scatter(-1, index, kept)
        return scores

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, importance: bool = False):
        """(B, T, d) → (B, T, d); with ``importance``, also each token's (B, T) self-attention share."""
        B, T, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, H, hd).transpose(1, 2)
        v_all = torch.einsum("btd,hedc->bthec", x, self.v_experts)  # every expert: (B, T, h, E, hd)
        v = (v_all * self.gates(x, self.sel_v).unsqueeze(-1)).sum(3).transpose(1, 2)  # (B, h, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y, share = attend(q, k, v, cache, layer, importance=True) if importance else (attend(q, k, v, cache, layer), None)
        weighted = y.transpose(1, 2).unsqueeze(3) * self.gates(x, self.sel_o).unsqueeze(-1)  # (B, T, h, E, hd)
        out = torch.einsum("bthec,hecd->btd", weighted, self.o_experts)
        return (out, share) if importance else out
