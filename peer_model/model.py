"""Decoder-only transformer with PEER feed-forward blocks (RMSNorm, RoPE, SDPA attention, KV cache)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .peer import PEER
from .pool import ExpertGrid, Segment


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif cache.lengths is not None:  # ragged: one token per row at position lengths[b]
            rows = torch.arange(B, device=x.device)
            keys, values = cache.keys[layer], cache.values[layer]  # (B, h, max_len, hd)
            keys[rows, :, cache.lengths] = k[:, :, 0]
            values[rows, :, cache.lengths] = v[:, :, 0]
            span = cache.visible.shape[-1]
            y = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=cache.visible)
        else:
            start = cache.length
            cache.keys[layer, :, :, start : start + T] = k
            cache.values[layer, :, :, start : start + T] = v
            k_all = cache.keys[layer, :, :, : start + T]
            v_all = cache.values[layer, :, :, : start + T]
            # query t (absolute position start + t) sees keys 0 .. start + t; one new token sees all
            mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """Dense GELU MLP, used in the blocks that are not PEER blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, use_peer: bool, grid: ExpertGrid | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffw_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffw = PEER(config.d_model, config.peer, grid) if use_peer else FeedForward(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.ffw(self.ffw_norm(x))


class PEERTransformer(nn.Module):
    """Byte-level language model; ``grids`` restores grown pools (one per PEER layer, from a checkpoint)."""

    def __init__(self, config: ModelConfig, grids: dict[int, ExpertGrid] | None = None):
        super().__init__()
        self.config = config
        grids = grids or {}
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config, i in config.peer_layers, grids.get(i)) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        cos, sin = rope_tables(config.d_model // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_dense_weights()

    def _init_dense_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:
            for linear in (block.attn.qkv, getattr(block.ffw, "up", None)):
                if linear is not None:
                    nn.init.normal_(linear.weight, std=0.02)
            for linear in (block.attn.out, getattr(block.ffw, "down", None)):
                if linear is not None:
                    nn.init.normal_(linear.weight, std=residual_std)

    def peer_layers(self) -> dict[int, PEER]:
        return {i: b.ffw for i, b in enumerate(self.blocks) if isinstance(b.ffw, PEER)}

    def grow(self, num_experts: int, tag: str = "") -> dict[int, Segment]:
        """Append ``num_experts`` (rounded up to the grid) to every PEER layer; see :meth:`PEER.grow`.
        Optimizers hold the old parameter objects: build new ones after growing."""
        return {i: layer.grow(num_experts, tag=tag) for i, layer in self.peer_layers().items()}

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"cache length must be in 1..{cfg.max_seq_len}, got {max_len}")
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        weight = self.embed.weight
        return KVCache(weight.new_zeros(shape), weight.new_zeros(shape))

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens: (B, T) → logits (B, T, vocab). With a cache, tokens continue what it holds."""
        B, T = tokens.shape
        if cache is not None and cache.lengths is not None:
            if T != 1 or cache.lengths.shape != (B,):
                raise ValueError(f"a ragged cache takes one token per row: tokens (B, 1) with B = "
                                 f"{cache.lengths.numel()}, got {tuple(tokens.shape)}")
            span = int(cache.lengths.max()) + 1
            if span > self.config.max_seq_len:
                raise ValueError(f"a row would exceed max_seq_len {self.config.max_seq_len}")
            positions = torch.arange(span, device=tokens.device)
            cache.visible = (positions <= cache.lengths.unsqueeze(1)).view(B, 1, 1, span)
            cos = self.rope_cos[cache.lengths].view(B, 1, 1, -1)
            sin = self.rope_sin[cache.lengths].view(B, 1, 1, -1)
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)
        if cache is not None:
            if cache.lengths is not None:
                cache.lengths += 1
            else:
                cache.length += T
        return self.lm_head(self.norm(x))
