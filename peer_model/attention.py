"""Attention: RoPE, the KV cache (uniform and ragged), causal attention through it, multi-head attention.

Every attention module (multi-head here, SwitchHead in :mod:`peer_model.baselines.switchhead`) computes
its queries, keys and values and calls :func:`attend`, so each supports training, prefill, cached decode
and ragged batched decode alike. A module tells the model what its cache holds through ``cache_heads``
and ``head_dim``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_len, head_dim / 2)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos, sin: (T, head_dim / 2), or (B, 1, T, head_dim / 2) for positions
    that differ per row. Rotates pairs (x[2i], x[2i+1])."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (layers, B, heads, max_len, head_dim).

    Two modes. Uniform (``lengths`` None): every row holds ``length`` tokens and a forward appends T
    tokens to all rows. Ragged (``lengths`` a (B,) int64 tensor): row b holds ``lengths[b]`` tokens and a
    forward takes exactly one new token per row, at that row's own position, so sequences of different
    lengths decode in one batch (a batching engine's decode step, see batching.py).
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0  # tokens already written (uniform mode)
    lengths: torch.Tensor | None = None  # (B,) tokens already written per row (ragged mode)
    visible: torch.Tensor | None = None  # ragged mode: this step's (B, 1, 1, span) key mask, set by the model


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
    """Causal attention of q over k, v (each (B, heads, T, head_dim), after RoPE), through the cache when
    there is one: the new keys and values are written to it and q attends to everything it holds.
    Shared by every attention module, so each supports both cache modes."""
    B, _, T, _ = q.shape
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if cache.lengths is not None:  # ragged: one token per row at position lengths[b]
        rows = torch.arange(B, device=q.device)
        keys, values = cache.keys[layer], cache.values[layer]  # (B, h, max_len, hd)
        keys[rows, :, cache.lengths] = k[:, :, 0]
        values[rows, :, cache.lengths] = v[:, :, 0]
        span = cache.visible.shape[-1]
        return F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=cache.visible)
    start = cache.length
    cache.keys[layer, :, :, start : start + T] = k
    cache.values[layer, :, :, start : start + T] = v
    k_all = cache.keys[layer, :, :, : start + T]
    v_all = cache.values[layer, :, :, : start + T]
    # query t (absolute position start + t) sees keys 0 .. start + t; one new token sees all
    mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


class Attention(nn.Module):
    """Standard multi-head attention; ``cache_heads`` × ``head_dim`` is what its KV cache holds."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    @property
    def cache_heads(self) -> int:
        return self.n_heads

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, cache, layer)
        return self.out(y.transpose(1, 2).reshape(B, T, D))
