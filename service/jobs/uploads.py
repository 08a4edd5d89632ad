"""Accepting text: corpus uploads and data streams become corpus rows, raw files and ingest jobs.

Everything is validated before anything is stored; the raw text is written to the store before the
transaction that records it commits, and the ingest job is dispatched only after that commit.
"""
from __future__ import annotations

import hashlib
import json

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..context import ServiceContext
from ..db.models import Corpus, Job, Stream, StreamDocument
from ..errors import InvalidInput, NotFound, PayloadTooLarge, StorageUnavailable
from .ingest import Upload, check_size
from .lease import create_job


def accept_corpus(ctx: ServiceContext, session: Session, name: str, upload: Upload, raw: str | bytes | bytearray,
                  fmt: str, train: bool, train_options: dict, source: str = "upload",
                  stream_id: int | None = None) -> tuple[Corpus, Job]:
    """Record a validated upload (``raw``: its text or UTF-8 bytes): corpus row (pending), raw file, ingest job.
    The caller commits and then dispatches the job."""
    corpus = Corpus(name=name, source=source, stream_id=stream_id, state="pending", sha256=upload.sha256,
                    raw_bytes=upload.raw_bytes, documents=upload.documents)
    session.add(corpus)
    session.flush()
    try:
        ctx.store.write_corpus(corpus.id, "raw", raw)
    except OSError as exc:  # the caller's transaction rolls back: no corpus row without its text
        raise StorageUnavailable(f"the store cannot take the corpus now ({exc.strerror or exc}); "
                                 f"nothing was stored, retry later") from None
    job = create_job(session, "ingest", [corpus.id],
                     {"format": fmt, "train": train, "train_options": train_options})
    return corpus, job


def stream_by_name(session: Session, name: str, create: bool = False) -> Stream:
    """The stream, its row locked for this transaction; with ``create``, made on first use. Two first uses at once
    both find none: the one whose insert loses on the unique name (in a savepoint) takes the other's stream."""
    query = select(Stream).where(Stream.name == name).with_for_update()
    stream = session.scalars(query).one_or_none()
    if stream is None:
        if not create:
            raise NotFound(f"stream {name!r} not found")
        try:
            with session.begin_nested():
                stream = Stream(name=name)
                session.add(stream)
        except IntegrityError:
            stream = session.scalars(query.execution_options(populate_existing=True)).one()
    return stream


def pending_bytes(session: Session, stream_id: int) -> tuple[int, int]:
    """(documents, bytes) appended to the stream and not yet turned into a corpus."""
    count, size = session.execute(select(func.count(StreamDocument.id), func.coalesce(func.sum(StreamDocument.bytes), 0))
                                  .where(StreamDocument.stream_id == stream_id, StreamDocument.corpus_id.is_(None))).one()
    return int(count), int(size)


def append_documents(ctx: ServiceContext, session: Session, name: str, documents: list[str]) -> Stream:
    settings = ctx.settings
    if len(documents) > settings.max_documents_per_request:
        raise InvalidInput(f"{len(documents)} documents in one request; the limit is "
                           f"{settings.max_documents_per_request} (PEER_MAX_DOCUMENTS_PER_REQUEST)")
    sizes = []
    for index, document in enumerate(documents):
        if not document.strip():
            raise InvalidInput(f"document {index} is empty")
        size = len(document.encode("utf-8", errors="surrogatepass"))
        check_size(size, settings.max_document_bytes, f"document {index}")
        sizes.append(size)
    stream = stream_by_name(session, name, create=True)
    count, pending = pending_bytes(session, stream.id)
    # past either limit the flush would refuse the stream's text as one corpus: the stream would be stuck
    if pending + sum(sizes) > settings.max_corpus_bytes:
        raise PayloadTooLarge(f"stream {name!r} holds {pending} bytes of untrained text; {sum(sizes)} more would "
                              f"pass PEER_MAX_CORPUS_BYTES ({settings.max_corpus_bytes}), the most one corpus takes: "
                              f"flush the stream first (POST /v1/streams/{name}/flush)")
    if count + len(documents) > settings.max_corpus_documents:
        raise InvalidInput(f"stream {name!r} holds {count} untrained documents; {len(documents)} more would pass "
                           f"PEER_MAX_CORPUS_DOCUMENTS ({settings.max_corpus_documents}), the most one corpus takes: "
                           f"flush the stream first (POST /v1/streams/{name}/flush)")
    session.add_all(StreamDocument(stream_id=stream.id, text=d, bytes=s) for d, s in zip(documents, sizes))
    session.flush()
    return stream


def flush_stream(ctx: ServiceContext, session: Session, stream: Stream, train_options: dict | None = None
                 ) -> tuple[Corpus, Job] | None:
    """Turn the stream's pending documents into a corpus with an ingest-then-train job; None if none. The
    documents were validated and bounded (bytes and count) by :func:`append_documents`: they are written as JSONL
    as they are read, never held as rows, and counted as the user's text, not their JSONL envelope."""
    pending = (select(StreamDocument.id, StreamDocument.text)
               .where(StreamDocument.stream_id == stream.id, StreamDocument.corpus_id.is_(None))
               .order_by(StreamDocument.id))
    raw, count, first, last = bytearray(), 0, None, None
    for document_id, text in session.execute(pending.execution_options(yield_per=1000)):
        raw += jsonl_line(text)
        count, first, last = count + 1, first or document_id, document_id
    if not count:
        return None
    upload = Upload(count, len(raw), hashlib.sha256(raw).hexdigest())
    corpus, job = accept_corpus(ctx, session, f"{stream.name} #{first}-{last}", upload, raw, "jsonl", True,
                                train_options or {}, source="stream", stream_id=stream.id)
    session.execute(update(StreamDocument).where(StreamDocument.stream_id == stream.id,
                                                 StreamDocument.corpus_id.is_(None), StreamDocument.id <= last)
                    .values(corpus_id=corpus.id))
    return corpus, job


def jsonl_line(text: str) -> bytes:
    """One document as a line of JSONL (the stored form of a stream's or a JSON upload's documents)."""
    return b'{"text": ' + json.dumps(text, ensure_ascii=False).encode("utf-8") + b"}\n"
