"""Data streams: documents are appended; past a threshold of untrained text a training job starts."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import AfterValidator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...db.models import Corpus, Stream, StreamDocument
from ...errors import Conflict
from ...jobs.lease import dispatch_job
from ...jobs.uploads import append_documents, flush_stream, pending_bytes, stream_by_name
from ...store.lock import store_write
from ..deps import get_ctx, get_dispatch, get_session
from ..schemas import CorpusOut, DocumentsRequest, JobOut
from ..security import Caller, require_scope
from ..text import STREAM_NAME_MAX, storable

router = APIRouter(tags=["streams"])
StreamName = Annotated[str, Path(min_length=1, max_length=STREAM_NAME_MAX), AfterValidator(storable)]


def stream_view(session: Session, stream: Stream) -> dict:
    documents, size = pending_bytes(session, stream.id)
    total = session.scalar(select(func.count(StreamDocument.id)).where(StreamDocument.stream_id == stream.id))
    corpus_ids = session.scalars(select(Corpus.id).where(Corpus.stream_id == stream.id).order_by(Corpus.id)).all()
    return {"name": stream.name, "id": stream.id, "created_at": stream.created_at.isoformat(),
            "pending_documents": documents, "pending_bytes": size, "total_documents": int(total),
            "corpus_ids": list(corpus_ids)}


def _flushed(result) -> dict | None:
    if result is None:
        return None
    corpus, job = result
    return {"corpus": CorpusOut.model_validate(corpus).model_dump(mode="json"),
            "job": JobOut.model_validate(job).model_dump(mode="json")}


@router.post("/v1/streams/{name}/documents", status_code=202)
def add_documents(name: StreamName, body: DocumentsRequest, ctx=Depends(get_ctx),
                  session: Session = Depends(get_session), dispatch=Depends(get_dispatch),
                  caller: Caller = Depends(require_scope("train"))):
    """Append documents (the stream is created on first use). When the stream's untrained text reaches
    PEER_STREAM_TRAIN_THRESHOLD_BYTES, it becomes a corpus and an ingest-then-train job starts."""
    stream = append_documents(ctx, session, name, body.documents)
    with store_write(ctx, session):  # a flush writes the corpus' text: held to the commit of its row (store/lock.py)
        flushed = None
        if pending_bytes(session, stream.id)[1] >= ctx.settings.stream_train_threshold_bytes:
            flushed = flush_stream(ctx, session, stream)
        result = {"stream": stream_view(session, stream), "flushed": _flushed(flushed)}
        session.commit()
    if flushed:
        dispatch_job(ctx.sessions, dispatch, flushed[1])
    return result


@router.post("/v1/streams/{name}/flush", status_code=202)
def flush(name: StreamName, ctx=Depends(get_ctx), session: Session = Depends(get_session),
          dispatch=Depends(get_dispatch), caller: Caller = Depends(require_scope("train"))):
    """Start training on the stream's untrained documents now (409 when there are none)."""
    stream = stream_by_name(session, name)
    with store_write(ctx, session):  # from the corpus' text to its row's commit (store/lock.py)
        flushed = flush_stream(ctx, session, stream)
        if flushed is None:
            raise Conflict(f"stream {name!r} has no untrained documents")
        result = {"stream": stream_view(session, stream), "flushed": _flushed(flushed)}
        session.commit()
    dispatch_job(ctx.sessions, dispatch, flushed[1])
    return result


@router.get("/v1/streams", dependencies=[Depends(require_scope("read"))])
def list_streams(session: Session = Depends(get_session)):
    return [stream_view(session, s) for s in session.scalars(select(Stream).order_by(Stream.id)).all()]


@router.get("/v1/streams/{name}", dependencies=[Depends(require_scope("read"))])
def get_stream(name: StreamName, session: Session = Depends(get_session)):
    return stream_view(session, stream_by_name(session, name))
