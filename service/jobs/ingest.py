"""Corpus validation (synchronous, before anything is stored) and ingestion (in the worker).

Validation rejects what a user must fix: not UTF-8, empty, over the size limit. Ingestion normalises
(Unicode NFC, ``\\n`` line ends, no NUL or other C0 controls but tab and newline), drops exact duplicate
documents (paragraphs for plain text), and splits train/validation by whole blocks of lines.

The ingest job (:func:`run_ingest_job`): the validated upload in the store → normalised, de-duplicated
train/validation splits → the corpus is ready; optionally a training job follows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from peer_model.corpora import split_train_val

from ..context import ServiceContext
from ..db.models import Corpus, Job, utcnow
from ..db.session import transaction
from ..errors import InvalidInput, PayloadTooLarge
from .lease import Dispatch, JobCancelled, LeaseLost, claim_job, create_job, dispatch_job, owned_job
from .progress import Attempt
from .runner import finish_quietly

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


@dataclass(frozen=True)
class Upload:
    """A validated upload: how many documents it holds, its size and the checksum of its raw bytes. The
    documents themselves are read again at ingestion (:func:`upload_documents`): an upload is validated one
    document at a time, never held as a list (a list of millions of tiny documents is many times its text)."""

    documents: int
    raw_bytes: int
    sha256: str


def decode_utf8(data: bytes, what: str = "corpus") -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8: byte {exc.start} ({data[exc.start:exc.start + 1]!r}) "
                           f"cannot be decoded") from None
    return text.removeprefix("\ufeff")


def check_size(size: int, limit: int, what: str = "corpus") -> None:
    if size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes; the limit is {limit} bytes (setting PEER_MAX_CORPUS_BYTES)")


def check_documents(count: int, limit: int | None) -> None:
    if limit is not None and count > limit:
        raise InvalidInput(f"the corpus holds more than {limit} documents (PEER_MAX_CORPUS_DOCUMENTS): join short "
                           f"ones, or split the corpus")


def parse_upload(data: bytes, fmt: str, max_bytes: int, max_documents: int | None = None) -> Upload:
    """Validate an upload: ``fmt`` "text" (one document; paragraphs are de-duplicated at ingestion) or "jsonl"
    (one JSON object per line with a string field ``text``); at most ``max_bytes`` and ``max_documents``."""
    check_size(len(data), max_bytes)
    count, blank = 0, True
    for document in upload_documents(decode_utf8(data), fmt):
        count += 1
        check_documents(count, max_documents)
        blank = blank and not document.strip()
    if blank:
        raise InvalidInput("corpus is empty (no non-whitespace text)")
    return Upload(count, len(data), hashlib.sha256(data).hexdigest())


def upload_documents(text: str, fmt: str) -> Iterator[str]:
    """The documents of an upload's text, one at a time (InvalidInput for a malformed one)."""
    if fmt == "text":
        yield text
    elif fmt == "jsonl":
        yield from _jsonl_documents(text)
    else:
        raise InvalidInput(f"format must be 'text' or 'jsonl', got {fmt!r}")


def _lines(text: str) -> Iterator[str]:
    """``text``'s lines, ending at "\\n" only: str.splitlines also splits at U+2028, U+2029, U+0085 (and \\v, \\f,
    \\x1c-\\x1e), which JSON strings may hold raw (JSONL is written with ensure_ascii=False), so a document holding
    one was "not JSON". One line at a time: no list of every line."""
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _jsonl_documents(text: str) -> Iterator[str]:
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, and an integer of more than 4,300 digits
            raise InvalidInput(f"JSONL line {number} is not JSON: {getattr(exc, 'msg', exc)}") from None
        except RecursionError:
            raise InvalidInput(f"JSONL line {number} is not JSON: nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidInput(f'JSONL line {number} must be an object with a string field "text"')
        yield record["text"]


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text)


@dataclass(frozen=True)
class Ingested:
    train: str
    val: str
    paragraphs: int  # kept, after de-duplication
    duplicates_removed: int


def ingest_documents(documents: Iterable[str], val_fraction: float, seed: int = 0) -> Ingested:
    """Normalise, de-duplicate (documents, and paragraphs within plain text) and split."""
    seen: set[str] = set()
    kept: list[str] = []
    duplicates = 0
    for document in documents:
        for paragraph in _PARAGRAPH_BREAK.split(normalise(document)):
            key = paragraph.strip()
            if not key:
                continue
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append(paragraph.strip("\n") + "\n")
    if not kept:
        raise InvalidInput("corpus is empty after normalisation")
    train, val = split_train_val("\n".join(kept), val_fraction, seed)
    if not val:  # a text too short to split: evaluate on what we have rather than on nothing
        val = train
    return Ingested(train, val, len(kept), duplicates)


# ---- the ingest job ------------------------------------------------------------------------------


def run_ingest_job(ctx: ServiceContext, job_id: int, dispatch: Dispatch) -> None:
    settings = ctx.settings
    lease = claim_job(ctx.sessions, job_id, settings.job_max_attempts, settings.job_stale_seconds)
    if lease is None:
        return
    follow_up: Job | None = None
    try:
        with Attempt(ctx, job_id, lease):  # heartbeats while a large corpus is parsed and written
            with ctx.sessions() as session:
                job = session.get(Job, job_id)
                corpus_id, train_after = job.corpus_ids[0], bool(job.options.get("train", False))
                train_options = dict(job.options.get("train_options", {}))
                fmt = job.options.get("format", "text")
                raw = ctx.store.read_corpus_bytes(corpus_id, "raw")
            upload = parse_upload(raw, fmt, max(settings.max_corpus_bytes, len(raw)))  # accepted: counted, not limited
            result = ingest_documents(upload_documents(decode_utf8(raw), fmt), settings.val_fraction)
            ctx.store.write_corpus(corpus_id, "train", result.train)
            ctx.store.write_corpus(corpus_id, "val", result.val)
        with transaction(ctx.sessions) as session:
            job = owned_job(session, job_id, lease)
            if job.cancel_requested:  # cancelled while it ran: no corpus becomes ready, no training follows
                raise JobCancelled()
            corpus = session.get(Corpus, corpus_id)
            corpus.state, corpus.ingested_at = "ready", utcnow()
            corpus.duplicates_removed = result.duplicates_removed
            corpus.train_bytes, corpus.val_bytes = len(result.train.encode()), len(result.val.encode())
            job.state, job.progress, job.finished_at, job.lease = "succeeded", 1.0, utcnow(), None
            job.metrics = {"documents": upload.documents, "paragraphs": result.paragraphs,
                           "duplicates_removed": result.duplicates_removed}
            if train_after:
                follow_up = create_job(session, "train", [corpus_id], train_options)
                job.next_job_id = follow_up.id
    except LeaseLost:
        return
    except JobCancelled:
        finish_quietly(ctx, job_id, lease, "cancelled")  # the corpus fails with it (lease.close_job)
        return
    except InvalidInput as exc:
        _fail_ingest(ctx, job_id, lease, exc.message)
        return
    except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost in a log only
        log.exception("ingest job %s failed", job_id)
        _fail_ingest(ctx, job_id, lease, f"{type(exc).__name__}: {exc}")
        return
    if follow_up is not None:
        dispatch_job(ctx.sessions, dispatch, follow_up)


def _fail_ingest(ctx: ServiceContext, job_id: int, lease: str, error: str) -> None:
    finish_quietly(ctx, job_id, lease, "failed", error)  # the corpus fails with it (lease.close_job)
