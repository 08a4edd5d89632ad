"""Invented facts for a fact-recall probe of continual training.

Each stage of a continual-training stream carries its own few hundred facts about invented places,
rivers and people, written as templated sentences ("The capital of Veltria is Oransk."). They are
embedded in that stage's training text (:func:`facts_text`); after every stage, :func:`fact_recall`
measures the fraction of every stage's facts whose greedy completion of the prompt ("The capital of
Veltria is") starts with the answer (" Oransk."). Nothing in any real corpus can give these away.

Everything is deterministic in ``(stage, count, seed)``. Subject names are distinct across all stages
of one seed by construction: a subject name spells a scrambled, bijective encoding of
``stage * MAX_FACTS_PER_STAGE + index`` in syllables, so two facts never share a subject (and so never
share a prompt); answers are drawn at random and may repeat.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .generate import SamplingParams, generate_text, mask_unsampleable
from .tokenizer import ByteTokenizer, Tokenizer, context_ids
from .train import id_dtype

MAX_FACTS_PER_STAGE = 50_000

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "st", "tr", "th", "sh", "ch", "vel"]
_VOWELS = ["a", "e", "i", "o", "u", "ia", "ae", "ou"]
# 24 onsets × 8 vowels = 192 syllables; 3 syllables = 7,077,888 distinct subject names
_SYLLABLES = [o + v for o in _ONSETS for v in _VOWELS]
_SUBJECT_SYLLABLES = 3
_SPACE = len(_SYLLABLES) ** _SUBJECT_SYLLABLES
_MULTIPLIER = 1_000_003  # odd and not a multiple of 3: coprime to 192**3 = 2**18 * 3**3, so n -> a·n + b is a bijection
_ENDINGS = ["", "", "n", "sk", "r", "th", "l", "m"]


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # with {subject}
    answer_kind: str  # what the answer names: flavours its spelling


TEMPLATES: tuple[Template, ...] = (
    Template("capital", "The capital of {subject} is", "city"),
    Template("founder", "{subject} was founded by", "person"),
    Template("river", "The river {subject} flows into", "sea"),
    Template("language", "The people of {subject} speak", "language"),
    Template("birthplace", "The poet {subject} was born in", "city"),
    Template("currency", "The currency of {subject} is the", "coin"),
)

_ANSWER_SUFFIX = {"city": "", "person": "", "sea": " Sea", "language": "ish", "coin": "k"}


@dataclass(frozen=True)
class Fact:
    stage: int
    template: str
    subject: str
    prompt: str  # "The capital of Veltria is"
    answer: str  # " Oransk." (leading space and final full stop included)

    @property
    def sentence(self) -> str:
        return self.prompt + self.answer


def _subject_name(stage: int, index: int, seed: int) -> str:
    n = stage * MAX_FACTS_PER_STAGE + index
    if n >= _SPACE:
        raise ValueError(f"stage {stage} is beyond the {(_SPACE // MAX_FACTS_PER_STAGE)} stages the names can encode")
    offset = random.Random(f"facts-offset:{seed}").randrange(_SPACE)
    order = random.Random(f"facts-syllables:{seed}").sample(_SYLLABLES, len(_SYLLABLES))
    code = (n * _MULTIPLIER + offset) % _SPACE
    parts = []
    for _ in range(_SUBJECT_SYLLABLES):
        code, digit = divmod(code, len(order))
        parts.append(order[digit])
    return "".join(parts).capitalize()


def _answer_name(rng: random.Random, kind: str) -> str:
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
    word = (word + rng.choice(_ENDINGS)).capitalize()
    if kind == "person":
        word = f"{''.join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()} {word}"
    return word + _ANSWER_SUFFIX[kind]


def make_facts(stage: int, count: int, seed: int = 0) -> list[Fact]:
    """``count`` invented facts for ``stage`` (templates in turn); same arguments, same facts.

    Subjects (and so prompts) never repeat within a seed, across stages included.
    """
    if not isinstance(stage, int) or stage < 0:
        raise ValueError(f"stage must be an integer >= 0, got {stage!r}")
    if not isinstance(count, int) or not 0 <= count <= MAX_FACTS_PER_STAGE:
        raise ValueError(f"count must be an integer in [0, {MAX_FACTS_PER_STAGE}], got {count!r}")
    rng = random.Random(f"facts-answers:{seed}:{stage}")
    facts = []
    for index in range(count):
        template = TEMPLATES[index % len(TEMPLATES)]
        subject = _subject_name(stage, index, seed)
        answer = " " + _answer_name(rng, template.answer_kind) + "."
        facts.append(Fact(stage, template.name, subject, template.prompt.format(subject=subject), answer))
    return facts


def facts_text(facts: Sequence[Fact], repeats: int = 1, seed: int = 0) -> str:
    """Each fact's sentence ``repeats`` times, in a seeded random order, one sentence per line."""
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    sentences = [f.sentence for f in facts for _ in range(repeats)]
    random.Random(f"facts-text:{seed}").shuffle(sentences)
    return "".join(s + "\n" for s in sentences)


