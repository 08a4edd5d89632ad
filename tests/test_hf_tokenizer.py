"""HFTokenizer against transformers' own tokenizer, and the library running on a model's HF tokenizer."""
import copy
import json
import math
import random
import shutil

import pytest
import torch
from torch import nn

from fake_lm import FakeLM
from hf_fixtures import build_bpe_tokenizer_dir
from peer_model.batching import BatchDecoder
from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.cli import main
from peer_model.config import ModelConfig, PEERConfig
from peer_model.continual import sample_replay
from peer_model.facts import facts_text, facts_tokens, make_facts
from peer_model.generate import SamplingParams, generate, generate_text, make_generator, sample_next
from peer_model.hf.tokenizer import HFTokenizer
from peer_model.model import KVCache, PEERTransformer
from peer_model.tokenizer import ByteTokenizer, load_tokenizer
from peer_model.train import TokenData, evaluate_bpb

transformers = pytest.importorskip("transformers")

STYLES = ("chatml", "llama3", "gpt2")
TEXTS = [
    "",
    "Hello, world!",
    "The cat sat on the mat.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "café naïve über — “quoted”",
    "日本語のテキスト 東京",
    "emoji 🙂👍🏽 and flags 🇩🇪",
    "e\u0301 combining, Z\u0335\u0321",
    "special text <|im_end|> inside <|endoftext|>",
    "\x00nul and \U0010ffff",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {style: build_bpe_tokenizer_dir(tmp_path_factory.mktemp(style), style=style) for style in STYLES}


@pytest.fixture(scope="module")
def ours(dirs):
    return {style: HFTokenizer.from_dir(path) for style, path in dirs.items()}


@pytest.fixture(scope="module")
def theirs(dirs):
    return {style: transformers.AutoTokenizer.from_pretrained(str(path)) for style, path in dirs.items()}


def random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


# ---- encode / decode / streaming ---------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_encode_and_decode_match_transformers(ours, theirs, style):
    hf, reference = ours[style], theirs[style]
    assert hf.kind == "hf" and hf.vocab_size == len(reference)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert hf.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    rng = random.Random(0)
    for _ in range(50):
        ids = random_ids(rng, hf.vocab_size, rng.randint(0, 30))
        assert hf.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    # ids it does not know (a padded embedding, a bad tensor) are skipped, never raised on
    assert hf.decode([-1, *hf.encode("ok"), hf.vocab_size, 2**40]) == "ok"
    assert hf.decode(torch.tensor(hf.encode("tensor ids"))) == "tensor ids"


def streamed(hf: HFTokenizer, ids: list[int]) -> list[str]:
    decoder = hf.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("style", ["chatml", "gpt2"])
def test_streaming_decode_concatenates_to_the_full_decode(ours, style):
    hf = ours[style]
    rng = random.Random(1)
    for n in range(300):
        ids = random_ids(rng, hf.vocab_size, rng.randint(0, 40))
        full, pieces = hf.decode(ids), streamed(hf, ids)
        assert "".join(pieces) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in piece for piece in pieces)
    for text in TEXTS:
        pieces = streamed(hf, hf.encode(text))
        assert "".join(pieces) == text.replace("<|im_end|>", "").replace("<|endoftext|>", "")
        assert not any("\ufffd" in piece for piece in pieces)  # no half character is ever shown
    # a character split over tokens is held until complete, then released at once
    emoji = hf.encode("🦜")  # not in the training text: split over several byte tokens
    assert len(emoji) > 1 and streamed(hf, emoji) == [""] * (len(emoji) - 1) + ["🦜", ""]
    decoder = hf.stream_decoder()
    decoder.push(emoji[0])
    assert decoder.flush() == "\ufffd" and decoder.push(hf.encode("a")[0]) == "a"  # flush resets


# ---- special ids -------------------------------------------------------------------------------


