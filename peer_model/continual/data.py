"""Replay data: new windows mixed with earlier corpora's (:class:`MixedData`), and generative replay, the parent's
own samples for when earlier text is gone (:func:`sample_replay`)."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..generate import SamplingParams, decode_one_token, make_generator, prefill, sample_next
from ..model import PEERTransformer
from ..quantize import convert_linears
from ..tokenizer import window_start
from ..train import TokenData, id_dtype


class MixedData:
    """Windows from ``new`` and, each with probability ``replay_fraction``, from one of ``old``
    (chosen uniformly, so every earlier corpus is replayed alike). ``sample_batch`` returns TokenData's
    ``(inputs, targets)`` plus ``source`` (B,): -1 for the new corpus, else the index in ``old``;
    train() hands it to the loss function. Each window comes from its own source's ``sample_batch``, with
    that source's BOS (or none); all sources must share one rule (one tokenizer)."""

    def __init__(self, new: TokenData, old: Sequence[TokenData], replay_fraction: float):
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {replay_fraction}")
        if replay_fraction > 0 and not old:
            raise ValueError("replay needs at least one earlier corpus")
        if any(data.bos != new.bos for data in old):
            raise ValueError(f"the corpora start windows with different BOS ids ({new.bos}, "
                             f"{sorted({data.bos for data in old}, key=str)}): they were encoded by different "
                             "tokenizers")
        self.new, self.old, self.replay_fraction = new, list(old), replay_fraction

    def __len__(self) -> int:
        return len(self.new)

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.full((batch_size,), -1, dtype=torch.long)
        if self.old and self.replay_fraction > 0:
            replay = torch.rand(batch_size, generator=generator) < self.replay_fraction
            which = torch.randint(0, len(self.old), (batch_size,), generator=generator)
            source = torch.where(replay, which, source)
        inputs = torch.empty(batch_size, seq_len, dtype=torch.long)
        targets = torch.empty(batch_size, seq_len, dtype=torch.long)
        for index in source.unique().tolist():
            rows = torch.nonzero(source == index).squeeze(1)
            data = self.new if index < 0 else self.old[index]
            x, y = data.sample_batch(rows.numel(), seq_len, generator)
            inputs[rows], targets[rows] = x, y
        return inputs, targets, source



@torch.no_grad()
def sample_replay(model: PEERTransformer, windows: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                  batch_size: int = 128, weights: str = "bfloat16") -> TokenData:
    """Generative replay: ``windows`` texts of ``seq_len`` tokens sampled from ``model`` after its
    tokenizer's BOS (an empty context), ``batch_size`` at a time, one after another in one TokenData whose windows
    start as the tokenizer starts a context (:func:`~peer_model.tokenizer.window_start`). For when the earlier
    corpora's text is gone (deleted, or never stored): replaying a version's own generations, distilled against it,
    keeps what it knew in the spirit of SPIN's training on a previous version's samples. ``model`` is unchanged.

    The samples come from a copy of ``model`` whose linears outside the expert layers are in ``weights``
    (peer_model/quantize.py): a batched decode step is compute-bound, and oneDNN's bf16 product took 0.6× fp32's
    time here (the samples are the model's up to bf16 rounding, which BENCHMARKS.md measures at < 0.01% in bits
    per byte; the distillation teacher stays the fp32 parent)."""
    device = next(model.parameters()).device
    tokenizer = model.tokenizer
    params = SamplingParams(temperature=temperature)
    generator = make_generator(seed, device)
    if weights != "float32":
        model = convert_linears(copy.deepcopy(model), weights)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, windows, batch_size):
            count = min(batch_size, windows - start)
            cache = model.new_cache(count, min(model.config.max_seq_len, seq_len + 1))
            bos = torch.full((count, 1), tokenizer.bos_id, device=device)
            next_ids = sample_next(prefill(model, bos, cache), params, generator, tokenizer.never_sampled)
            sampled = [next_ids]
            for _ in range(seq_len - 1):
                next_ids = sample_next(decode_one_token(model, next_ids, cache), params, generator,
                                       tokenizer.never_sampled)
                sampled.append(next_ids)
            rows.append(torch.stack(sampled, dim=1).cpu())
    finally:
        model.train(was_training)
    return TokenData(torch.cat(rows).flatten().to(id_dtype(model.config.vocab_size)), window_start(tokenizer))
