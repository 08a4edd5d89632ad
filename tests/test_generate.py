import math
import random

import pytest
import torch
from torch import nn

from fake_lm import FakeLM
from peer_model.config import ModelConfig, PEERConfig
from peer_model.generate import (
    MAX_STOP_STRINGS,
    CompletionStream,
    GenerationResult,
    SamplingParams,
    apply_top_k,
    apply_top_p,
    generate,
    generate_text,
    make_generator,
    sample_next,
)
from peer_model.model import KVCache, PEERTransformer
from peer_model.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0.0)


def tiny_model(max_seq_len: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0) -> PEERTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=max_seq_len, peer_layers=[1],
        peer=PEERConfig(num_experts=64, heads=2, top_k=4, d_key=16),
    )
    return PEERTransformer(config).to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> PEERTransformer:
    return tiny_model()


class ScriptedLM(FakeLM):
    """Stands in for a model: whatever the context, it predicts ``script[n]`` as the n-th new token."""

    tokenizer = TOK

    def __init__(self, script: list[int], max_seq_len: int = 512):
        super().__init__()
        self.script = script
        self.config = ModelConfig(d_model=8, n_layers=1, n_heads=2, d_ff=8, max_seq_len=max_seq_len,
                                  peer=PEERConfig(num_experts=4, top_k=2, d_key=4))
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(torch.zeros(0), torch.zeros(0))

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T = tokens.shape
        assert cache.length + T <= self.config.max_seq_len
        if cache.length == 0:
            self.prompt_len = T
        cache.length += T
        step = cache.length - self.prompt_len  # index of the token to predict
        logits = torch.zeros(B, T, VOCAB_SIZE)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 100.0  # certain at any usual temperature
        return logits


def scripted(text: str | bytes, *extra: int, **kwargs) -> ScriptedLM:
    data = text.encode() if isinstance(text, str) else text
    return ScriptedLM(list(data) + list(extra), **kwargs)


# ---- the KV cache decode loop equals a full recompute ------------------------------------------


def greedy_without_cache(model: PEERTransformer, prompt_ids: list[int], n: int) -> list[int]:
    ids, out = [BOS, *prompt_ids], []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            logits[[BOS, PAD]] = -math.inf
            token = int(logits.argmax())
            out.append(token)
            if token == EOS:
                break
            ids.append(token)
    return out


def test_greedy_with_cache_equals_full_recompute():
    # float64 so that no near-tie in an argmax or an expert top-k can flip between the two paths
    model = tiny_model(dtype=torch.float64)
    prompt = TOK.encode("The PEER layer ")
    expected = greedy_without_cache(model, prompt, 40)
    result = generate_text(model, TOK, "The PEER layer ", SamplingParams(max_tokens=40, temperature=0))
    assert list(result.token_ids) == expected
    assert result.completion_tokens == len(expected)
    # a grown pool (several segments) and usage counting do not change that
    model.grow(36, tag="more")
    layer = model.peer_layers()[1]
    layer.track_usage = True
    expected = greedy_without_cache(model, prompt, 40)
    layer.reset_usage()
    result = generate_text(model, TOK, "The PEER layer ", SamplingParams(max_tokens=40, temperature=0))
    assert list(result.token_ids) == expected
    # every token fed through the model (BOS + prompt + all sampled tokens but the last) counted once per head
    fed = 1 + len(prompt) + result.completion_tokens - 1
    assert int(layer.usage_counts.sum()) == fed * 2 * 4


def test_generation_restores_training_mode(model):
    model.train()
    generate_text(model, TOK, "hi", SamplingParams(max_tokens=3, temperature=0))
    assert model.training
    model.eval()


# ---- sampling ----------------------------------------------------------------------------------