def test_special_ids_of_each_family(ours, theirs):
    gpt2, llama3, chatml = ours["gpt2"], ours["llama3"], ours["chatml"]
    endoftext = gpt2.encode("<|endoftext|>")[0]
    # every family's rule for a BOS before a text is the one transformers applies
    for style, hf in ours.items():
        bos_first = theirs[style]("x", add_special_tokens=True)["input_ids"][0] == theirs[style].bos_token_id
        assert hf.add_bos == bos_first == (style == "llama3")
    # GPT-2: one token is BOS and EOS at once, so it may be sampled (it ends the completion)
    assert gpt2.bos_id == endoftext and gpt2.eos_ids == {endoftext}
    assert gpt2.pad_id is None and gpt2.never_sampled == frozenset()
    # Llama 3: a BOS of its own, never sampled; every eos of config.json, generation_config.json, tokenizer_config
    assert llama3.bos_id == llama3.encode("<|begin_of_text|>")[0] == theirs["llama3"].bos_token_id
    assert llama3.eos_ids == {llama3.encode(t)[0] for t in ("<|end_of_text|>", "<|eot_id|>")}
    assert llama3.never_sampled == {llama3.bos_id}
    # Qwen: no BOS (null in config.json; the first eos where one is needed); the pad token is also an eos
    im_end = chatml.encode("<|im_end|>")[0]
    assert chatml.bos_id == im_end and chatml.eos_ids == {im_end, endoftext}
    assert chatml.pad_id == endoftext == theirs["chatml"].pad_token_id and chatml.never_sampled == frozenset()
    for style, hf in ours.items():
        assert not hf.never_sampled & hf.eos_ids
        assert theirs[style].eos_token_id in hf.eos_ids


def test_a_pad_that_is_not_an_eos_is_never_sampled(dirs, tmp_path):
    path = shutil.copytree(dirs["llama3"], tmp_path / "padded")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|im_start|>"}))
    hf = HFTokenizer.from_dir(path)
    assert hf.never_sampled == {hf.bos_id, hf.encode("<|im_start|>")[0]}


def edited(source, target, files=None):
    """A copy of directory ``source`` with ``files`` ({name: JSON object, or None to delete}) replaced."""
    path = shutil.copytree(source, target)
    for name, content in (files or {}).items():
        if content is None:
            (path / name).unlink()
        else:
            (path / name).write_text(json.dumps(content))
    return path


