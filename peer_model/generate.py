"""Sampling from a :class:`~peer_model.model.PEERTransformer`: prefill, then one token at a time.

The loop is gpt-fast's: ``prefill`` runs the prompt through the model once, filling a preallocated
KV cache; ``decode_one_token`` feeds the last sampled token and returns the next logits. Sampling
options live in one validated :class:`SamplingParams` (as in vLLM).

Three layers, each usable on its own:

* :func:`sample_next` turns logits into token ids (temperature, top-k, top-p, greedy; never the ids the
  tokenizer marks ``never_sampled``: BOS and PAD);
* :class:`CompletionStream` turns sampled ids into text that is safe to show: whole characters only,
  cut at the first stop string, holding back a tail that might still become a stop string. A batching
  engine keeps one per request;
* :func:`generate` streams :class:`GenerationStep` objects for one prompt, :func:`generate_text`
  collects them into a :class:`GenerationResult`.

The special ids (the BOS that starts a context when the tokenizer adds one, the EOS ids that end a completion, the ids never
sampled) and the text of sampled ids come from the model's own tokenizer, ``model.tokenizer``.

Single prompt only: the model has one cache length and no padding mask, so prompts of different
lengths cannot share a batch without a change in model.py (per-row lengths or an attention mask).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .model import KVCache
from .tokenizer import ByteTokenizer, IncrementalDecoder, StreamDecoder, Tokenizer, context_ids

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters; bounds the per-token cost of looking for a stop string
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows)

FinishReason = Literal["stop", "length", "eos"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a completion.

    ``temperature`` 0 (anything below 1e-5) is greedy, top_k / top_p are then ignored; ``top_k`` 0
    and ``top_p`` 1 are off. Top-k is applied first, then top-p within what top-k kept.
    ``stop``: generation ends as soon as the completion contains one of these strings; the returned
    text ends just before it. A single string or a list is accepted and stored as a tuple.
    ``seed``: same seed, same model, same prompt → same completion; None draws a fresh seed.
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"a stop string may have at most {MAX_STOP_LENGTH} characters, got {len(s)}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- logits → token ids ------------------------------------------------------------------------


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept), others → -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most probable tokens whose mass is >= ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most probable token stays, also when p rounds to 0 in the logits' dtype
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, -math.inf)


def mask_unsampleable(logits: torch.Tensor,
                      never_sampled: Collection[int] = ByteTokenizer.never_sampled) -> torch.Tensor:
    """Set the logits of ``never_sampled`` (the tokenizer's; default the byte BOS and PAD) to -inf in place,
    over the last dimension."""
    logits[..., sorted(t for t in never_sampled if t < logits.shape[-1])] = -math.inf
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                never_sampled: Collection[int] = ByteTokenizer.never_sampled) -> torch.Tensor:
    """logits (B, V) → token ids (B,). Greedy when ``params.temperature`` is 0; ``never_sampled`` (the model
    tokenizer's; default the byte BOS and PAD) never come out."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = mask_unsampleable(logits.clone(), never_sampled)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# ---- ids → text --------------------------------------------------------------------------------


class CompletionStream:
    """Sampled ids → text to release, cut at the first stop string.

    ``push`` returns the text that can be shown now. A character is held until complete (``decoder``: the
    model tokenizer's ``stream_decoder()``, default bytes); so is any tail of the text that is the start of a
    stop string, since the next token may complete it. Once a stop string appears, ``stopped`` is
    True, the text before it has been released and the rest is dropped. ``finish`` releases what is
    held when no more tokens come. ``text`` is everything released so far.
    """

    def __init__(self, stop: tuple[str, ...] = (), decoder: IncrementalDecoder | None = None):
        self.stop = tuple(stop)
        self.stopped = False
        self._decoder = decoder or StreamDecoder()
        self._text = ""  # decoded completion
        self._sent = 0  # characters of _text released

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._add(self._decoder.push(token_id), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._add(self._decoder.flush(), final=True)

    def _add(self, piece: str, final: bool) -> str:
        self._text += piece
        text, start = self._text, self._sent
        # No stop string can start before _sent: its start would have been held back (see _held).
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(text) if final else len(text) - self._held(start)
        self._sent = end
        return text[start:end]

    def _held(self, start: int) -> int:
        """Length of the longest tail of the unreleased text that is a proper prefix of a stop string."""
        text, held = self._text, 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text) - start), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held


# ---- the decode loop ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStep:
    """One sampled token and the text it releases (often "": a character or a stop string pending).

    The last step of a generation has ``finish_reason`` set and carries all remaining text.
    """

    token_id: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int  # the prompt's own tokens, without a BOS generation adds
    completion_tokens: int  # tokens sampled, including an EOS and the tokens of a stop string
    finish_reason: FinishReason
    token_ids: tuple[int, ...] = ()  # the sampled ids


def completion_budget(model: nn.Module, prompt_ids: list[int], max_tokens: int) -> int:
    """How many tokens can be sampled after the context of ``prompt_ids`` (:func:`context_ids`: the
    prompt, after a BOS when the tokenizer adds one) within ``model.config.max_seq_len``.

    Sampling n tokens feeds the context and the first n - 1 sampled tokens through the model.
    """
    max_len = model.config.max_seq_len
    context = len(context_ids(model.tokenizer, prompt_ids))
    if context > max_len:
        extra = context - len(prompt_ids)
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens{f' (+{extra} BOS)' if extra else ''} does not fit the context "
            f"window of {max_len} tokens; shorten it to at most {max_len - extra} tokens"
        )
    return min(max_tokens, max_len - context + 1)


