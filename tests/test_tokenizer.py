import random

import pytest

from peer_model import tokenizer as tok_mod
from peer_model.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer, StreamDecoder

SAMPLES = [
    "",
    "hello, world",
    "\x00nul\x00inside",
    "tabs\tand\nnewlines\r\n",
    "日本語のテキスト",
    "中文字符",
    "emoji 🙂👍🏽 and flags 🇩🇪",
    "e\u0301 combining, a\u0308, Z\u0335\u0321",
    "mixed: café – naïve – Привет – مرحبا",
    "\U0010ffff max code point",
]


def random_unicode(rng: random.Random, length: int) -> str:
    chars = []
    while len(chars) < length:
        cp = rng.randrange(0x110000)
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def test_constants():
    assert (BOS, EOS, PAD, VOCAB_SIZE) == (256, 257, 258, 259)
    assert (ByteTokenizer.BOS, ByteTokenizer.EOS, ByteTokenizer.PAD) == (BOS, EOS, PAD)
    assert ByteTokenizer.vocab_size == tok_mod.VOCAB_SIZE


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1234)
    for _ in range(200):
        text = random_unicode(rng, rng.randrange(0, 50))
        assert tok.decode(tok.encode(text)) == text


def test_bos_eos_placement(tok):
    assert tok.encode("ab", bos=True) == [BOS, 97, 98]
    assert tok.encode("ab", eos=True) == [97, 98, EOS]
    assert tok.encode("ab", bos=True, eos=True) == [BOS, 97, 98, EOS]
    assert tok.encode("", bos=True, eos=True) == [BOS, EOS]


def test_decode_skips_special_and_out_of_range(tok):
    ids = [BOS, 104, PAD, 105, EOS, -1, 10_000, VOCAB_SIZE]
    assert tok.decode(ids) == "hi"


def test_decode_invalid_utf8_does_not_raise(tok):
    out = tok.decode([0xFF, 0xFE, 0xC3])
    assert out and set(out) == {"\ufffd"}
    assert tok.decode([0x61, 0xC3, 0x62]) == "a\ufffdb"


def test_decode_accepts_int_like_items(tok):
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([104, 105, BOS])) == "hi"


def test_stream_decoder_byte_by_byte():
    text = "naïve 日本 🙂👍🏽 e\u0301"
    dec = StreamDecoder()
    pieces = [dec.push(i) for i in ByteTokenizer().encode(text, bos=True, eos=True)]
    assert "".join(pieces) + dec.flush() == text
    # A multibyte character is emitted whole, by the push of its last byte.
    assert "🙂" in pieces
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_random_matches_decode():
    rng = random.Random(7)
    tok = ByteTokenizer()
    for _ in range(50):
        text = random_unicode(rng, 20)
        dec = StreamDecoder()
        assert "".join(dec.push(i) for i in tok.encode(text)) + dec.flush() == text


def test_stream_decoder_flush_incomplete_tail():
    dec = StreamDecoder()
    first = "€".encode("utf-8")[:2]  # 3-byte character cut short
    assert dec.push(0x41) == "A"
    assert [dec.push(b) for b in first] == ["", ""]
    assert dec.flush() == "\ufffd"
    # flush resets the decoder, so it can be reused
    assert dec.push(0x42) == "B"
    assert dec.flush() == ""


def test_stream_decoder_invalid_sequence_is_released():
    dec = StreamDecoder()
    assert dec.push(0xC3) == ""
    # 'A' cannot continue the sequence: the held byte becomes U+FFFD right away
    assert dec.push(0x41) == "\ufffdA"
    assert dec.push(0xFF) == "\ufffd"
