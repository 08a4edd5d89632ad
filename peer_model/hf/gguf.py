"""GGUF files (llama.cpp's format) as pretrained bases: read with the ``gguf`` package, llama.cpp's own
reader, then given to :func:`peer_model.hf.load.load_hf` as a Hugging Face model would be.

* metadata → a Hugging Face ``config.json`` (``llama``, ``qwen2`` and ``qwen3`` architectures; Mistral
  files say ``llama``);
* tensors → fp32 under the Hugging Face names, dequantised by ``gguf.quants`` (F32, F16, BF16, Q4_0,
  Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K and the other types it knows). llama.cpp's converter permutes the
  rows of a Llama's query and key projections (its RoPE pairs neighbouring rows, Hugging Face's the two
  halves of a head); :func:`unpermute` undoes it. Qwen files are stored unpermuted;
* the tokenizer → a byte-level BPE (``tokenizer.ggml.model`` "gpt2": SmolLM, Llama 3, Qwen) rebuilt with
  ``tokenizers`` from the vocabulary and merges the file carries, split as llama.cpp splits for the
  file's ``tokenizer.ggml.pre``; control tokens are special, user-defined ones whole; BOS/EOS/PAD ids,
  ``add_bos_token`` and the chat template from the metadata.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .families import UnsupportedModel

SUFFIX = ".gguf"
ARCHITECTURES = ("llama", "qwen2", "qwen3")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name → (regexes applied in turn, ignore_merges: a word that is a token is taken whole)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((_GPT2_SPLIT,), False), "gpt-2": ((_GPT2_SPLIT,), False), "gpt2": ((_GPT2_SPLIT,), False),
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True), "llama3": ((_LLAMA3_SPLIT,), True), "llama-v3": ((_LLAMA3_SPLIT,), True),
    "smaug-bpe": ((_LLAMA3_SPLIT,), True),
    "qwen2": ((_QWEN2_SPLIT,), False), "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False),
}


def find_gguf(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one ``.gguf`` file of a directory; None when
    ``path`` is neither. UnsupportedModel for a directory with several (the caller must pick one)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(files) > 1:
        raise UnsupportedModel(f"{path} holds several GGUF files ({', '.join(p.name for p in files)}): name one")
    return files[0] if files else None


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of a query or key projection (its rows, or its bias): within each
    head, Hugging Face row j·(rows/2) + i (j < 2) was stored at row 2i + j."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFModel:
    """One GGUF file: its Hugging Face config, tensors by Hugging Face name, and tokenizer."""

    def __init__(self, path: str | os.PathLike[str]):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except (OSError, ValueError, KeyError) as exc:
            raise UnsupportedModel(f"{self.path}: not a readable GGUF file: {exc}") from None
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UnsupportedModel(f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in self.tensors:
            raise UnsupportedModel(f"{self.path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are "
                                   "not supported")

    _MISSING = object()

    def field(self, key: str, default=_MISSING):
        field = self.reader.fields.get(key)
        if field is None:
            if default is GGUFModel._MISSING:
                raise UnsupportedModel(f"{self.path}: no {key!r} in the GGUF metadata")
            return default
        return field.contents()

    def arch_field(self, key: str, default=_MISSING):
        return self.field(f"{self.arch}.{key}", default)

    @cached_property
    def hf_config(self) -> dict:
        """The ``config.json`` of the Hugging Face model this file was converted from (as far as the
        metadata says: what :func:`peer_model.hf.families.config_fields` reads)."""
        heads = int(self.arch_field("attention.head_count"))
        kv_heads = self.arch_field("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise UnsupportedModel(f"{self.path}: a different number of KV heads per block is not supported")
        d = int(self.arch_field("embedding_length"))
        head_dim = int(self.arch_field("attention.key_length", d // heads))
        if int(self.arch_field("rope.dimension_count", head_dim)) != head_dim:
            raise UnsupportedModel(f"{self.path}: partial rotary embeddings are not supported")
        config = {
            "model_type": self.arch, "hidden_size": d, "num_hidden_layers": int(self.arch_field("block_count")),
            "intermediate_size": int(self.arch_field("feed_forward_length")),
            "num_attention_heads": heads, "num_key_value_heads": int(kv_heads), "head_dim": head_dim,
            "max_position_embeddings": int(self.arch_field("context_length")),
            "rms_norm_eps": float(self.arch_field("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.arch_field("rope.freq_base", 10000.0)), "hidden_act": "silu",
            "vocab_size": int(self.arch_field("vocab_size", self.tensors["token_embd.weight"].shape[-1])),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
        }
        scaling = self.arch_field("rope.scaling.type", "none")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(self.arch_field("rope.scaling.factor"))}
        elif scaling != "none":
            raise UnsupportedModel(f"{self.path}: RoPE scaling {scaling!r} is not supported")
        return config

    def hf_names(self) -> dict[str, str]:
        """Hugging Face tensor name → GGUF tensor name, for every tensor of the file."""
        names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
        block = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        out = {}
        for name in self.tensors:
            if name in names:
                out[names[name]] = name
                continue
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in block:
                out[f"model.layers.{parts[1]}.{block[parts[2]]}.{parts[3]}"] = name
            else:
                raise UnsupportedModel(f"{self.path}: tensor {name!r} has no place in a {self.arch} model")
        return out

    def read(self, gguf_name: str) -> torch.Tensor:
        """A tensor dequantised to fp32, in the Hugging Face layout."""
        from gguf import quants

        tensor = self.tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dim first
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModel(f"{self.path}: {gguf_name} is stored as {tensor.tensor_type.name}, which the "
                                   "gguf package cannot dequantise") from None
        weight = torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(shape))  # a copy if mapped
        if self.arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            config = self.hf_config
            heads = config["num_attention_heads" if ".attn_q." in gguf_name else "num_key_value_heads"]
            weight = unpermute(weight, heads)
        return weight

    def tokenizer(self):
        """The file's tokenizer as an :class:`~peer_model.hf.tokenizer.HFTokenizer`."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        from .tokenizer import HFTokenizer

        kind = self.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModel(f"{self.path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level "
                                   "BPE, 'gpt2')")
        pre = self.field("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModel(f"{self.path}: pre-tokenizer {pre!r} is not supported "
                                   f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        splits, ignore_merges = PRE_TOKENIZERS[pre]
        tokens = self.field("tokenizer.ggml.tokens")
        types = self.field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges")]
        model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t, kind in zip(tokens, types) if kind == CONTROL])
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                              for t, kind in zip(tokens, types) if kind == USER_DEFINED])

        def token_id(key: str) -> int | None:
            value = self.field(f"tokenizer.ggml.{key}", None)
            return None if value is None else int(value)

        eos = [i for i in (token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id"))
               if i is not None]
        bos = token_id("bos_token_id")
        special = {name: tokens[i] for name, i in (("bos_token", bos), ("eos_token", eos[0] if eos else None),
                                                   ("unk_token", token_id("unknown_token_id")),
                                                   ("pad_token", token_id("padding_token_id"))) if i is not None}
        config = {**special, "add_bos_token": bool(self.field("tokenizer.ggml.add_bos_token", False))}
        try:
            return HFTokenizer(tokenizer, bos_id=eos[0] if bos is None else bos, eos_ids=eos,
                               pad_id=token_id("padding_token_id"), add_bos=config["add_bos_token"],
                               chat_template=self.field("tokenizer.chat_template", None), tokenizer_config=config)
        except ValueError as exc:
            raise UnsupportedModel(f"{self.path}: {exc}") from None
