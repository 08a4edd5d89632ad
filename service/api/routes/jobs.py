"""Training jobs: submit, list, inspect, cancel."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...db.models import JOB_KINDS, JOB_STATES, Corpus, Job
from ...errors import Conflict, InvalidInput, NotFound
from ...jobs.lease import create_job, dispatch_job, get_job, request_cancel
from ...jobs.options import validate_job_options
from ...settings import Settings
from ...store.versions import active_version_id, is_pretrained, live_version
from ..deps import get_ctx, get_dispatch, get_session
from ..schemas import IdPath, JobOut, JobRequest, Offset
from ..security import Caller, check_activation_right, require_scope

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, response_model=JobOut)
def submit_job(body: JobRequest, ctx=Depends(get_ctx), session: Session = Depends(get_session),
               dispatch=Depends(get_dispatch), caller: Caller = Depends(require_scope("train"))):
    """Train a new version on ingested corpora: grow a segment of experts per PEER layer, fine-tune,
    evaluate on every corpus the version knows, publish, activate when the evaluation gate passes
    (``activate: "always"`` needs the admin scope)."""
    check_activation_right(ctx.settings, caller, body.options)
    check_corpus_ids(ctx.settings, body.corpus_ids)
    corpora = {c.id: c for c in session.scalars(select(Corpus).where(Corpus.id.in_(body.corpus_ids)))}
    missing = [c for c in body.corpus_ids if c not in corpora]
    if missing:
        raise NotFound(f"corpora {missing} not found")
    not_ready = [c for c in body.corpus_ids if corpora[c].state != "ready"]
    if not_ready:
        raise Conflict(f"corpora {not_ready} are not ingested yet (state must be 'ready')")
    base_id = active_version_id(session) if body.base_version_id is None else body.base_version_id
    if base_id is None:
        raise Conflict("no version to train from")
    base = live_version(session, base_id, "trained from")
    has_old = any(c not in body.corpus_ids for c in base.corpus_ids) or is_pretrained(base)
    validate_job_options(ctx.settings, session, body.options, has_old, base.experts)
    # unpinned (no base_version_id): the job trains the version active when it starts, so jobs queued one
    # after the other build one lineage instead of forking from the version active at submission
    job = create_job(session, "train", body.corpus_ids, body.options, base_version_id=body.base_version_id)
    session.commit()
    dispatch_job(ctx.sessions, dispatch, job)
    return JSONResponse(status_code=202, content=JobOut.model_validate(job).model_dump(mode="json"))


def check_corpus_ids(settings: Settings, corpus_ids: list[int]) -> None:
    """422 for a corpus named twice (its text would be trained on as many times: 1,000 copies were 1,000 times
    the tokens, and a large corpus took the worker's memory) or more corpora than PEER_MAX_JOB_CORPORA (65,536
    ids were more parameters than PostgreSQL binds: a 500)."""
    if len(corpus_ids) > settings.max_job_corpora:
        raise InvalidInput(f"{len(corpus_ids)} corpus ids; a job learns at most {settings.max_job_corpora} corpora "
                           f"(PEER_MAX_JOB_CORPORA)")
    repeated = sorted({c for c in corpus_ids if corpus_ids.count(c) > 1})
    if repeated:
        raise InvalidInput(f"corpus ids {repeated} are given more than once: name each corpus once")


@router.get("/v1/jobs", response_model=list[JobOut], dependencies=[Depends(require_scope("read"))])
def list_jobs(state: str | None = None, kind: str | None = None, limit: int = Query(100, ge=1, le=1000),
              offset: Offset = 0, session: Session = Depends(get_session)):
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if state is not None:
        if state not in JOB_STATES:
            raise InvalidInput(f"state must be one of {', '.join(JOB_STATES)}")
        query = query.where(Job.state == state)
    if kind is not None:
        if kind not in JOB_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(JOB_KINDS)}")
        query = query.where(Job.kind == kind)
    return session.scalars(query).all()


@router.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=[Depends(require_scope("read"))])
def read_job(job_id: IdPath, session: Session = Depends(get_session)):
    return get_job(session, job_id)


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: IdPath, session: Session = Depends(get_session),
               caller: Caller = Depends(require_scope("admin"))):
    """A queued job is cancelled at once; a running one stops at its next heartbeat (409 if finished)."""
    job = request_cancel(session, job_id)
    session.commit()
    return job