def prefill(model: nn.Module, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (B, T) → logits of the last position (B, V); the cache then holds all T tokens."""
    return model.last_logits(tokens, cache)


def decode_one_token(model: nn.Module, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (B,) → next logits (B, V)."""
    return model.last_logits(token.view(-1, 1), cache)


def sample_tokens(model: nn.Module, prompt_ids: list[int], params: SamplingParams, budget: int) -> Iterator[int]:
    """Lazily sample up to ``budget`` ids after the prompt's context (:func:`context_ids`), ending early
    with an EOS id (both of ``model.tokenizer``); each forward runs only when asked for.

    Grad mode is thread-local, so inference mode is entered around each model call rather than
    across a ``yield`` (the consumer may resume this generator from another thread).
    """
    device = next(model.parameters()).device
    tokenizer: Tokenizer = model.tokenizer
    generator = make_generator(params.seed, device)
    with torch.inference_mode():
        context = context_ids(tokenizer, prompt_ids)
        cache = model.new_cache(1, len(context) + budget - 1)
        tokens = torch.tensor([context], dtype=torch.long, device=device)
        next_id = sample_next(prefill(model, tokens, cache), params, generator, tokenizer.never_sampled)  # (1,)
    for produced in range(1, budget + 1):
        token = int(next_id)
        yield token
        if produced == budget or token in tokenizer.eos_ids:
            return
        with torch.inference_mode():
            next_id = sample_next(decode_one_token(model, next_id, cache), params, generator, tokenizer.never_sampled)


def check_prompt(model: nn.Module, prompt_ids: list[int], params: SamplingParams) -> int:
    """Validate ids of ``model.tokenizer`` for ``model``; returns the completion budget (see
    :func:`completion_budget`). Raises ValueError with a message for the caller."""
    vocab, never = model.config.vocab_size, model.tokenizer.never_sampled
    bad = [t for t in prompt_ids if not 0 <= t < vocab or t in never]
    if bad:
        raise ValueError(f"prompt ids must be in [0, {vocab})" + (f" and none of {sorted(never)} (ids the model "
                         "never reads inside a text: generation adds a BOS itself)" if never else "")
                         + f", got {bad[:5]}")
    return completion_budget(model, prompt_ids, params.max_tokens)


def next_step(stream: CompletionStream, token: int, produced: int, budget: int,
              eos_ids: Collection[int] = ByteTokenizer.eos_ids) -> GenerationStep:
    """The step for the ``produced``-th sampled ``token`` of a completion: its text, and why it ends if it
    does (one of ``eos_ids``, the model tokenizer's; a stop string; or the budget). Shared by
    :func:`generate` and batching engines."""
    reason: FinishReason | None = None
    if token in eos_ids:
        text, reason = stream.finish(), "eos"
    else:
        text = stream.push(token)
        if stream.stopped:
            reason = "stop"
        elif produced == budget:
            text += stream.finish()
            reason = "stop" if stream.stopped else "length"  # a flushed U+FFFD may end a stop
    return GenerationStep(token, text, reason)


def generate(model: nn.Module, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationStep]:
    """Stream the completion of ``prompt_ids`` (ids of ``model.tokenizer``, in its context), one step per
    sampled token.

    Raises ValueError (before anything is computed) if the prompt does not fit the context window;
    a completion that would not fit is cut at the window with finish_reason "length". The model is
    put in eval mode for the generation and its previous mode restored after. Closing the iterator
    early (``.close()``, or dropping it) stops generation: nothing is computed ahead of the consumer.
    """
    prompt_ids = [int(t) for t in prompt_ids]
    budget = check_prompt(model, prompt_ids, params)
    return _steps(model, prompt_ids, params, budget)


def _steps(model: nn.Module, prompt_ids: list[int], params: SamplingParams, budget: int) -> Iterator[GenerationStep]:
    was_training = model.training
    model.eval()
    try:
        tokenizer: Tokenizer = model.tokenizer
        stream = CompletionStream(params.stop, tokenizer.stream_decoder())
        for produced, token in enumerate(sample_tokens(model, prompt_ids, params, budget), start=1):
            step = next_step(stream, token, produced, budget, tokenizer.eos_ids)
            yield step
            if step.finish_reason is not None:
                return
    finally:
        model.train(was_training)


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> GenerationResult:
    """Complete ``prompt``; the non-streaming form of :func:`generate`. ``tokenizer`` encodes the prompt
    (normally ``model.tokenizer``); the completion's text is that of the model's tokenizer."""
    prompt_ids = tokenizer.encode(prompt)
    pieces, ids, reason = [], [], "length"
    for step in generate(model, prompt_ids, params):
        pieces.append(step.text)
        ids.append(step.token_id)
        reason = step.finish_reason or reason
    return GenerationResult("".join(pieces), len(prompt_ids), len(ids), reason, tuple(ids))
