"""Probes: upload (a JSONL body), listing, deletion. A training or forget job names one in its options
(``"probe": id``) and its version then records the new version's and its parent's scores on it (GET /v1/versions)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...db.models import Probe
from ...errors import InvalidInput, NotFound
from ...jobs.probes import accept_probe
from ...store.lock import store_write
from ...store.retention import delete_probe
from ..deps import get_ctx, get_session
from ..schemas import IdPath, Name, Offset, ProbeOut
from ..security import require_scope

router = APIRouter(tags=["probes"])

JSONL_TYPES = ("application/jsonl", "application/x-ndjson")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"application/jsonl": {"schema": {"type": "array", "items": {
    "type": "object", "required": ["prompt", "answer"], "additionalProperties": False, "properties": {
        "prompt": {"type": "string"}, "answer": {"type": "string"}, "kind": {"type": "string", "maxLength": 64}}}},
    "description": 'one {"prompt": ..., "answer": ..., "kind": ...} object per line (kind: a label, default '
                   '"general")'}}}}


@router.post("/v1/probes", status_code=201, response_model=ProbeOut, openapi_extra=UPLOAD_BODY)
async def upload_probe(request: Request, name: Annotated[Name, Query()], ctx=Depends(get_ctx),
                       session: Session = Depends(get_session), _=Depends(require_scope("train"))):
    """Store a probe: questions whose greedy answers a training job scores on the new version and its parent (job
    option ``probe``). A JSONL body (``application/jsonl``) of at most PEER_MAX_PROBE_BYTES (413) and
    PEER_MAX_PROBE_ITEMS items; an invalid line is a 422 naming it, and nothing is stored then."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSONL_TYPES:
        raise InvalidInput(f"unsupported content type {content_type or 'none'!r}: a probe is a JSONL body "
                           f"(application/jsonl)")
    data = await request.body()  # bounded by api/bodylimit.py (PEER_MAX_PROBE_BYTES)

    def store() -> dict:
        with store_write(ctx, session):  # from the file's write to its row's commit (store/lock.py)
            probe = accept_probe(ctx, session, name, data)
            session.commit()
        return ProbeOut.model_validate(probe).model_dump(mode="json")

    return JSONResponse(status_code=201, content=await run_in_threadpool(store))


@router.get("/v1/probes", response_model=list[ProbeOut], dependencies=[Depends(require_scope("read"))])
def list_probes(limit: int = Query(100, ge=1, le=1000), offset: Offset = 0, session: Session = Depends(get_session)):
    return session.scalars(select(Probe).order_by(Probe.id.desc()).limit(limit).offset(offset)).all()


@router.get("/v1/probes/{probe_id}", response_model=ProbeOut, dependencies=[Depends(require_scope("read"))])
def get_probe(probe_id: IdPath, session: Session = Depends(get_session)):
    probe = session.get(Probe, probe_id)
    if probe is None:
        raise NotFound(f"probe {probe_id} not found")
    return probe


@router.delete("/v1/probes/{probe_id}", response_model=ProbeOut, dependencies=[Depends(require_scope("train"))])
def delete_probe_route(probe_id: IdPath, ctx=Depends(get_ctx)):
    """Delete a probe and its file; the versions scored on it keep their scores. 409 while a queued or running job
    names it; a job queued later that names it fails with "probe N not found"."""
    return delete_probe(ctx, probe_id)
