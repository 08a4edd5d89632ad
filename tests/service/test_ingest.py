"""Upload validation (what a user must fix) and ingestion (normalise, de-duplicate, split)."""
from __future__ import annotations

import json

import pytest

from service.errors import InvalidInput, PayloadTooLarge
from service.jobs.ingest import ingest_documents, normalise, parse_upload, upload_documents


def test_valid_text_and_jsonl_uploads_keep_their_documents():
    text = parse_upload("Première ligne.\n".encode(), "text", 100)
    assert text.documents == 1 and text.raw_bytes == 17 and len(text.sha256) == 64
    assert list(upload_documents("Première ligne.\n", "text")) == ["Première ligne.\n"]
    lines = "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])).encode()
    assert parse_upload(lines, "jsonl", 1000).documents == 2
    assert list(upload_documents(lines.decode(), "jsonl")) == ["one", "two"]
    with pytest.raises(InvalidInput, match="PEER_MAX_CORPUS_DOCUMENTS"):
        parse_upload(lines, "jsonl", 1000, max_documents=1)


@pytest.mark.parametrize("data, fmt, error, words", [
    (b"\xff\xfeabc", "text", InvalidInput, "not valid UTF-8: byte 0"),
    (b"ok \xc3", "text", InvalidInput, "byte 3"),
    (b"  \n\t ", "text", InvalidInput, "empty"),
    (b"", "text", InvalidInput, "empty"),
    (b'{"text": "a"}\nnot json\n', "jsonl", InvalidInput, "line 2 is not JSON"),
    (b'{"body": "a"}\n', "jsonl", InvalidInput, 'string field "text"'),
    (b"x" * 101, "text", PayloadTooLarge, "limit is 100 bytes"),
    (b"abc", "csv", InvalidInput, "format must be"),
])
def test_bad_uploads_are_refused_with_a_message(data, fmt, error, words):
    with pytest.raises(error, match=words):
        parse_upload(data, fmt, 100)


def test_normalise_line_ends_unicode_and_control_characters():
    assert normalise("a\r\nb\rc") == "a\nb\nc"
    assert normalise("cafe\u0301") == "café"  # NFC
    assert normalise("a\x00b\x07c\td\n") == "abc\td\n"


def test_ingest_drops_duplicate_paragraphs_and_splits_by_blocks():
    paragraphs = [f"Paragraph {i} says something about topic {i % 7}." for i in range(300)]
    documents = ["\n\n".join(paragraphs), "\n\n".join(paragraphs[:50])]  # 50 repeats across documents
    result = ingest_documents(documents, val_fraction=0.1)
    assert result.paragraphs == 300 and result.duplicates_removed == 50
    kept = [p for p in (result.train + "\n" + result.val).split("\n") if p]
    assert sorted(kept) == sorted(paragraphs)  # every paragraph exactly once, in train or val
    assert 0.03 < len(result.val) / (len(result.train) + len(result.val)) < 0.2


def test_ingest_refuses_text_that_normalises_to_nothing():
    with pytest.raises(InvalidInput, match="empty"):
        ingest_documents(["\x00\x01\n\n\x02"], val_fraction=0.1)