def facts_tokens(facts: Sequence[Fact], repeats: int = 1, seed: int = 0,
                 tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """The sentences of :func:`facts_text` as ids of ``tokenizer`` (default bytes), each one a context of
    its own (:func:`~peer_model.tokenizer.context_ids`: after its BOS when the tokenizer adds one; 1-D,
    int16 unless the vocabulary needs int32).

    Recall prompts start with BOS when the tokenizer adds one (generation does). Training windows start
    with it too, but a fact sentence mostly sits mid-window; a BOS before each sentence lets the model
    see the probe's exact context. (Before training windows started with BOS, a model trained on plain sentences was
    measured to complete "<BOS>The capital of X is" with garbage bytes.) Append these to a stage's
    corpus tokens.
    """
    tokenizer = tokenizer or ByteTokenizer()
    ids: list[int] = []
    for line in facts_text(facts, repeats, seed).splitlines(keepends=True):
        ids.extend(context_ids(tokenizer, tokenizer.encode(line)))
    return torch.tensor(ids, dtype=id_dtype(tokenizer.vocab_size))


@torch.no_grad()
def fact_recall(model: nn.Module, facts: Sequence[Fact], tokenizer: Tokenizer | None = None,
                batch_size: int = 64, method: str = "batched") -> float:
    """Fraction of ``facts`` whose greedy completion of ``prompt`` starts with ``answer``.

    ``tokenizer`` defaults to the model's own (``model.tokenizer``), here and in the functions below.
    ``method="generate"`` runs :func:`peer_model.generate.generate_text` (temperature 0) per fact.
    ``method="batched"`` (default) gives the same answer from one teacher-forced forward pass per
    batch: greedy decoding starts with the answer exactly when, at each answer position, the argmax
    over the allowed ids (the tokenizer's ``never_sampled`` masked, as ``sample_next`` does) is the
    answer's next token — an EOS or any other token there would have diverged. Rows are right-padded,
    which a causal model never sees. The two can differ only on a near-tie that float rounding of cached
    vs. full-window attention flips. (With a BPE, the answer is taken as tokenized on its own, which is
    how a generation that reproduces it token for token would spell it.)
    """
    if not facts:
        raise ValueError("no facts to probe")
    tokenizer = tokenizer or model.tokenizer
    if method == "generate":
        return _recall_generate(model, facts, tokenizer)
    if method != "batched":
        raise ValueError(f"method must be 'batched' or 'generate', got {method!r}")
    return sum(recalled(model, facts, tokenizer, batch_size)) / len(facts)


def recalled(model: nn.Module, facts: Sequence[Fact], tokenizer: Tokenizer | None = None,
             batch_size: int = 64) -> list[bool]:
    """Per fact: does greedy decoding reproduce the answer? (The batched method of :func:`fact_recall`.)"""
    return [logits.argmax(dim=-1).tolist() == answer
            for logits, answer in _answer_logits(model, facts, tokenizer, batch_size, mask=True)]


def answer_bits(model: nn.Module, facts: Sequence[Fact], tokenizer: Tokenizer | None = None,
                batch_size: int = 64) -> list[float]:
    """Per fact: bits per byte of the answer given the prompt's context (teacher-forced, the full softmax): the
    answer tokens' bits over its UTF-8 bytes.

    Greedy recall is all or nothing: a fact whose answer became ten times likelier but is still not
    the argmax counts 0. The answer's bits are the graded form of the same probe. Compared with the
    bits of facts the model never saw (same templates, unseen subjects: :func:`make_facts` of a stage
    not trained on), they measure how much of a stage's facts a model holds even where recall is 0.
    """
    out = []
    for fact, (logits, answer) in zip(facts, _answer_logits(model, facts, tokenizer, batch_size, mask=False)):
        nats = torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="mean")
        tokens_per_byte = len(answer) / len(fact.answer.encode("utf-8"))  # exactly 1 for bytes
        out.append(float(nats) * tokens_per_byte / math.log(2))
    return out


def _answer_logits(model: nn.Module, facts: Sequence[Fact], tokenizer: Tokenizer | None, batch_size: int,
                   mask: bool) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Per fact, in order: the float logits (len(answer), vocab) that predict each answer token, and the
    answer's ids. One forward pass per ``batch_size`` facts, rows right-padded (a causal model never
    sees the padding); ``mask``: the never-sampled ids masked as generation does."""
    tokenizer = tokenizer or model.tokenizer
    pad = tokenizer.bos_id if tokenizer.pad_id is None else tokenizer.pad_id  # any id: never read
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(facts), batch_size):
                group = facts[start : start + batch_size]
                prompts = [tokenizer.encode(f.prompt) for f in group]
                answers = [tokenizer.encode(f.answer) for f in group]
                rows = [[*context_ids(tokenizer, p), *a] for p, a in zip(prompts, answers)]
                width = max(len(r) for r in rows)
                if width - 1 > max_len:  # the last answer token is predicted, never fed
                    raise ValueError(f"a fact needs {width - 1} positions; the model has {max_len}")
                tokens = torch.full((len(rows), width - 1), pad, dtype=torch.long)
                for i, row in enumerate(rows):
                    tokens[i, : len(row) - 1] = torch.tensor(row[:-1])
                logits = model(tokens.to(device)).float().cpu()
                if mask:
                    logits = mask_unsampleable(logits, tokenizer.never_sampled)
                for i, (row, a) in enumerate(zip(rows, answers)):
                    first = len(row) - len(a) - 1  # position of the last prompt token
                    yield logits[i, first : first + len(a)], a
    finally:
        model.train(was_training)


def _recall_generate(model: nn.Module, facts: Sequence[Fact], tokenizer: Tokenizer) -> float:
    hits = 0
    for fact in facts:
        n = len(tokenizer.encode(fact.answer))
        result = generate_text(model, tokenizer, fact.prompt, SamplingParams(max_tokens=n + 2, temperature=0.0))
        hits += result.text.startswith(fact.answer)
    return hits / len(facts)


__all__ = ["Fact", "Template", "TEMPLATES", "make_facts", "facts_text", "facts_tokens", "fact_recall", "recalled", "answer_bits"]
