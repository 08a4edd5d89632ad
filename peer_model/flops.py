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
        per_token = {"moe": moe.top_k, "switch": 1, "expert_choice": moe.capacity_factor}[kind]
        params = d * moe.num_experts + per_token * 2 * d * hidden
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
    query = peer.heads * peer.d_key * d
    keys = peer.heads * (rows + cols) * peer.d_key // 2
    experts = peer.heads * peer.top_k * 2 * d  # u_i·x and the scaled v_i
    return 2 * (query + keys + experts) + peer.heads * peer.top_k**2, query + experts + (rows + cols) * peer.d_key // 2


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
            parts["expert_ffw"] += flops
            params += p
        if layer not in config.peer_layers or config.peer_branch == "parallel":
            p = (3 if config.mlp == "swiglu" else 2) * d * config.d_ff
            parts["ffw"] += 2 * p
            params += p
    parts["lm_head"] = 2 * d * config.vocab_size
    params += d * config.vocab_size
    return FlopCount(sum(parts.values()), int(params), parts)
