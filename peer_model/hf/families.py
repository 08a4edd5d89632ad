"""Pretrained model families as data: a Hugging Face ``config.json`` → :class:`ModelConfig` fields, and a
weight-name map between our state dict and the family's (LitGPT's way: a family is a config and a name
map, not a model class of its own).

Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM and other ``LlamaForCausalLM`` models):
RMSNorm, RoPE in the rotate-half layout, grouped-query attention, SwiGLU, tied or untied embeddings;
Qwen2 adds query/key/value biases, Qwen3 a per-head RMSNorm of queries and keys. GPT-2: LayerNorm,
learned positions, biases everywhere, tanh-GELU, ``Conv1D`` weights stored (in, out).

Our attention holds the query, key and value projections as one matrix; the map concatenates the
family's three (``Source.keys``) and export splits it back at the same sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GPT2_TYPES = ("gpt2",)
SUPPORTED_TYPES = LLAMA_TYPES + GPT2_TYPES
DEFAULT_MAX_SEQ_LEN = 4096  # the context served unless asked for more: the KV cache grows with it


class UnsupportedModel(ValueError):
    """A config.json that names a family or an option this loader does not implement."""


@dataclass(frozen=True)
class Source:
    """How one of our tensors is stored in the family's checkpoint: the rows of ``keys`` concatenated
    (along dim 0, after transposing GPT-2's Conv1D weights when ``transposed``); ``sizes`` are each
    key's rows, so export can split it back."""

    keys: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    transposed: bool = False


def model_type(hf: dict) -> str:
    kind = hf.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedModel(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    return kind


def config_fields(hf: dict, max_seq_len: int | None = None) -> dict:
    """ModelConfig keyword arguments for a Hugging Face ``config.json`` (no expert layers yet)."""
    kind = model_type(hf)
    fields = _gpt2_fields(hf) if kind in GPT2_TYPES else _llama_fields(hf, kind)
    window = fields.pop("window")
    limit = min(fields["max_seq_len"], DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len)
    if max_seq_len is not None and max_seq_len > fields["max_seq_len"]:
        raise UnsupportedModel(f"max_seq_len {max_seq_len} exceeds the model's {fields['max_seq_len']} positions")
    # within a sliding window, windowed attention is full attention: serve at most the window
    fields["max_seq_len"] = min(limit, window) if window else limit
    return {**fields, "peer_layers": []}


def _llama_fields(hf: dict, kind: str) -> dict:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r}: the Llama family's SwiGLU needs 'silu'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel("partial rotary embeddings are not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
    return {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": None if head_dim * heads == hf["hidden_size"] else head_dim,
        "d_ff": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(theta), "rope_scaling": None if rope_type == "default" else {**rope, "rope_type": rope_type},
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "norm": "rmsnorm", "positions": "rope", "rope_style": "half",
        "attn_bias": bias or kind == "qwen2", "attn_out_bias": bias and kind != "qwen2", "qk_norm": kind == "qwen3",
        "mlp": "swiglu", "mlp_bias": bool(hf.get("mlp_bias", False)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "window": window,
    }


def _gpt2_fields(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
    if mlp is None:
        raise UnsupportedModel(f"GPT-2 activation_function {act!r} is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UnsupportedModel(f"GPT-2 option {flag} is not supported")
    if hf.get("scale_attn_weights") is False:
        raise UnsupportedModel("GPT-2 without attention scaling (scale_attn_weights false) is not supported")
    d = hf["n_embd"]
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["n_layer"], "n_heads": hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * d, "max_seq_len": hf["n_positions"],
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "norm": "layernorm", "positions": "learned",
        "attn_bias": True, "attn_out_bias": True, "mlp": mlp, "mlp_bias": True,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "window": None,
    }


def weight_map(config: ModelConfig, kind: str) -> dict[str, Source]:
    """Our state-dict key → its source in the family's checkpoint, for every dense (non-expert) tensor."""
    return _gpt2_map(config) if kind in GPT2_TYPES else _llama_map(config)


def _llama_map(config: ModelConfig) -> dict[str, Source]:
    hd = config.attention_head_dim
    qkv = (config.n_heads * hd, config.kv_heads * hd, config.kv_heads * hd)
    out = {"embed.weight": Source(("model.embed_tokens.weight",)), "norm.weight": Source(("model.norm.weight",))}
    if not config.tie_embeddings:
        out["lm_head.weight"] = Source(("lm_head.weight",))
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        attn = f"{theirs}.self_attn"
        out[f"{ours}.attn_norm.weight"] = Source((f"{theirs}.input_layernorm.weight",))
        out[f"{ours}.ffw_norm.weight"] = Source((f"{theirs}.post_attention_layernorm.weight",))
        out[f"{ours}.attn.qkv.weight"] = Source(tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), qkv)
        if config.attn_bias:
            out[f"{ours}.attn.qkv.bias"] = Source(tuple(f"{attn}.{p}_proj.bias" for p in "qkv"), qkv)
        out[f"{ours}.attn.out.weight"] = Source((f"{attn}.o_proj.weight",))
        if config.attn_out_bias:
            out[f"{ours}.attn.out.bias"] = Source((f"{attn}.o_proj.bias",))
        if config.qk_norm:
            out[f"{ours}.attn.q_norm.weight"] = Source((f"{attn}.q_norm.weight",))
            out[f"{ours}.attn.k_norm.weight"] = Source((f"{attn}.k_norm.weight",))
        if _has_dense_ffw(config, i):
            for ours_name, theirs_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                for p in ("weight", "bias") if config.mlp_bias else ("weight",):
                    out[f"{ours}.ffw.{ours_name}.{p}"] = Source((f"{theirs}.mlp.{theirs_name}.{p}",))
    return out


def _gpt2_map(config: ModelConfig) -> dict[str, Source]:
    out = {"embed.weight": Source(("transformer.wte.weight",)), "pos_embed.weight": Source(("transformer.wpe.weight",))}
    for p in ("weight", "bias"):
        out[f"norm.{p}"] = Source((f"transformer.ln_f.{p}",))
    if not config.tie_embeddings:
        out["lm_head.weight"] = Source(("lm_head.weight",))
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        pairs = [("attn_norm", "ln_1", False), ("ffw_norm", "ln_2", False), ("attn.qkv", "attn.c_attn", True),
                 ("attn.out", "attn.c_proj", True)]
        if _has_dense_ffw(config, i):
            pairs += [("ffw.up", "mlp.c_fc", True), ("ffw.down", "mlp.c_proj", True)]
        for ours_name, theirs_name, conv1d in pairs:
            out[f"{ours}.{ours_name}.weight"] = Source((f"{theirs}.{theirs_name}.weight",), transposed=conv1d)
            out[f"{ours}.{ours_name}.bias"] = Source((f"{theirs}.{theirs_name}.bias",))
    return out


def _has_dense_ffw(config: ModelConfig, block: int) -> bool:
    """A block keeps its dense feed-forward unless an expert layer replaced it."""
    return block not in config.peer_layers or config.peer_branch == "parallel"


def expert_prefix(kind: str, block: int) -> str:
    """Where export puts a block's expert layer in the family's naming (other tools ignore the keys)."""
    return f"transformer.h.{block}.peer" if kind in GPT2_TYPES else f"model.layers.{block}.mlp.peer"


def llama_config(config: ModelConfig, bos_id: int, eos_id: int) -> dict:
    """The Hugging Face ``config.json`` of a Llama-format model of this shape (e.g. one pre-trained here
    with rotate-half RoPE, RMSNorm and SwiGLU, to be exported with :func:`peer_model.hf.export.export_hf`)."""
    if (config.norm, config.positions, config.rope_style, config.mlp) != ("rmsnorm", "rope", "half", "swiglu"):
        raise UnsupportedModel("a Llama-format model needs norm rmsnorm, rope positions in the half style, swiglu")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.attention_head_dim, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "hidden_act": "silu", "attention_bias": config.attn_bias, "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
