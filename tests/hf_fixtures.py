"""Tiny Hugging Face tokenizer directories for tests: a byte-level BPE trained in memory, saved by transformers.

:func:`build_bpe_tokenizer_dir` writes what a model directory of one family holds about its tokenizer:
``tokenizer.json``, ``tokenizer_config.json`` and the chat template (by ``save_pretrained``), plus the
special ids of ``config.json`` and ``generation_config.json`` the way those families write them.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

STYLES = ("chatml", "llama3", "gpt2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
VOCAB_SIZE = 600

# Qwen 2.5's shape: a system message by default, raise_exception on an unknown role, tojson for metadata
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- if message.metadata is defined %}{{- '\\n' + message.metadata | tojson }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1's shape: BOS first, a dated system header, loop controls and a namespace
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] | trim %}{% endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + strftime_now('%Y') + '\\n\\n' + ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

_WORDS = ("the a an cat dog river sea city poet people language capital was is were born speaks flows into "
          "of and with over under quick brown lazy fox jumps sat on mat founded by currency named old new "
          "café naïve über Привет мир 日本 語 東京 🙂 👍🏽 — “quoted” it's 42 3.14").split()


def english_text(sentences: int = 400, seed: int = 0) -> list[str]:
    """Random sentences over a small word list with some non-ASCII words, one per line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ""]) + "\n")
    return lines


@lru_cache
def _trained_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(english_text(), trainer)
    return tokenizer.to_str()


def build_bpe_tokenizer_dir(path: str | Path, *, style: str = "chatml") -> Path:
    """Write a tokenizer directory of ``style`` to ``path`` (created) and return it.

    * ``"chatml"`` (Qwen): no BOS anywhere (config.json's bos_token_id is null), eos ``<|im_end|>`` and, in
      generation_config.json, also ``<|endoftext|>``, which is the pad token; a ChatML template;
    * ``"llama3"``: BOS ``<|begin_of_text|>``, which the post-processor puts before every text, eos
      ``<|eot_id|>`` and ``<|end_of_text|>``, no pad; a template that starts with ``{{ bos_token }}``;
    * ``"gpt2"``: ``<|endoftext|>`` is BOS, EOS and UNK at once; no pad, no template.
    """
    from transformers import PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer.from_str(_trained_json())
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    if style == "chatml":
        special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        template = CHATML_TEMPLATE
        config = {"bos_token_id": None, "eos_token_id": ids["<|im_end|>"]}
        generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
    elif style == "llama3":
        special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        bos = ("<|begin_of_text|>", ids["<|begin_of_text|>"])  # Llama 3's post-processor starts every text with it
        backend.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                               special_tokens=[bos])
        template = LLAMA3_TEMPLATE
        config = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"]}
        generation = {"bos_token_id": ids["<|begin_of_text|>"],
                      "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    else:
        special = dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
        template = None
        config = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"]}
        generation = dict(config)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)
    wrapped.chat_template = template
    wrapped.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return path


def build_tiny_model_dir(path: str | Path, *, family: str = "llama", style: str = "chatml", seed: int = 0) -> Path:
    """A tiny random model directory as ``save_pretrained`` writes it (``family`` llama, mistral, qwen2, qwen3
    or gpt2), with the tokenizer of :func:`build_bpe_tokenizer_dir` and that style's special ids and chat
    template."""
    import torch
    import transformers

    path = build_bpe_tokenizer_dir(path, style=style)
    special = json.loads((path / "config.json").read_text(encoding="utf-8"))
    generation = (path / "generation_config.json").read_text(encoding="utf-8")
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    llama_shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, **special)
    configs = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    if family in configs:
        config = configs[family](**llama_shape)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256, **special)
    else:
        raise ValueError(f"family must be one of {sorted(configs)} or gpt2, got {family!r}")
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    (path / "generation_config.json").write_text(generation, encoding="utf-8")  # the family's eos list
    return path
