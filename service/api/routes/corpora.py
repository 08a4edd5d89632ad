"""Corpora: upload (JSON, multipart file, plain text or JSONL body), listing, forgetting on request."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from ...db.models import Corpus
from ...errors import Conflict, InvalidInput, NotFound
from ...jobs.forget import segments_to_mask
from ...jobs.ingest import Upload, parse_upload
from ...jobs.lease import create_job, dispatch_job
from ...jobs.options import parse_forget_options, validate_job_options
from ...jobs.probes import check_probe_option
from ...jobs.uploads import accept_corpus
from ...store.lock import store_write
from ...store.retention import delete_corpus
from ...store.versions import active_version_id, get_version, live_version
from ..corpus_body import read_corpus_body
from ..deps import get_ctx, get_dispatch, get_session
from ..schemas import CorpusAccepted, CorpusOut, ForgetRequest, IdPath, JobOut, Offset, TextCorpusRequest
from ..security import Caller, check_activation_right, require_scope
from ..text import NAME_MAX, check_storable

router = APIRouter(tags=["corpora"])

UPLOAD_BODY = {"requestBody": {"content": {
    "application/json": {"schema": TextCorpusRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
        "format": {"type": "string", "enum": ["text", "jsonl"]}, "train": {"type": "boolean"}}}},
    "text/plain": {"schema": {"type": "string"}},
    "application/jsonl": {"schema": {"type": "array", "items": {
        "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
        "description": 'one {"text": ...} object per line'}},
}}}


def _flag(value: str | bool | None, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"train must be true or false, got {value!r}")


@router.post("/v1/corpora", status_code=202, response_model=CorpusAccepted, openapi_extra=UPLOAD_BODY)
async def upload_corpus(request: Request, name: Annotated[str | None, Query(max_length=NAME_MAX)] = None,
                        train: bool | None = Query(None), ctx=Depends(get_ctx), session: Session = Depends(get_session),
                        dispatch=Depends(get_dispatch), caller: Caller = Depends(require_scope("train"))):
    """Accept a corpus; 202 with the corpus (pending) and its ingest job. Once ingested, a training job
    follows unless ``train=false``. Invalid text (not UTF-8, empty, malformed JSONL) is a 422, a corpus over
    PEER_MAX_CORPUS_BYTES a 413; nothing is stored then."""
    limit = ctx.settings.max_corpus_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    train_options: dict = {}
    counted: Upload | None = None  # JSON documents are counted and checked as they are read
    if content_type == "application/json":
        raw = await request.body()  # bounded by api/bodylimit.py, as every body below
        body = await run_in_threadpool(read_corpus_body, raw, ctx.settings)
        del raw
        data, fmt, counted = body.raw, body.fmt, body.upload
        name, train, train_options = body.request.name, body.request.train, body.request.train_options
    elif content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)  # files spool to disk, not to memory
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput('multipart upload needs a file field named "file"')
        data = await upload.read(limit + 1)
        fmt = str(form.get("format") or ("jsonl" if (upload.filename or "").endswith(".jsonl") else "text"))
        name = str(form.get("name") or name or upload.filename or "upload")
        train = _flag(form.get("train"), True if train is None else train)
    elif content_type in ("text/plain", "application/jsonl", "application/x-ndjson"):
        data = await request.body()
        fmt = "text" if content_type == "text/plain" else "jsonl"
    else:
        raise InvalidInput(f"unsupported content type {content_type or 'none'!r}: use application/json, "
                           f"multipart/form-data, text/plain or application/jsonl")
    check_activation_right(ctx.settings, caller, train_options)
    if not name:
        raise InvalidInput("a corpus needs a name (query parameter ?name=...)")
    if len(name) > NAME_MAX:  # a form field or a file name: the query parameter and JSON are checked by their schema
        raise InvalidInput(f"a corpus name has at most {NAME_MAX} characters; this one has {len(name)}")
    check_storable(name, "the corpus name")
    train = True if train is None else train

    def store() -> dict:  # parsing, fsync and commit of up to PEER_MAX_CORPUS_BYTES: off the event loop
        parsed = counted or parse_upload(data, fmt, limit, ctx.settings.max_corpus_documents)
        active_id = active_version_id(session) if train else None
        validate_job_options(ctx.settings, session, train_options, experts=get_version(session, active_id).experts
                             if active_id else None)
        with store_write(ctx, session):  # from the text's write to its row's commit (store/lock.py)
            corpus, job = accept_corpus(ctx, session, name, parsed, data, fmt, train, train_options)
            session.commit()
        dispatch_job(ctx.sessions, dispatch, job)
        return CorpusAccepted(corpus=CorpusOut.model_validate(corpus), job=JobOut.model_validate(job)).model_dump(
            mode="json")

    return JSONResponse(status_code=202, content=await run_in_threadpool(store))


@router.get("/v1/corpora", response_model=list[CorpusOut], dependencies=[Depends(require_scope("read"))])
def list_corpora(limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
                 session: Session = Depends(get_session)):
    return session.scalars(select(Corpus).order_by(Corpus.id.desc()).limit(limit).offset(offset)).all()


@router.get("/v1/corpora/{corpus_id}", response_model=CorpusOut,
            dependencies=[Depends(require_scope("read"))])
def get_corpus(corpus_id: IdPath, session: Session = Depends(get_session)):
    corpus = session.get(Corpus, corpus_id)
    if corpus is None:
        raise NotFound(f"corpus {corpus_id} not found")
    return corpus


@router.post("/v1/corpora/{corpus_id}/forget", status_code=202, response_model=JobOut)
def forget_corpus(corpus_id: IdPath, body: ForgetRequest, ctx=Depends(get_ctx), session: Session = Depends(get_session),
                  dispatch=Depends(get_dispatch), caller: Caller = Depends(require_scope("train"))):
    """Make a new version without this corpus: a forget job masks the experts grown for it (optionally
    repairing on the remaining corpora), evaluates and publishes like a training job. 409
    when the version does not know the corpus or holds it in no segment of its own."""
    check_activation_right(ctx.settings, caller, body.options)
    if session.get(Corpus, corpus_id) is None:
        raise NotFound(f"corpus {corpus_id} not found")
    base_id = active_version_id(session) if body.base_version_id is None else body.base_version_id
    if base_id is None:
        raise Conflict("no version to forget from")
    segments_to_mask(live_version(session, base_id, "forgotten from"), corpus_id)
    check_probe_option(ctx.settings, session, parse_forget_options(body.options, ctx.settings.max_train_steps).probe)
    job = create_job(session, "forget", [corpus_id], body.options, base_version_id=body.base_version_id)
    session.commit()
    dispatch_job(ctx.sessions, dispatch, job)
    return JSONResponse(status_code=202, content=JobOut.model_validate(job).model_dump(mode="json"))


@router.delete("/v1/corpora/{corpus_id}", response_model=CorpusOut)
def delete_corpus_route(corpus_id: IdPath, ctx=Depends(get_ctx), caller: Caller = Depends(require_scope("admin"))):
    """Delete the corpus' text: its files and the stream documents it was made of. Its row stays, in state
    ``deleted`` (versions, evaluations and jobs refer to it); versions trained on it keep what they learnt and
    later jobs replay the parent's own samples in its place. 409 while a queued or running job uses it."""
    return delete_corpus(ctx, corpus_id)
