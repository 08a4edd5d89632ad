"""Continuous batching: many completions of different lengths advance together, one token per step.

:class:`BatchDecoder` owns one preallocated KV cache with a row ("slot") per running sequence. A new
sequence is prefilled alone into a free row; then every :meth:`BatchDecoder.step` emits one token for
each running sequence and computes the next ones in a single batched forward over a ragged cache (each
row at its own position, see ``KVCache.lengths``). Finished or cancelled sequences free their row at
once and the last row moves into the hole, so the running rows are always ``0 .. n-1`` and the decode
batch is a view, never a copy of the cache.

Special ids (the BOS every prompt starts with, the EOS ids, the ids never sampled) and the text of sampled
ids are the model tokenizer's (``model.tokenizer``).

Each sequence keeps its own sampling parameters, seeded generator, stop strings and budget, and goes
through the same :func:`~peer_model.generate.next_step` as :func:`~peer_model.generate.generate`: the
same seed gives the same completion as generating it alone (up to float rounding of a batched matmul,
which can flip a near-tie).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .generate import (
    CompletionStream, GenerationStep, SamplingParams, check_prompt, make_generator, next_step, prefill, sample_next,
)
from .model import KVCache
from .tokenizer import Tokenizer


@dataclass(eq=False)
class Sequence:
    """One completion in a :class:`BatchDecoder`; ``slot`` is its cache row while it runs."""

    prompt_tokens: int
    params: SamplingParams
    budget: int
    generator: torch.Generator
    stream: CompletionStream
    slot: int
    pending: int  # the sampled token the next step emits
    produced: int = 0


class BatchDecoder:
    def __init__(self, model: nn.Module, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if model.training:
            raise ValueError("the model must be in eval mode (BatchNorm running statistics)")
        self.model = model
        self.tokenizer: Tokenizer = model.tokenizer
        self.capacity = capacity
        self.device = next(model.parameters()).device
        self.rows: list[Sequence] = []  # rows[i].slot == i
        self._cache: KVCache | None = None  # allocated on first use

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.model.new_cache(self.capacity)
            self._cache.lengths = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        return self._cache

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Prefill a new sequence into a free row and sample its first token. Raises ValueError for a
        prompt that does not fit (see :func:`check_prompt`) and RuntimeError when every row is taken."""
        prompt_ids = [int(t) for t in prompt_ids]
        budget = check_prompt(self.model, prompt_ids, params)
        if len(self.rows) == self.capacity:
            raise RuntimeError(f"all {self.capacity} rows are running")
        slot, cache = len(self.rows), self.cache
        row = KVCache(cache.keys[:, slot : slot + 1], cache.values[:, slot : slot + 1])  # a view: writes land in place
        generator = make_generator(params.seed, self.device)
        with torch.inference_mode():
            tokens = torch.tensor([[self.tokenizer.bos_id, *prompt_ids]], dtype=torch.long, device=self.device)
            first = int(sample_next(prefill(self.model, tokens, row), params, generator, self.tokenizer.never_sampled))
        cache.lengths[slot] = tokens.shape[1]
        stream = CompletionStream(params.stop, self.tokenizer.stream_decoder())
        sequence = Sequence(len(prompt_ids), params, budget, generator, stream, slot, first)
        self.rows.append(sequence)
        return sequence

    def step(self) -> list[tuple[Sequence, GenerationStep]]:
        """Emit one step for every running sequence; finished ones leave, the others get their next
        token from one batched forward."""
        emitted = []
        for sequence in list(self.rows):
            sequence.produced += 1
            step = next_step(sequence.stream, sequence.pending, sequence.produced, sequence.budget,
                             self.tokenizer.eos_ids)
            emitted.append((sequence, step))
            if step.finish_reason is not None:
                self.remove(sequence)
        if self.rows:
            self._decode()
        return emitted

    def remove(self, sequence: Sequence) -> None:
        """Drop a sequence (finished or cancelled); the last row moves into its slot."""
        if sequence.slot >= len(self.rows) or self.rows[sequence.slot] is not sequence:
            return
        last = self.rows.pop()
        if last is not sequence:
            hole, cache = sequence.slot, self.cache
            cache.keys[:, hole] = cache.keys[:, last.slot]
            cache.values[:, hole] = cache.values[:, last.slot]
            cache.lengths[hole] = cache.lengths[last.slot]
            last.slot = hole
            self.rows[hole] = last
        sequence.slot = self.capacity  # no longer running

    def _decode(self) -> None:
        n, cache = len(self.rows), self.cache
        running = KVCache(cache.keys[:, :n], cache.values[:, :n], lengths=cache.lengths[:n])
        with torch.inference_mode():
            tokens = torch.tensor([[s.pending] for s in self.rows], dtype=torch.long, device=self.device)
            logits = self.model(tokens, running)[:, -1]  # (n, vocab)
            for i, sequence in enumerate(self.rows):
                sequence.pending = int(sample_next(logits[i : i + 1], sequence.params, sequence.generator,
                                                   self.tokenizer.never_sampled))
