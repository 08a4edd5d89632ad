"""Byte-level UTF-8 tokenizer.

Every string is its UTF-8 bytes (ids 0..255) plus three special ids. Byte level needs no
vocabulary file to ship, train or version, never meets an out-of-vocabulary word, and a model
that keeps learning after deployment can take in any new text (any language, code, emoji)
without changing its embedding table. The price is longer sequences than a BPE.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259


def _byte_values(ids: Iterable[int]) -> bytes:
    """Keep only ids that are bytes; special and out-of-range ids carry no text."""
    return bytes(v for v in map(int, ids) if 0 <= v < 256)


class ByteTokenizer:
    """Maps text to UTF-8 byte ids and back; stateless, so one instance can be shared."""

    BOS = BOS
    EOS = EOS
    PAD = PAD
    vocab_size = VOCAB_SIZE

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