def test_same_seed_same_text_other_seed_other_text(model):
    def run(seed):
        return generate_text(model, TOK, "abc", SamplingParams(max_tokens=32, temperature=1.0, seed=seed))

    assert run(7) == run(7)
    assert run(1).token_ids != run(2).token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate_text(model, TOK, "xyz", SamplingParams(max_tokens=24, temperature=0))
    for params in (SamplingParams(max_tokens=24, top_k=1, seed=3), SamplingParams(max_tokens=24, top_p=1e-9, seed=3)):
        assert generate_text(model, TOK, "xyz", params).token_ids == greedy.token_ids


def brute_top_k(row: list[float], k: int) -> set[int]:
    return set(sorted(range(len(row)), key=lambda i: -row[i])[:k])


def brute_top_p(row: list[float], p: float) -> set[int]:
    z = sum(math.exp(v) for v in row)
    kept, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        kept.add(i)
        mass += math.exp(row[i]) / z
        if mass >= p:
            break
    return kept


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).squeeze(1).tolist()) for r in filtered]


def test_top_k_and_top_p_masks_match_brute_force():
    rng = random.Random(0)
    rows = [[rng.gauss(0, 2) for _ in range(12)] for _ in range(5)]
    rows.append([math.log(2.0**-i) for i in range(1, 13)])  # probabilities ~ 1/2, 1/4, 1/8, ...
    logits = torch.tensor(rows, dtype=torch.float64)
    for k in (1, 2, 5, 11):
        assert kept(apply_top_k(logits, k)) == [brute_top_k(r, k) for r in rows]
    assert kept(apply_top_k(logits, 0)) == kept(apply_top_k(logits, 12)) == [set(range(12))] * len(rows)
    for p in (1e-6, 0.3, 0.45, 0.55, 0.74, 0.76, 0.9, 0.999):
        assert kept(apply_top_p(logits, p)) == [brute_top_p(r, p) for r in rows], p
    # smallest set reaching the mass: 1/2 covers 0.45, 1/2 + 1/4 covers 0.74 but not 0.76
    assert kept(apply_top_p(logits[-1:], 0.45)) == [{0}]
    assert kept(apply_top_p(logits[-1:], 0.74)) == [{0, 1}]
    assert kept(apply_top_p(logits[-1:], 0.76)) == [{0, 1, 2}]
    # top-k then top-p, as sample_next applies them: the nucleus is taken within the k kept tokens
    both = apply_top_p(apply_top_k(logits, 3), 0.9)
    for row, got in zip(rows, kept(both)):
        top3 = sorted(brute_top_k(row, 3))
        nucleus = brute_top_p([row[i] for i in top3], 0.9)
        assert got == {top3[i] for i in nucleus}


