"""Continuous batching: many completions of different lengths advance together, one token per step.

:class:`BatchDecoder` owns one preallocated KV cache with a row ("slot") per running sequence. A new
sequence is prefilled alone into a free row; then every :meth:`BatchDecoder.step` emits one token for
each running sequence and computes the next ones in a single batched forward over a ragged cache (each
row at its own position, see ``KVCache.lengths``). Finished or cancelled sequences free their row at
once and the last row moves into the hole, so the running rows are always ``0 .. n-1`` and the decode
batch is a view, never a copy of the cache.

Special ids (the BOS a prompt starts with when the tokenizer adds one, the EOS ids, the ids never sampled) and the text of sampled
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
from .tokenizer import Tokenizer, context_ids


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
    cached: int = 0  # tokens in its cache row (known on the host: no sync to find the decode span)
    produced: int = 0


class BatchDecoder:
    """``cuda_graphs``: run the decode step through :class:`DecodeGraphs` (captured once per batch bucket
    on CUDA; on CPU the same padded, fixed-shape step runs eagerly). ``max_len``: positions per cache row
    (default the model's context window); a caller whose sequences are all short (a probe of short
    questions) allocates that much instead of ``capacity`` whole windows, and a sequence that would not
    fit is refused at :meth:`add`."""

    def __init__(self, model: nn.Module, capacity: int, cuda_graphs: bool = False, max_len: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_len is not None and not 0 < max_len <= model.config.max_seq_len:
            raise ValueError(f"max_len must be in 1..{model.config.max_seq_len}, got {max_len}")
        if model.training:
            raise ValueError("the model must be in eval mode (BatchNorm running statistics)")
        self.model = model
        self.tokenizer: Tokenizer = model.tokenizer
        self.capacity = capacity
        self.max_len = model.config.max_seq_len if max_len is None else max_len
        self.device = next(model.parameters()).device
        self.rows: list[Sequence] = []  # rows[i].slot == i
        self._cache: KVCache | None = None  # allocated on first use
        self._graphs: DecodeGraphs | None = None
        self.cuda_graphs = cuda_graphs

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.model.new_cache(self.capacity, self.max_len)
            self._cache.lengths = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        return self._cache

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Prefill a new sequence into a free row and sample its first token. Raises ValueError for a
        prompt that does not fit (see :func:`check_prompt`) and RuntimeError when every row is taken."""
        prompt_ids = [int(t) for t in prompt_ids]
        budget = check_prompt(self.model, prompt_ids, params)
        needed = len(context_ids(self.tokenizer, prompt_ids)) + budget - 1
        if needed > self.max_len:
            raise ValueError(f"the sequence needs {needed} cache positions; this decoder's rows hold {self.max_len}")
        if len(self.rows) == self.capacity:
            raise RuntimeError(f"all {self.capacity} rows are running")
        slot, cache = len(self.rows), self.cache
        row = KVCache(cache.keys[:, slot : slot + 1], cache.values[:, slot : slot + 1])  # a view: writes land in place
        generator = make_generator(params.seed, self.device)
        with torch.inference_mode():
            tokens = torch.tensor([context_ids(self.tokenizer, prompt_ids)], dtype=torch.long, device=self.device)
            first = int(sample_next(prefill(self.model, tokens, row), params, generator, self.tokenizer.never_sampled))
        cache.lengths[slot] = tokens.shape[1]
        stream = CompletionStream(params.stop, self.tokenizer.stream_decoder())
        sequence = Sequence(len(prompt_ids), params, budget, generator, stream, slot, first, cached=tokens.shape[1])
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
        pending = [s.pending for s in self.rows]
        with torch.inference_mode():
            if self.cuda_graphs:
                if self._graphs is None:
                    self._graphs = DecodeGraphs(self.model, cache)
                logits = self._graphs(pending)
            else:
                span = max(s.cached for s in self.rows) + 1
                running = KVCache(cache.keys[:, :n], cache.values[:, :n], lengths=cache.lengths[:n], span=span)
                tokens = torch.tensor(pending, dtype=torch.long, device=self.device).view(n, 1)
                logits = self.model.last_logits(tokens, running)  # (n, vocab)
            for i, sequence in enumerate(self.rows):
                sequence.cached += 1
                sequence.pending = int(sample_next(logits[i : i + 1], sequence.params, sequence.generator,
                                                   self.tokenizer.never_sampled))


class DecodeGraphs:
    """The batched decode step at fixed batch sizes, replayed as CUDA graphs.

    A decode step of a small model is hundreds of short kernel launches; a CUDA graph replays them all
    with one. Graphs need fixed shapes and addresses, so a step of n running rows runs at the smallest
    bucket b ≥ n (1, 2, 4, ... up to the capacity) on views of the decoder's own cache (rows 0 .. b-1),
    with static token and length buffers and the attention span fixed at the cache's length (every
    position masked by the row's length, as a ragged step does). Rows n .. b-1 are padding: they hold
    token 0 at position 0 of free cache rows (a later prefill overwrites them), and their expert-usage
    counts are subtracted after the step. A graph is captured the first time its bucket (and usage-
    tracking state) is needed, after two warm-up steps whose cache writes are undone. On CPU the same
    padded step runs eagerly: what the tests check.
    """

    def __init__(self, model: nn.Module, cache: KVCache):
        self.model, self.cache = model, cache
        capacity = cache.keys.shape[1]
        self.buckets = sorted({min(2**i, capacity) for i in range(capacity.bit_length() + 1)})
        self.device = cache.keys.device
        self.tokens = torch.zeros(capacity, 1, dtype=torch.long, device=self.device)
        self.layers = list(getattr(model, "peer_layers", dict)().values())
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, pending: list[int]) -> torch.Tensor:
        """The next-token logits (n, vocab) of the n running rows, whose tokens are ``pending``."""
        n = len(pending)
        b = next(size for size in self.buckets if size >= n)
        self.tokens[:n, 0] = torch.tensor(pending, dtype=torch.long, device=self.device)
        self.tokens[n:b] = 0
        self.cache.lengths[n:b] = 0
        if self.device.type == "cuda":
            key = (b, tuple(layer.track_usage for layer in self.layers))
            if key not in self._graphs:
                self._graphs[key] = self._capture(b)
            graph, logits = self._graphs[key]
            graph.replay()
        else:
            logits = self._step(b)
        for layer in self.layers:
            if layer.track_usage and n < b:
                ids, counted = layer.last_usage
                layer.usage_counts.index_add_(0, ids[n:b].reshape(-1), -counted[n:b].reshape(-1))
        return logits[:n]

    def _step(self, b: int) -> torch.Tensor:
        cache = self.cache
        rows = KVCache(cache.keys[:, :b], cache.values[:, :b], lengths=cache.lengths[:b], span=cache.keys.shape[3])
        return self.model.last_logits(self.tokens[:b], rows)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        lengths = self.cache.lengths[:b].clone()
        counts = [layer.usage_counts.clone() for layer in self.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, autotuning)
            for _ in range(2):
                self._step(b)
                self.cache.lengths[:b] = lengths
        torch.cuda.current_stream().wait_stream(stream)
        for layer, saved in zip(self.layers, counts):
            layer.usage_counts.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(b)
        return graph, logits