def test_unusable_directories_raise_clear_errors(dirs, tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    gpt2 = dirs["gpt2"]
    no_eos = edited(gpt2, tmp_path / "no_eos", {"config.json": {}, "generation_config.json": None,
                                                 "tokenizer_config.json": {"bos_token": "<|endoftext|>"}})
    with pytest.raises(ValueError, match="no eos"):
        HFTokenizer.from_dir(no_eos)
    unknown = edited(gpt2, tmp_path / "unknown", {"tokenizer_config.json": {"eos_token": "</s>"}})
    with pytest.raises(ValueError, match="'</s>' is not in tokenizer.json"):
        HFTokenizer.from_dir(unknown)
    bad_id = edited(gpt2, tmp_path / "bad_id", {"config.json": {"eos_token_id": "0"}})
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        HFTokenizer.from_dir(bad_id)
    out_of_range = edited(gpt2, tmp_path / "out_of_range", {"generation_config.json": {"eos_token_id": [10**6]}})
    with pytest.raises(ValueError, match="eos id 1000000"):
        HFTokenizer.from_dir(out_of_range)
    broken = edited(gpt2, tmp_path / "broken")
    (broken / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: unreadable"):
        HFTokenizer.from_dir(broken)
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        HFTokenizer.from_dir(broken)


def test_load_tokenizer_and_save_round_trip(dirs, ours, tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # no tokenizer.json: bytes
    for style, hf in ours.items():
        assert isinstance(load_tokenizer(dirs[style]), HFTokenizer)
        saved = tmp_path / style
        saved.mkdir()
        hf.save(saved)
        again = load_tokenizer(saved)
        assert (again.bos_id, again.eos_ids, again.pad_id, again.never_sampled, again.vocab_size) == \
            (hf.bos_id, hf.eos_ids, hf.pad_id, hf.never_sampled, hf.vocab_size)
        assert again.chat_template == hf.chat_template
        assert all(again.encode(text) == hf.encode(text) for text in TEXTS)
        # what it writes is a Hugging Face tokenizer directory to transformers too
        reference = transformers.AutoTokenizer.from_pretrained(str(saved))
        assert reference.encode(TEXTS[5], add_special_tokens=False) == hf.encode(TEXTS[5])


# ---- chat templates ----------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 🙂"}],
    [{"role": "user", "content": "tags <b>&'\"é", "metadata": {"lang": "fr", "note": "<x> & 'é'"}, "name": None}],
]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, theirs, style, add_generation_prompt):
    hf = ours[style]
    assert hf.has_chat_template
    for chat in CHATS:
        expected = theirs[style].apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected
    assert hf.apply_chat_template(CHATS[0]).startswith("<|begin_of_text|>" if style == "llama3" else "<|im_start|>")


def test_chat_template_errors(ours):
    with pytest.raises(ValueError, match="no chat template"):
        ours["gpt2"].apply_chat_template(CHATS[0])
    assert not ours["gpt2"].has_chat_template
    with pytest.raises(ValueError, match="unknown role tool"):  # the template's raise_exception
        ours["chatml"].apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_sources(dirs, ours, tmp_path):
    """A list of named templates in tokenizer_config.json, or the legacy chat_template.json, as transformers reads."""
    template = ours["chatml"].chat_template
    config = json.loads((dirs["chatml"] / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": template}]
    listed = edited(dirs["chatml"], tmp_path / "listed", {"chat_template.jinja": None,
                                                          "tokenizer_config.json": {**config, "chat_template": named}})
    reference = transformers.AutoTokenizer.from_pretrained(str(listed))
    assert HFTokenizer.from_dir(listed).apply_chat_template(CHATS[1]) == \
        reference.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    legacy = edited(dirs["chatml"], tmp_path / "legacy", {"chat_template.jinja": None,
                                                          "chat_template.json": {"chat_template": template}})
    assert HFTokenizer.from_dir(legacy).chat_template == template


# ---- the library on a model's HF tokenizer -----------------------------------------------------


def tiny_model(hf: HFTokenizer, seed: int = 0) -> PEERTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=hf.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                         peer=PEERConfig(num_experts=64, heads=2, top_k=4, d_key=16))
    model = PEERTransformer(config).eval()
    model.tokenizer = hf
    return model


class ScriptLM(FakeLM):
    """Stands in for a model: records what it is fed, and predicts ``script[n]`` as the n-th new token."""

    def __init__(self, hf: HFTokenizer, script: list[int]):
        super().__init__()
        self.tokenizer, self.script = hf, script
        self.config = ModelConfig(vocab_size=hf.vocab_size, d_model=8, n_layers=1, n_heads=2, d_ff=8,
                                  peer=PEERConfig(num_experts=4, top_k=2, d_key=4))
        self.dummy = nn.Parameter(torch.zeros(1))
        self.context: list[int] = []
        self.prompt_len = 0

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(torch.zeros(0), torch.zeros(0))

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if not self.context:
            self.prompt_len = tokens.shape[1]
        self.context += tokens[0].tolist()
        logits = torch.zeros(*tokens.shape, self.config.vocab_size)
        logits[:, -1, self.script[min(len(self.context) - self.prompt_len, len(self.script) - 1)]] = 100.0
        return logits


@pytest.mark.parametrize("style", STYLES)
def test_generation_uses_the_model_tokenizer(ours, style):
    hf = ours[style]
    model = tiny_model(hf)
    for seed in range(4):
        result = generate_text(model, hf, "The cat 🙂", SamplingParams(max_tokens=30, temperature=1.5, seed=seed))
        assert result.text == hf.decode(result.token_ids)
        assert not set(result.token_ids) & hf.never_sampled
        assert (result.finish_reason == "eos") == (result.token_ids[-1] in hf.eos_ids)
        assert not set(result.token_ids[:-1]) & hf.eos_ids
    steps = list(generate(model, hf.encode("Hello"), SamplingParams(max_tokens=20, temperature=2.0, seed=1)))
    assert "".join(s.text for s in steps) == hf.decode([s.token_id for s in steps])
    if hf.never_sampled:
        with pytest.raises(ValueError, match="BOS"):
            generate(model, [hf.bos_id, *hf.encode("x")], SamplingParams())


def test_without_a_bos_rule_the_prompt_is_the_context(ours):
    """GPT-2, Qwen, SmolLM2: transformers' generate feeds the prompt as it is; an empty prompt gets the BOS."""
    for style in ("chatml", "gpt2"):
        hf = ours[style]
        model = ScriptLM(hf, hf.encode("ok") + [min(hf.eos_ids)])
        assert generate_text(model, hf, "Hi there", SamplingParams(max_tokens=5)).text == "ok"
        assert model.context[: model.prompt_len] == hf.encode("Hi there")
        model = ScriptLM(hf, [min(hf.eos_ids)])
        generate_text(model, hf, "", SamplingParams(max_tokens=5))
        assert model.context[:1] == [hf.bos_id] and model.prompt_len == 1


def test_the_chat_templates_end_of_turn_ends_a_generation(dirs, tmp_path):
    """A ChatML model whose configs name only <|endoftext|> as eos still stops at <|im_end|>."""
    path = shutil.copytree(dirs["chatml"], tmp_path / "eot")
    (path / "generation_config.json").write_text("{}")
    (path / "config.json").write_text("{}")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    hf = HFTokenizer.from_dir(path)
    assert hf.eos_ids == {hf.encode("<|endoftext|>")[0], hf.encode("<|im_end|>")[0]}
    assert HFTokenizer.from_dir(dirs["gpt2"]).eos_ids == {hf.encode("<|endoftext|>")[0]}  # no template: none added


def test_generation_starts_with_bos_and_stops_on_any_eos(ours):
    hf = ours["llama3"]
    for eos in hf.eos_ids:
        model = ScriptLM(hf, hf.encode("Hello wörld 🙂") + [eos] + hf.encode(" never"))
        result = generate_text(model, hf, "Hi", SamplingParams(max_tokens=50))
        assert (result.text, result.finish_reason) == ("Hello wörld 🙂", "eos")
        assert model.context[: 1 + len(hf.encode("Hi"))] == [hf.bos_id, *hf.encode("Hi")]


def test_continuous_batching_with_the_model_tokenizer(ours):
    hf = ours["chatml"]
    model = tiny_model(hf, seed=2)
    todo = [(hf.encode(text), SamplingParams(max_tokens=12, temperature=1.3, seed=i))
            for i, text in enumerate(["The cat", "日本", "Hello, world!"])]
    expected = [[(s.token_id, s.text, s.finish_reason) for s in generate(model, p, params)] for p, params in todo]
    decoder = BatchDecoder(model, capacity=3)
    got = {id(decoder.add(p, params)): [] for p, params in todo}
    while len(decoder):
        for sequence, step in decoder.step():
            got[id(sequence)].append((step.token_id, step.text, step.finish_reason))
    assert list(got.values()) == expected


def test_sample_next_masks_the_given_ids():
    logits = torch.zeros(3, 10)
    logits[:, 7] = 100.0
    assert sample_next(logits, SamplingParams(temperature=0), never_sampled={7}).tolist() != [7] * 3
    assert sample_next(logits, SamplingParams(temperature=0), never_sampled=frozenset()).tolist() == [7] * 3
    ids = sample_next(logits, SamplingParams(temperature=50.0), make_generator(0), never_sampled={7, 2}).tolist()
    assert not {7, 2} & set(ids)


def test_token_data_from_text_with_an_hf_tokenizer(ours):
    hf = ours["llama3"]
    text = "".join(facts_text(make_facts(0, 40)))
    data = TokenData.from_text(text, hf)
    assert data.tokens.dtype == torch.int32 and data.tokens.tolist() == hf.encode(text)
    assert data.bos == hf.bos_id and data.bytes_per_token == len(text.encode()) / len(data) > 1
    inputs, _ = data.sample_batch(4, 16, torch.Generator().manual_seed(0))
    assert bool((inputs[:, 0] == hf.bos_id).all())
    byte_data = TokenData.from_text(text, ByteTokenizer())
    assert byte_data.tokens.dtype == torch.uint8 and byte_data.bytes_per_token == 1.0
    # uniform logits: log2(V) bits per token, divided by the bytes each token stands for
    model = tiny_model(hf)
    with torch.no_grad():
        model.norm.weight.zero_()
    bpb = evaluate_bpb(model, data, seq_len=32, batch_size=8, max_batches=2)
    assert bpb == pytest.approx(math.log2(hf.vocab_size) / data.bytes_per_token, rel=1e-6)


def test_windows_of_a_tokenizer_without_bos_are_shifted_text(ours):
    hf = ours["chatml"]
    data = TokenData.from_text("".join(facts_text(make_facts(0, 40))), hf)
    assert data.bos is None
    inputs, targets = data.sample_batch(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    tokens = data.tokens.long()
    for row_in, row_out in zip(inputs, targets):  # windows of consecutive text, targets one ahead
        start = next(i for i in range(len(tokens) - 16) if torch.equal(tokens[i : i + 16], row_in))
        assert torch.equal(tokens[start + 1 : start + 17], row_out)
    batches = list(data.iter_eval_batches(batch_size=3, seq_len=10))
    assert torch.equal(torch.cat([t.flatten() for _, t in batches]), tokens[1:])  # every token but the first
    assert torch.equal(torch.cat([i.flatten() for i, _ in batches]), tokens[:-1])


def test_replay_and_fact_tokens_use_the_model_tokenizer(ours):
    hf = ours["llama3"]
    replay = sample_replay(tiny_model(hf), windows=3, seq_len=10, seed=0)
    assert replay.bos == hf.bos_id and len(replay) == 30
    assert replay.tokens.dtype == torch.int16 and not set(replay.tokens.tolist()) & hf.never_sampled
    facts = make_facts(0, 3)
    tokens = facts_tokens(facts, tokenizer=hf).tolist()
    assert tokens[0] == hf.bos_id and tokens.count(hf.bos_id) == 3
    assert hf.decode(tokens) == facts_text(facts)
    chatml = ours["chatml"]  # no BOS rule: replay windows are shifted text, fact sentences plain text
    assert sample_replay(tiny_model(chatml), windows=2, seq_len=10, seed=0).bos is None
    assert facts_tokens(facts, tokenizer=chatml).tolist() == chatml.encode(facts_text(facts))


def test_deepcopy_and_checkpoint_keep_the_hf_tokenizer(ours, tmp_path):
    hf = ours["chatml"]
    model = tiny_model(hf)
    assert copy.deepcopy(model).tokenizer is hf
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    tokenizer = loaded.tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (hf.bos_id, hf.eos_ids, hf.pad_id)
    assert all(tokenizer.encode(text) == hf.encode(text) for text in TEXTS)
    assert tokenizer.apply_chat_template(CHATS[1]) == hf.apply_chat_template(CHATS[1])
    save_checkpoint(PEERTransformer(model.config), tmp_path / "bytes")  # a fresh model reads bytes
    assert isinstance(load_checkpoint(tmp_path / "bytes").tokenizer, ByteTokenizer)


def test_cli_generate_encodes_with_the_checkpoint_tokenizer(ours, tmp_path, capsys):
    hf = ours["gpt2"]
    model = tiny_model(hf)
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["generate", str(tmp_path / "ckpt"), "The cat", "--max-tokens", "8", "--temperature", "0"]) == 0
    expected = generate_text(model, hf, "The cat", SamplingParams(max_tokens=8, temperature=0))
    assert capsys.readouterr().out == expected.text
