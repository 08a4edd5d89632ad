"""Attention: RoPE, the KV cache (uniform and ragged), causal attention through it, multi-head attention.

Every attention module (multi-head here, SwitchHead in :mod:`peer_model.baselines.switchhead`) computes
its queries, keys and values and calls :func:`attend`, so each supports training, prefill, cached decode
and ragged batched decode alike. A module tells the model what its cache holds through ``cache_heads``
and ``head_dim``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_len, head_dim / 2). ``scaling``: a Hugging Face
    ``rope_scaling`` / ``rope_parameters`` dict (linear, llama3 or yarn), computed as transformers does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq, attention_factor = _scaled_frequencies(inv_freq, head_dim, theta, scaling or {})
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def _scaled_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float,
                        scaling: dict) -> tuple[torch.Tensor, float]:
    """The RoPE context-extension variants of pretrained models: (inverse frequencies, cos/sin factor)."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":  # position interpolation: every angle / factor
        return inv_freq / factor, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "llama3":  # Llama 3.1: long wavelengths / factor, short kept, a smooth blend between
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":  # YaRN (Peng et al. 2023): NTK-by-parts interpolation and an attention temperature
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                                if mscale and mscale_all else _yarn_mscale(factor))

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolated = 1 - ramp
        return inv_freq / factor * ramp + inv_freq * extrapolated, float(attention_factor)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "interleaved") -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos, sin: (T, head_dim / 2), or (B, 1, T, head_dim / 2) for positions
    that differ per row. ``interleaved`` rotates pairs (x[2i], x[2i+1]); ``half`` rotates (x[i], x[i + hd/2])
    as Hugging Face's Llama-family code does (its checkpoints' query and key rows are in that order)."""
    if style == "half":
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
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
    # ragged mode: key positions a step attends over; None: the longest row's + 1, read from ``lengths``
    # (a device-to-host sync). A batching engine knows it on the host; a CUDA graph needs it fixed.
    span: int | None = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
           importance: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q over k, v (each (B, heads, T, head_dim), after RoPE), through the cache when
    there is one: the new keys and values are written to it and q attends to everything it holds.
    k and v may have fewer heads than q (grouped-query attention: each serves n_heads / kv_heads query heads).
    Shared by every attention module, so each supports both cache modes. ``importance``: also return
    each query token's :func:`self_attention_share` (B, T), for DA-MoE's dynamic k."""
    B, _, T, _ = q.shape
    gqa = q.shape[1] != k.shape[1]
    if cache is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if not importance:
            return y
        visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return y, self_attention_share(q, k, visible, torch.arange(T, device=q.device))
    if cache.lengths is not None:  # ragged: one token per row at position lengths[b]
        rows = torch.arange(B, device=q.device)
        keys, values = cache.keys[layer], cache.values[layer]  # (B, h, max_len, hd)
        keys[rows, :, cache.lengths] = k[:, :, 0]
        values[rows, :, cache.lengths] = v[:, :, 0]
        span = cache.visible.shape[-1]
        y = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=cache.visible,
                                           enable_gqa=gqa)
        if not importance:
            return y
        return y, self_attention_share(q, keys[:, :, :span], cache.visible, cache.lengths.view(B, 1))
    start = cache.length
    cache.keys[layer, :, :, start : start + T] = k
    cache.values[layer, :, :, start : start + T] = v
    k_all = cache.keys[layer, :, :, : start + T]
    v_all = cache.values[layer, :, :, : start + T]
    # query t (absolute position start + t) sees keys 0 .. start + t; one new token sees all
    mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
    if not importance:
        return y
    visible = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    return y, self_attention_share(q, k_all, visible, torch.arange(start, start + T, device=q.device))


def self_attention_share(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """DA-MoE's token importance, kept causal: (B, T), the attention weight each query token gives its
    own key, averaged over heads and multiplied by the number of keys it sees (1 = uniform attention).

    DA-MoE (Aghdam et al. 2024) scores token j by the attention it receives, Σ_heads Σ_i A[i, j]; in a
    decoder the queries i > j come later, so a causal layer (and a KV-cached decode equal to a full
    forward) can only use i = j, the token's share of its own attention. The factor "keys seen" makes
    the share relative to uniform, so it does not fall as 1 / position along the window.

    q: (B, h, T, hd); keys: (B, kv_heads, S, hd); visible: (T, S) or (B, 1, 1, S) bool; positions: the
    key index of each query's own token, (T,) or (B, 1). The scores are recomputed here (SDPA does not
    return its normaliser): one extra q·kᵀ, only in blocks whose feed-forward asks for importance.
    """
    heads, hd = q.shape[1], q.shape[-1]
    keys = keys.float().repeat_interleave(heads // keys.shape[1], dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * hd**-0.5  # (B, h, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    own = scores.gather(-1, positions.view(-1, 1, positions.shape[-1], 1).expand(q.shape[0], heads, -1, 1))
    share = (own.squeeze(-1) - scores.logsumexp(-1)).exp().mean(1)  # (B, T)
    return share * visible.sum(-1).view(-1, share.shape[-1] if visible.dim() == 2 else 1)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnt scale (the blocks' norms, and Qwen3's per-head query/key norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention; ``cache_heads`` × ``head_dim`` is what its KV cache holds.

    One fused projection gives the queries (n_heads · head_dim), then the keys and the values
    (kv_heads · head_dim each)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.attention_head_dim
        self.rope_style = config.rope_style
        inner = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, inner, bias=config.attn_bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.attn_out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    @property
    def cache_heads(self) -> int:
        return self.kv_heads

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, importance: bool = False):
        """(B, T, d) → (B, T, d); with ``importance``, also each token's (B, T) :func:`self_attention_share`."""
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd)
        k = k.view(B, T, self.kv_heads, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.kv_heads, hd).transpose(1, 2)  # (B, h, T, hd)
        q, k = apply_rope(q, cos, sin, self.rope_style), apply_rope(k, cos, sin, self.rope_style)
        if importance:
            y, share = attend(q, k, v, cache, layer, importance=True)
            return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * hd)), share
        y = attend(q, k, v, cache, layer)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))
