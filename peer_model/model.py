"""Decoder-only transformer with PEER feed-forward blocks (RMSNorm, RoPE, SDPA attention, KV cache)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, rope_tables
from .baselines import FeedForward, make_attention, make_ffw
from .config import ModelConfig
from .peer import PEER
from .pool import ExpertGrid, Segment

__all__ = ["KVCache", "PEERTransformer", "RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, expert_block: bool, grid: ExpertGrid | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = make_attention(config)
        self.ffw_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffw = make_ffw(config, grid) if expert_block else FeedForward(config.d_model, config.d_ff)

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
        cos, sin = rope_tables(self.blocks[0].attn.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_dense_weights()

    def _init_dense_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:
            for linear in (getattr(block.attn, "qkv", None), getattr(block.ffw, "up", None)):
                if linear is not None:
                    nn.init.normal_(linear.weight, std=0.02)
            for linear in (getattr(block.attn, "out", None), getattr(block.ffw, "down", None)):
                if linear is not None:
                    nn.init.normal_(linear.weight, std=residual_std)

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses (load balancing, z-loss, ...) of the last forward, already
        weighted; None when no module has one. The training loop adds it to the language-model loss."""
        losses = [m.aux_loss for m in self.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
        return torch.stack(losses).sum() if losses else None

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
        attn = self.blocks[0].attn
        shape = (cfg.n_layers, batch, attn.cache_heads, max_len, attn.head_dim)
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
