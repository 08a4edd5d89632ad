"""FLOPs per token of a model configuration, counting only what is computed.

A multiply-add is 2 FLOPs. Counted: every projection, the attention scores and their weighted sum (a
causal window of ``seq_len`` tokens attends on average to (seq_len + 1) / 2 positions), the active
experts only (k of E for top-k MoE, one for Switch, ``capacity_factor`` experts per token on average for
expert choice, h·k single-neuron experts for PEER), product-key retrieval (the query, both sub-key
halves, the k² candidate sums) and the output projection. Not counted: norms, activations, softmaxes,
top-k selections, embedding lookups (a few FLOPs per element, small next to d² matmuls). Grouped-query
attention, SwiGLU dense blocks and an expert layer beside a block's dense feed-forward (a retrofit's
parallel branch) are counted as they compute. Training =
3 × forward (the backward costs about twice the forward), as in Kaplan et al. 2020 and the PEER paper.

MH-MoE token splitting adds its split and merge projections (2 · d² multiply-adds); its sub-tokens'
experts and routers act on d / h inputs. DA-MoE's dynamic k makes the count an *average*: the configured
``top_k`` is the mean number of experts per token (the search still ranks ``max_k``), plus the extra
q·kᵀ scores of the block's attention that its token importance needs. A dynamic-k PEER layer runs
``max_k`` slots with zero gates in its fixed-width kernels; the count is what a variable-width kernel
computes (see peer.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig


@dataclass(frozen=True)
class FlopCount:
    forward_per_token: float
    active_params: int  # parameters a token's forward multiplies by (embeddings excluded, lm_head included)
    breakdown: dict[str, float] = field(default_factory=dict)  # forward FLOPs per token by part

    @property
    def train_per_token(self) -> float:
        return 3 * self.forward_per_token


def _attention(config: ModelConfig, context: float) -> tuple[float, int]:
    d = config.d_model
    if config.attention == "switchhead":
        sh = config.switchhead
        inner = sh.n_heads * (sh.head_dim or d // sh.n_heads)
        k = sh.top_k if sh.num_experts > 1 else 1
        selection = 2 * d * sh.num_experts * sh.n_heads if sh.num_experts > 1 else 0  # V side and O side
        params = 2 * d * inner + 2 * k * d * inner + selection  # Q, K; k V experts and k O experts per head
        return 2 * params + 4 * context * inner, params
    inner, kv = config.n_heads * config.attention_head_dim, config.kv_heads * config.attention_head_dim
    params = d * (inner + 2 * kv) + inner * d  # qkv (grouped-query: fewer key/value heads) + out
    return 2 * params + 4 * context * inner, params


def _expert_ffw(config: ModelConfig, grid_sides: tuple[int, int] | None) -> tuple[float, int]:
    d, d_ff, kind = config.d_model, config.d_ff, config.ffw
    if kind == "dense":
        params = 2 * d * d_ff
        return 2 * params, params
    if kind == "swiglu":
        params = 3 * d * d_ff
        return 2 * params, params
    if kind in ("moe", "switch", "expert_choice"):
        moe = config.moe
        hidden = moe.d_expert or d_ff
        per_token = {"moe": moe.top_k, "switch": 1, "expert_choice": moe.capacity_factor}[kind]  # the mean
        # h sub-tokens of d / h: h routers of (d / h) · E and h · k experts of 2 · (d / h) · hidden
        params = d * moe.num_experts + per_token * 2 * d * hidden
        if moe.sub_tokens > 1:
            params += 2 * d * d  # split and merge
        return 2 * params, round(params)
    if kind == "pkm":
        pkm = config.pkm
        side = round(pkm.num_memories ** 0.5)
        query = pkm.heads * pkm.d_key * d
        keys = pkm.heads * side * pkm.d_key  # both halves: 2 · side · d_key / 2 multiply-adds
        values = pkm.heads * pkm.top_k * d
        return 2 * (query + keys + values) + pkm.heads * pkm.top_k**2, query + values + 2 * side * pkm.d_key // 2
    peer = config.peer
    rows, cols = grid_sides or (peer.sub_keys, peer.sub_keys)
    d_expert = d // peer.heads if peer.head_slices else d  # head_slices: each head reads a d / h sub-token
    query = peer.heads * peer.d_key * d_expert
    keys = peer.heads * (rows + cols) * peer.d_key // 2
    experts = peer.heads * peer.top_k * 2 * d_expert  # u_i·x and the scaled v_i (top_k: the mean with dynamic_k)
    projections = 2 * d * d if peer.head_slices else 0  # split and merge
    candidates = peer.heads * peer.retrieved_k**2  # the k² sums of the search, at the k it ranks
    active = query + experts + projections
    return 2 * (active + keys) + candidates, active + (rows + cols) * peer.d_key // 2


def _importance(config: ModelConfig, seq_len: int) -> float:
    """DA-MoE's token importance: one more q·kᵀ (self_attention_share), over the whole window: the
    masked half is computed too."""
    if not ((config.ffw == "peer" and config.peer.dynamic_k) or (config.ffw == "moe" and config.moe.dynamic_k)):
        return 0.0
    heads = config.switchhead.n_heads if config.attention == "switchhead" else config.n_heads
    head_dim = (config.switchhead.head_dim or config.d_model // heads if config.attention == "switchhead"
                else config.attention_head_dim)
    return 2 * seq_len * heads * head_dim


def count_flops(config: ModelConfig, seq_len: int | None = None,
                grid_sides: dict[int, tuple[int, int]] | None = None) -> FlopCount:
    """Forward FLOPs per token for training windows of ``seq_len`` (default ``max_seq_len``) tokens.
    ``grid_sides``: per PEER layer, the (rows, cols) of a grown grid (default: the initial square)."""
    seq_len = seq_len or config.max_seq_len
    context = (seq_len + 1) / 2
    d = config.d_model
    parts: dict[str, float] = {"attention": 0.0, "ffw": 0.0, "expert_ffw": 0.0}
    params = 0
    for layer in range(config.n_layers):
        flops, p = _attention(config, context)
        parts["attention"] += flops
        params += p
        if layer in config.peer_layers:
            flops, p = _expert_ffw(config, (grid_sides or {}).get(layer))
            parts["expert_ffw"] += flops + _importance(config, seq_len)
            params += p
        if layer not in config.peer_layers or config.peer_branch == "parallel":
            p = (3 if config.mlp == "swiglu" else 2) * d * config.d_ff
            parts["ffw"] += 2 * p
            params += p
    parts["lm_head"] = 2 * d * config.vocab_size
    params += d * config.vocab_size
    return FlopCount(sum(parts.values()), int(params), parts)
