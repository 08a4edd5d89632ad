"""A probe: fixed questions with checkable answers, scored by greedy generation.

A probe tells what a version learnt and what it kept: invented facts a corpus taught it (kind "facts"), and
questions the base already answered correctly (kind "general", "arithmetic", ...) whose score falls when
training makes the model forget. A probe file is JSONL, one question per line::

    {"prompt": "The capital of Veltria is", "answer": "Oransk", "kind": "facts"}
    {"prompt": "Q: What is 2 + 2?\\nA:", "answer": "4", "kind": "arithmetic"}

:func:`probe_answers` continues every prompt greedily, batched through the serving engine's decoder
(:class:`~peer_model.batching.BatchDecoder`, the same prefill and decode steps as
:func:`~peer_model.generate.generate`); :func:`is_correct` decides each answer by exact match after
normalisation, and :func:`score_probe` counts them per kind.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .batching import BatchDecoder
from .generate import SamplingParams
from .tokenizer import Tokenizer, context_ids

MAX_ITEMS = 10_000
MAX_KIND_LENGTH = 64
ALL = "all"  # the key of every item's score in :func:`score_probe`, so no item's kind may be named so
_FIELDS = ("prompt", "answer", "kind")


@dataclass(frozen=True)
class ProbeItem:
    """One question: the model continues ``prompt``; the continuation should start with ``answer``.
    ``kind`` is a free label (e.g. "facts", "general", "arithmetic"): scores are given per kind."""

    prompt: str
    answer: str
    kind: str = "general"


def parse_probe(text: str, max_items: int = MAX_ITEMS) -> list[ProbeItem]:
    """The items of a JSONL probe: one object per line with "prompt" and "answer" (non-empty strings) and an
    optional "kind" (a label of at most 64 printable characters, not "all"); blank lines are skipped. Raises ValueError
    naming the line for invalid JSON, a missing, empty or non-string field, an unknown field (a misspelt "kind"
    would silently score as "general"), an empty probe or more than ``max_items`` items."""
    items: list[ProbeItem] = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        if len(items) == max_items:
            raise ValueError(f"line {number}: the probe holds more than {max_items} items")
        items.append(_parse_item(line, number))
    if not items:
        raise ValueError('the probe holds no item: one JSON object per line, {"prompt": ..., "answer": ...}')
    return items


def _parse_item(line: str, number: int) -> ProbeItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f'line {number}: expected an object with "prompt" and "answer", got {type(obj).__name__}')
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise ValueError(f"line {number}: unknown field(s) {unknown}; an item has {list(_FIELDS)}")
    for name in ("prompt", "answer"):
        if name not in obj:
            raise ValueError(f'line {number}: "{name}" is missing')
    for name, value in obj.items():
        if not isinstance(value, str):
            raise ValueError(f'line {number}: "{name}" must be a string, got {type(value).__name__}')
        if not value.strip():
            raise ValueError(f'line {number}: "{name}" is empty')
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f'line {number}: "{name}" is not valid Unicode (a lone surrogate)') from None
    kind = obj.get("kind")
    if kind is not None and (len(kind) > MAX_KIND_LENGTH or kind == ALL or not kind.isprintable()):
        raise ValueError(f'line {number}: "kind" must be a label of at most {MAX_KIND_LENGTH} printable characters, '
                         f'not "{ALL}"')
    return ProbeItem(**obj)


def load_probe(path: str | os.PathLike[str], max_items: int = MAX_ITEMS) -> list[ProbeItem]:
    """The probe in the UTF-8 JSONL file at ``path`` (:func:`parse_probe`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_probe(text, max_items)


def probe_answers(model: nn.Module, tokenizer: Tokenizer, items: Sequence[ProbeItem], max_new_tokens: int | None = None,
                  batch_size: int = 16, on_item: Callable[[int, int], None] | None = None) -> list[str]:
    """The greedy continuation of every item's prompt, in order.

    ``tokenizer`` encodes the prompts and measures the answers (normally ``model.tokenizer``, whose rules the
    generation follows: the BOS that starts a context, the EOS ids that end it). ``max_new_tokens`` defaults to
    the longest answer's token count + 2: enough to reproduce any answer and see what follows it
    (:func:`is_correct`). ``batch_size`` sequences decode together, each cache row only as long as the longest
    item needs; a prompt that does not fit the model's context raises ValueError. ``on_item(done, total)``
    after each item (progress; it may raise to stop). Eval mode throughout; the model's mode is restored.
    """
    if not items:
        return []
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(item.answer)) for item in items) + 2
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    prompts = [tokenizer.encode(item.prompt) for item in items]
    longest = max(len(context_ids(tokenizer, p)) for p in prompts) + max_new_tokens - 1
    was_training = model.training
    model.eval()
    try:
        decoder = BatchDecoder(model, min(batch_size, len(items)), max_len=min(longest, model.config.max_seq_len))
        pieces: list[list[str]] = [[] for _ in items]
        owner = {}
        waiting = list(range(len(items)))[::-1]
        done = 0
        while waiting or len(decoder):
            while waiting and len(decoder) < decoder.capacity:
                index = waiting.pop()
                owner[decoder.add(prompts[index], params)] = index
            for sequence, step in decoder.step():
                pieces[owner[sequence]].append(step.text)
                if step.finish_reason is not None:
                    del owner[sequence]
                    done += 1
                    if on_item is not None:
                        on_item(done, len(items))
    finally:
        model.train(was_training)
    return ["".join(p) for p in pieces]


def is_correct(answer: str, generated: str) -> bool:
    """Exact match after normalisation: ``generated`` with its leading whitespace removed starts with ``answer``
    stripped of surrounding whitespace, compared case-insensitively, and the character after it (if any) is not a
    letter or digit, so "4" does not match "42" nor "Paris" "Parisian", while "Paris." and "4 apples" match.
    What the model says after the answer is not judged. Raises ValueError for an answer that is only whitespace."""
    expected = answer.strip()
    if not expected:
        raise ValueError("the answer is empty")
    text = generated.lstrip()
    if text[: len(expected)].casefold() != expected.casefold():
        return False
    rest = text[len(expected):]
    return not rest or not rest[0].isalnum()


def score_probe(model: nn.Module, tokenizer: Tokenizer, items: Sequence[ProbeItem], **kw) -> dict[str, dict]:
    """Per kind (in the order kinds first appear), then "all": {"correct": n, "total": n, "accuracy": correct /
    total} of the greedy answers (:func:`probe_answers`, which takes ``kw``) judged by :func:`is_correct`."""
    answers = probe_answers(model, tokenizer, items, **kw)
    counts: dict[str, list[int]] = {}
    for item, generated in zip(items, answers):
        for key in (item.kind, ALL):
            count = counts.setdefault(key, [0, 0])
            count[0] += is_correct(item.answer, generated)
            count[1] += 1
    counts[ALL] = counts.pop(ALL, [0, 0])  # last
    return {kind: {"correct": c, "total": t, "accuracy": c / t if t else 0.0} for kind, (c, t) in counts.items()}


__all__ = ["ProbeItem", "MAX_ITEMS", "parse_probe", "load_probe", "probe_answers", "is_correct", "score_probe"]