def test_a_top_p_below_the_logits_precision_keeps_the_most_probable_token():
    """Found by fuzzing the API: top_p 5e-324 rounds to 0 in float32, every token was dropped and sampling
    raised (a 500)."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.1, 0.2]])
    for p in (5e-324, 1e-300, 1e-46):
        assert kept(apply_top_p(logits, p)) == [{1}, {0}], p
        assert sample_next(logits, SamplingParams(top_p=p, temperature=3.0), make_generator(0)).tolist() == [1, 0]


def test_sample_next_respects_masks_and_never_emits_specials():
    logits = torch.zeros(4, VOCAB_SIZE)
    logits[:, BOS] = logits[:, PAD] = 100.0  # the model "wants" a special token
    logits[:, 65], logits[:, 66], logits[:, 67] = 5.0, 4.0, 3.0
    assert sample_next(logits, SamplingParams(temperature=0)).tolist() == [65] * 4
    gen = make_generator(0)
    for _ in range(20):
        assert set(sample_next(logits, SamplingParams(top_k=2), gen).tolist()) <= {65, 66}
        ids = sample_next(logits, SamplingParams(temperature=5.0), gen).tolist()
        assert BOS not in ids and PAD not in ids


# ---- stop strings, EOS, streaming ----------------------------------------------------------------


def test_stop_string_truncates_and_reports_stop():
    lm = scripted("Hello, world! STOP and more text")
    result = generate_text(lm, TOK, "", SamplingParams(max_tokens=100, stop=("STOP", "zzz")))
    assert result.text == "Hello, world! "
    assert result.finish_reason == "stop"
    assert result.completion_tokens == len("Hello, world! STOP")  # nothing sampled past the stop
    # the earliest stop string wins; a multibyte stop string works on characters
    result = generate_text(scripted("café au lait"), TOK, "", SamplingParams(stop=("lait", "é")))
    assert (result.text, result.finish_reason) == ("caf", "stop")


def test_eos_and_length():
    result = generate_text(scripted("done", EOS), TOK, "x", SamplingParams(max_tokens=50))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("done", "eos", 5)
    result = generate_text(scripted("a" * 100), TOK, "x", SamplingParams(max_tokens=7))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("a" * 7, "length", 7)
    assert result.prompt_tokens == 1


def test_streaming_pieces_concatenate_to_text_and_hold_back_stop_prefixes():
    script = "a wo wonder wo\u00e9rld wor — 日本 world"
    params = SamplingParams(max_tokens=200, stop=("world", "wor"))
    steps = list(generate(scripted(script), TOK.encode("p"), params))
    text = generate_text(scripted(script), TOK, "p", params).text
    assert "".join(s.text for s in steps) == text == "a wo wonder wo\u00e9rld "
    assert [s.finish_reason for s in steps] == [None] * (len(steps) - 1) + ["stop"]
    # "wo" may begin "wor": it is held back until the next character rules that out
    stream = CompletionStream(("wor",))
    assert [stream.push(t) for t in b"xwoy"] == ["x", "", "", "woy"]
    # without stop strings every character is released as soon as it is complete
    steps = list(generate(scripted("日本"), [], SamplingParams(max_tokens=6)))
    assert [s.text for s in steps] == ["", "", "日", "", "", "本"]


def test_completion_stream_releases_held_text_at_the_end():
    stream = CompletionStream(("abc",))
    out = "".join(stream.push(t) for t in b"xxab")
    assert out == "xx"
    assert stream.finish() == "ab" and not stream.stopped and stream.text == "xxab"


def test_invalid_utf8_output_decodes_without_raising(model):
    bad = [0xFF, 0xE2, 0x82, 0x41, 0xC3]  # invalid byte, truncated sequence, 'A', trailing lead byte
    result = generate_text(ScriptedLM(bad), TOK, "", SamplingParams(max_tokens=len(bad)))
    assert result.text == "\ufffd\ufffdA\ufffd"
    assert result.finish_reason == "length"
    # a random model emits arbitrary bytes; the text is always valid
    for seed in range(3):
        text = generate_text(model, TOK, "", SamplingParams(max_tokens=40, temperature=2.0, seed=seed)).text
        text.encode("utf-8")


# ---- context window and validation -------------------------------------------------------------


def test_context_window_clamps_and_long_prompt_raises():
    model = tiny_model(max_seq_len=32)
    with torch.no_grad():
        model.embed.weight[EOS] = 0.0  # EOS logit 0 never wins an argmax: the run reaches the window
    result = generate_text(model, TOK, "p" * 20, SamplingParams(max_tokens=100, temperature=0))
    assert (result.completion_tokens, result.finish_reason) == (12, "length")
    assert generate_text(model, TOK, "p" * 31, GREEDY).completion_tokens == 1  # BOS + 31 fill the window
    with pytest.raises(ValueError, match="32 tokens"):
        generate_text(model, TOK, "p" * 32, GREEDY)
    with pytest.raises(ValueError, match="BOS"):
        generate(model, [BOS, 65], GREEDY)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0}, {"max_tokens": 2.5}, {"temperature": -0.1}, {"temperature": float("nan")},
        {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"stop": ("",)}, {"stop": ("x",) * (MAX_STOP_STRINGS + 1)},
        {"stop": (3,)}, {"seed": -1}, {"seed": 1.5},
    ],
)
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert isinstance(generate_text(scripted("hi"), TOK, "", SamplingParams(max_tokens=2)), GenerationResult)
