"""Decoder-only transformer with PEER feed-forward blocks (RMSNorm, RoPE, SDPA attention, KV cache)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, RMSNorm, rope_tables
from .baselines import dense_mlp, make_attention, make_ffw
from .config import ModelConfig
from .head_loss import Head
from .parameterization import logit_scale, scale_init
from .peer import PEER
from .pool import ExpertGrid, Segment
from .tokenizer import ByteTokenizer

__all__ = ["KVCache", "PEERTransformer", "RMSNorm"]


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffw(norm(x)). In an expert block the feed-forward is
    the expert layer, or, with ``peer_branch="parallel"``, the dense feed-forward plus the expert layer
    beside it on the same normalised input (``expert_branch``)."""

    def __init__(self, config: ModelConfig, expert_block: bool, grid: ExpertGrid | None = None):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = make_attention(config)
        self.ffw_norm = make_norm(config)
        parallel = expert_block and config.peer_branch == "parallel"
        if expert_block and not parallel:
            self.ffw = make_ffw(config, grid)
        else:
            self.ffw = dense_mlp(config.d_model, config.d_ff, config.mlp, config.mlp_bias)
        self.expert_branch = make_ffw(config, grid) if parallel else None
        # DA-MoE expert layers allocate experts by each token's importance in this block's attention
        self.wants_importance = expert_block and getattr(self.expert_layer, "wants_importance", False)

    @property
    def expert_layer(self) -> nn.Module:
        return self.ffw if self.expert_branch is None else self.expert_branch

    def forward(self, x, cos, sin, cache=None, layer=0):
        if self.wants_importance:
            a, importance = self.attn(self.attn_norm(x), cos, sin, cache, layer, importance=True)
            x = x + a
            h = self.ffw_norm(x)
            if self.expert_branch is None:
                return x + self.ffw(h, importance=importance)
            return x + self.ffw(h) + self.expert_branch(h, importance=importance)
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        h = self.ffw_norm(x)
        if self.expert_branch is None:
            return x + self.ffw(h)
        return x + self.ffw(h) + self.expert_branch(h)


class PEERTransformer(nn.Module):
    """Decoder-only language model; ``grids`` restores grown pools (one per PEER layer, from a checkpoint).
    Byte-level by default; the options of :class:`ModelConfig` also describe pretrained families
    (see peer_model/hf), whose tokenizer the loader sets as ``tokenizer``."""

    def __init__(self, config: ModelConfig, grids: dict[int, ExpertGrid] | None = None):
        super().__init__()
        self.config = config
        grids = grids or {}
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(
            Block(config, i in config.peer_layers, grids.get(i)) for i in range(config.n_layers)
        )
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.init_buffers()
        self._init_dense_weights()
        scale_init(self, config)  # mssp: width-scaled draws; standard: nothing
        # text <-> ids for this model: bytes unless a loader sets the model's own (peer_model.hf)
        self.tokenizer = ByteTokenizer()
        self.restore_trainable()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute every non-persistent buffer: the RoPE tables, and each PEER layer's masks and counters.
        A checkpoint is loaded into a model built on the meta device (no memory, no random init) whose
        weights are then assigned; its buffers, never saved, are made here, on ``device``."""
        config, head_dim = self.config, self.blocks[0].attn.head_dim
        with torch.device(device or self.embed.weight.device):
            if config.positions == "rope":
                cos, sin = rope_tables(head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
            else:  # learned positions: a rotation by angle 0 leaves queries and keys as they are
                cos = torch.ones(config.max_seq_len, head_dim // 2)
                sin = torch.zeros_like(cos)
        self.rope_cos, self.rope_sin = cos, sin
        for layer in self.peer_layers().values():
            layer.init_buffers(device)

    def restore_trainable(self) -> None:
        """requires_grad as ``config.base_trains`` says: every parameter, or only the expert layers (plus
        the norms with "norms"); a retrofitted pretrained model keeps its base frozen this way."""
        experts = {id(p) for i, layer in self.expert_layers().items() for p in layer.parameters()}
        norms = {id(p) for m in self.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))
                 for p in m.parameters()}
        mode = self.config.base_trains
        for param in self.parameters():
            param.requires_grad_(mode == "all" or id(param) in experts or (mode == "norms" and id(param) in norms))

    def _init_dense_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for table in (self.embed, self.pos_embed, None if self.config.tie_embeddings else self.lm_head):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
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

    def expert_layers(self) -> dict[int, nn.Module]:
        """The expert feed-forward (PEER or a baseline) of every block in ``config.peer_layers``."""
        return {i: self.blocks[i].expert_layer for i in self.config.peer_layers}

    def peer_layers(self) -> dict[int, PEER]:
        return {i: layer for i, layer in self.expert_layers().items() if isinstance(layer, PEER)}

    def grow(self, num_experts: int, tag: str = "", generator: torch.Generator | None = None) -> dict[int, Segment]:
        """Append ``num_experts`` (rounded up to the grid) to every PEER layer, drawn by ``generator``; see
        :meth:`PEER.grow`. Optimizers hold the old parameter objects: build new ones after growing."""
        return {i: layer.grow(num_experts, tag=tag, generator=generator) for i, layer in self.peer_layers().items()}

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
        return self._logits(self.hidden(tokens, cache))

    def last_logits(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens: (B, T) → the logits of the last position (B, vocab), what decoding needs: the output layer
        runs on that position alone (a prompt's prefill would otherwise spend T × vocab × d on it)."""
        return self._logits(self.hidden(tokens, cache)[:, -1])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        scale = logit_scale(self.config)
        return logits if scale == 1.0 else logits * scale

    def head(self, tokens: torch.Tensor, chunk_tokens: int = 0) -> Head:
        """tokens: (B, T) → their final hidden states with the output layer (peer_model/head_loss.py): what the
        training losses take, so that they compute the logits ``chunk_tokens`` tokens at a time (0: all at once)."""
        return Head(self.hidden(tokens), self.lm_head.weight, logit_scale(self.config), chunk_tokens)

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens: (B, T) → the final hidden states (B, T, d), after the final norm, before the output layer."""
        B, T = tokens.shape
        if cache is not None and cache.lengths is not None:
            if T != 1 or cache.lengths.shape != (B,):
                raise ValueError(f"a ragged cache takes one token per row: tokens (B, 1) with B = "
                                 f"{cache.lengths.numel()}, got {tuple(tokens.shape)}")
            span = cache.span or int(cache.lengths.max()) + 1
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
        if self.pos_embed is not None:
            if cache is not None and cache.lengths is not None:
                x = x + self.pos_embed(cache.lengths).unsqueeze(1)
            else:
                start = cache.length if cache is not None else 0
                x = x + self.pos_embed(torch.arange(start, start + T, device=tokens.device))
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)
        if cache is not None:
            if cache.lengths is not None:
                cache.lengths += 1
            else:
                cache.length += T
        return self.norm(x)
