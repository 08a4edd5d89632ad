"""Tiny GGUF files for tests, written as llama.cpp's converter writes them, with the ``gguf`` package.

:func:`write_gguf` takes a random ``transformers`` model (Llama, Qwen2 or Qwen3 shape) and the byte-level
BPE of :mod:`tests.hf_fixtures`, and writes its tensors under llama.cpp's names (a Llama's query and key
rows permuted as llama.cpp permutes them) in a chosen storage type, with the tokenizer's vocabulary,
merges, special ids and chat template as metadata. K-quant types cannot be quantised by the ``gguf``
package, so those tensors are random blocks (with small, finite scales): both loaders dequantise the same
bytes, which is what a comparison of the two needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from hf_fixtures import CHATML_TEMPLATE, _trained_json

# K-quant block layouts (bytes per 256 values): where the fp16 scales sit in each block
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def tiny_model(arch: str, vocab: int, seed: int = 0, tie: bool = True):
    """A random ``transformers`` model of ``arch`` (llama, qwen2, qwen3) whose rows fit K-quant blocks."""
    import transformers

    shape = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=tie)
    if arch == "qwen3":
        shape["head_dim"] = 128  # transformers reads no key_length for qwen3 and takes its default, 128
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config}[arch](**shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
    return model


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py) of a Llama query or key projection."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_k_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    size, scales = K_BLOCKS[kind]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for offset in scales:
        scale = rng.uniform(1e-5, 2e-4, (rows, cols // 256)).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path: str | Path, arch: str = "llama", qtype: str = "F32", *, add_bos: bool = False,
               tie: bool = True, pre: str = "gpt2", seed: int = 0):
    """Write a tiny model of ``arch`` with its 2-D weights stored as ``qtype`` to ``path``; returns the
    ``transformers`` model it was made from (whose weights the K-quant types do not keep)."""
    import gguf

    backend = json.loads(_trained_json())
    tokenizer = Tokenizer.from_str(_trained_json())
    vocab = tokenizer.get_vocab_size()
    tokens = [tokenizer.id_to_token(i) for i in range(vocab)]
    special = {t["id"] for t in backend["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    model = tiny_model(arch, vocab, seed, tie)
    config = model.config
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(vocab)])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.token_to_id("<|im_start|>"))
    writer.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.token_to_id("<|endoftext|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHATML_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    names.update({f"model.layers.{i}.{hf}.{p}": f"blk.{i}.{ours}.{p}" for i in range(config.num_hidden_layers)
                  for ours, hf in GGUF_BLOCK.items() for p in ("weight", "bias")})
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tie:
            continue
        data = tensor.float().numpy()
        target = names[name]
        if arch == "llama" and target.split(".")[-2] in ("attn_q", "attn_k"):
            data = permute(data, config.num_attention_heads if ".attn_q." in target else config.num_key_value_heads)
        if data.ndim == 1 or qtype == "F32":
            writer.add_tensor(target, np.ascontiguousarray(data))
        elif qtype == "F16":
            writer.add_tensor(target, data.astype(np.float16))
        elif qtype in K_BLOCKS:
            writer.add_tensor(target, random_k_blocks(qtype, *data.shape, rng),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
