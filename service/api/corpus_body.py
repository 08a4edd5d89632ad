"""The JSON body of ``POST /v1/corpora``, read without holding its documents.

``{"name": ..., "documents": [...], "train": ..., "train_options": {...}}`` with a million two-character
documents is a list of a million Python strings, each ~50 bytes besides its text: parsed whole (as pydantic
does), 8 MiB of them raised the API's peak memory by 169 MB, and 40 such requests at once at PEER_MAX_CORPUS_BYTES
took the machine. Here the top-level object is walked with the standard library's JSON scanner: ``documents`` is
read one string at a time, counted against PEER_MAX_CORPUS_DOCUMENTS and its text (the user's bytes, not the
JSON or JSONL envelope) against PEER_MAX_CORPUS_BYTES as it goes, and written straight into the JSONL the store
keeps; every other field is decoded whole and validated by :class:`~service.api.schemas.TextCorpusRequest`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from json.decoder import scanstring

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..errors import InvalidInput
from ..jobs.ingest import Upload, check_documents, check_size, decode_utf8
from ..jobs.uploads import jsonl_line
from ..settings import Settings
from .schemas import TextCorpusRequest

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


@dataclass
class CorpusBody:
    """A validated JSON upload: the request's fields, and its text as it will be stored (``fmt``: text or jsonl)."""

    request: TextCorpusRequest
    raw: bytes | bytearray
    fmt: str
    upload: Upload | None  # counted and checked already (documents); None: the caller parses ``raw`` (text)


def read_corpus_body(body: bytes, settings: Settings) -> CorpusBody:
    """422 for malformed JSON or fields, a bad document or too many of them; 413 past PEER_MAX_CORPUS_BYTES."""
    text = decode_utf8(body, "the request body")
    fields: dict = {}
    documents: tuple[bytearray, Upload] | None = None
    try:
        at = _skip(text, 0)
        _expect(text, at, "{", "the body must be a JSON object")
        at = _skip(text, at + 1)
        while text[at:at + 1] != "}":
            _expect(text, at, '"', "expected a field name in double quotes")
            key, at = scanstring(text, at + 1, True)
            at = _skip(text, at)
            _expect(text, at, ":", "expected ':' after a field name")
            at = _skip(text, at + 1)
            if key == "documents" and text[at:at + 1] == "[":
                documents, at = _documents(text, at + 1, settings)
                fields.pop(key, None)
            else:
                fields[key], at = _DECODER.raw_decode(text, at)
                documents = None if key == "documents" else documents
            at = _skip(text, at)
            if text[at:at + 1] == ",":
                at = _skip(text, at + 1)
            elif text[at:at + 1] != "}":
                raise InvalidInput(f"invalid JSON body: expected ',' or '}}' at character {at}")
        if _skip(text, at + 1) != len(text):
            raise InvalidInput(f"invalid JSON body: extra data after character {at}")
    except ValueError as exc:  # JSONDecodeError, and an integer of more than 4,300 digits
        raise InvalidInput(f"invalid JSON body: {getattr(exc, 'msg', exc)}") from None
    except RecursionError:
        raise InvalidInput("invalid JSON body: nested too deeply") from None
    try:
        request = TextCorpusRequest.model_validate({**fields, "documents": [] if documents else fields.get("documents")})
    except ValidationError as exc:  # the app's handler words it (never echoing the input)
        raise RequestValidationError(exc.errors(include_url=False)) from None
    if (request.text is None) == (request.documents is None):
        raise InvalidInput('give exactly one of "text" and "documents"')
    if documents is not None:
        return CorpusBody(request, documents[0], "jsonl", documents[1])
    return CorpusBody(request, request.text.encode("utf-8"), "text", None)


def _skip(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()


def _expect(text: str, at: int, char: str, message: str) -> None:
    if text[at:at + 1] != char:
        raise InvalidInput(f"invalid JSON body: {message} (character {at})")


def _documents(text: str, at: int, settings: Settings) -> tuple[tuple[bytearray, Upload], int]:
    """The array of strings starting after its "[" at ``at``, as stored JSONL and its upload; and where it ends."""
    raw, count, size, blank = bytearray(), 0, 0, True
    at = _skip(text, at)
    while text[at:at + 1] != "]":
        _expect(text, at, '"', f"documents[{count}] must be a string")
        document, at = scanstring(text, at + 1, True)
        try:
            size += len(document.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"documents[{count}] is not valid Unicode: a lone surrogate at character "
                               f"{exc.start}") from None
        count += 1
        check_documents(count, settings.max_corpus_documents)
        check_size(size, settings.max_corpus_bytes)
        blank = blank and not document.strip()
        raw += jsonl_line(document)
        at = _skip(text, at)
        if text[at:at + 1] == ",":
            at = _skip(text, at + 1)
        elif text[at:at + 1] != "]":
            raise InvalidInput(f"invalid JSON body: expected ',' or ']' at character {at}")
    if not count:
        raise InvalidInput('"documents" must be a non-empty array of strings')
    if blank:
        raise InvalidInput("corpus is empty (no non-whitespace text)")
    return (raw, Upload(count, len(raw), hashlib.sha256(raw).hexdigest())), at + 1
