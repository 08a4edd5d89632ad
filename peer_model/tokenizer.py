"""Tokenizers: the byte-level default, and what every tokenizer offers (:class:`Tokenizer`).

Byte level: every string is its UTF-8 bytes (ids 0..255) plus three special ids. Byte level needs no
vocabulary file to ship, train or version, never meets an out-of-vocabulary word, and a model
that keeps learning after deployment can take in any new text (any language, code, emoji)
without changing its embedding table. The price is longer sequences than a BPE.

A pretrained Hugging Face model brings its own ``tokenizer.json`` (:mod:`peer_model.hf.tokenizer`);
each model carries its tokenizer as ``model.tokenizer``, and generation, training and evaluation
take the ids they need (BOS, EOS, ids never sampled) from it rather than from the constants here.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259


def _byte_values(ids: Iterable[int]) -> bytes:
    """Keep only ids that are bytes; special and out-of-range ids carry no text."""
    return bytes(v for v in map(int, ids) if 0 <= v < 256)


class IncrementalDecoder(Protocol):
    """Ids arriving one at a time → text, released only once complete (never half a character)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(Protocol):
    """What the library needs of a model's tokenizer.

    ``add_bos``: the tokenizer's own rule, whether ``bos_id`` starts every context (training windows,
    evaluation windows, generation prompts: :func:`context_ids`); a context with nothing in it starts
    with ``bos_id`` either way. Generation stops on any of ``eos_ids`` and never samples
    ``never_sampled``; ``pad_id`` (None: the model has none) may fill positions a causal model never
    reads. ``encode`` adds no special ids; ``decode`` skips them and never raises. ``save`` writes what
    :func:`load_tokenizer` needs to rebuild the tokenizer.
    """

    kind: str
    vocab_size: int
    bos_id: int
    add_bos: bool
    eos_ids: frozenset[int]
    never_sampled: frozenset[int]
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def stream_decoder(self) -> IncrementalDecoder: ...

    def save(self, directory: Path) -> None: ...


class ByteTokenizer:
    """Maps text to UTF-8 byte ids and back; stateless, so one instance can be shared."""

    BOS = BOS
    EOS = EOS
    PAD = PAD
    kind = "byte"
    vocab_size = VOCAB_SIZE
    bos_id = BOS
    add_bos = True
    eos_ids = frozenset({EOS})
    never_sampled = frozenset({BOS, PAD})
    pad_id = PAD

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, BOS)
        if eos:
            ids.append(EOS)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Never raises: special/out-of-range ids are skipped, invalid UTF-8 becomes U+FFFD.

        Generated ids need not form valid UTF-8, so failing here would crash generation.
        Accepts anything iterable whose items convert with int() (lists, numpy, tensors).
        """
        return _byte_values(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder()

    def save(self, directory: Path) -> None:
        """Nothing to write: a directory without tokenizer.json loads as bytes (:func:`load_tokenizer`)."""


class StreamDecoder:
    """Turns ids produced one at a time into text as soon as each character is complete.

    A multibyte character arrives as several ids; the incremental decoder holds the first bytes
    back until the character completes (or turns out invalid, giving U+FFFD), so a stream never
    shows half a character. Ids that are not bytes are skipped, as in `ByteTokenizer.decode`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; return the text completed by it (often "")."""
        return self._decoder.decode(_byte_values([token_id]))

    def flush(self) -> str:
        """End the stream: an incomplete trailing sequence becomes U+FFFD. Resets the decoder."""
        return self._decoder.decode(b"", final=True)


def context_ids(tokenizer: Tokenizer, ids: Iterable[int]) -> list[int]:
    """``ids`` as the tokenizer starts a context: after its BOS when it adds one (``add_bos``), as they
    are otherwise; ``[bos_id]`` when there is nothing else to condition on."""
    ids = [int(i) for i in ids]
    return [tokenizer.bos_id, *ids] if tokenizer.add_bos or not ids else ids


def window_start(tokenizer: Tokenizer) -> int | None:
    """The id every training or evaluation window of this tokenizer's text starts with (its BOS), or
    None when its contexts start with the text itself (:class:`peer_model.train.TokenData`)."""
    return tokenizer.bos_id if tokenizer.add_bos else None


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer saved in ``directory``: the Hugging Face one when it holds ``tokenizer.json``,
    else bytes. ``tokenizers`` is imported only in the first case (byte-level models do not need it)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        from .hf.tokenizer import HFTokenizer

        return HFTokenizer.from_dir(directory)
    return ByteTokenizer()
