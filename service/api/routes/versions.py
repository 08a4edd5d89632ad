"""Pool versions: list, inspect (evaluations, segments, activation history), activate or roll back, pin, delete."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...db.models import Activation, Evaluation, PoolVersion
from ...store.retention import delete_version, set_pinned
from ...store.versions import activate, active_version_id, get_version, live_version, lock_activations
from ..deps import get_ctx, get_host, get_session
from ..schemas import ActivateRequest, IdPath, Offset
from ..security import Caller, require_scope

router = APIRouter(tags=["versions"])


def version_view(session: Session, version: PoolVersion, active_id: int | None, detail: bool = False) -> dict:
    view = {
        "id": version.id, "parent_id": version.parent_id, "job_id": version.job_id, "active": version.id == active_id,
        "created_at": version.created_at.isoformat(), "experts": version.experts, "corpus_ids": version.corpus_ids,
        "strategy": version.strategy, "gate_passed": version.gate_passed, "gate_reason": version.gate_reason,
        "pinned": version.pinned, "deleted_at": version.deleted_at.isoformat() if version.deleted_at else None,
        "evaluation": {str(e.corpus_id): e.bpb for e in session.scalars(
            select(Evaluation).where(Evaluation.version_id == version.id).order_by(Evaluation.corpus_id))},
        "probe_scores": version.probe_scores,
    }
    if detail:
        view["segments"] = version.segments
        view["model_config"] = version.model_config_json
        view["checkpoint"] = version.checkpoint
        view["activations"] = [
            {"id": a.id, "reason": a.reason, "actor": a.actor, "created_at": a.created_at.isoformat()}
            for a in session.scalars(select(Activation).where(Activation.version_id == version.id)
                                     .order_by(Activation.id))]
    return view


@router.get("/v1/versions", dependencies=[Depends(require_scope("read"))])
def list_versions(limit: int = Query(100, ge=1, le=1000), offset: Offset = 0,
                  session: Session = Depends(get_session)):
    active_id = active_version_id(session)
    versions = session.scalars(select(PoolVersion).order_by(PoolVersion.id.desc()).limit(limit).offset(offset)).all()
    return [version_view(session, v, active_id) for v in versions]


@router.get("/v1/versions/{version_id}", dependencies=[Depends(require_scope("read"))])
def read_version(version_id: IdPath, session: Session = Depends(get_session)):
    return version_view(session, get_version(session, version_id), active_version_id(session), detail=True)


@router.post("/v1/versions/{version_id}/activate")
async def activate_version(version_id: IdPath, body: ActivateRequest | None = None,
                           session: Session = Depends(get_session), host=Depends(get_host),
                           caller: Caller = Depends(require_scope("admin"))):
    """Make this version the active one (also a rollback). The version is loaded first: one that cannot be
    loaded (its checkpoint is gone or corrupt) is a 503 and the active version stays as it was. Returns
    once this API process serves it; other API processes follow within PEER_SWAP_POLL_SECONDS."""
    reason = body.reason if body else "requested through the API"

    def commit() -> None:
        lock_activations(session)
        activate(session, version_id, reason, caller.actor)
        session.commit()

    def run() -> dict:
        live_version(session, version_id, "activated", lock=False)  # before loading it; activate() checks again
        host.activate(version_id, commit)
        return version_view(session, get_version(session, version_id), version_id, detail=True)

    return await run_in_threadpool(run)


@router.delete("/v1/versions/{version_id}")
def delete_pool_version(version_id: IdPath, ctx=Depends(get_ctx), session: Session = Depends(get_session),
                        caller: Caller = Depends(require_scope("admin"))):
    """Delete the version's checkpoint. Its row stays, marked deleted (lineage, evaluations, activations and
    usage refer to it), and it can no longer be activated, pinned or trained from. 409 with the reason while
    it is the active version, pinned, or the base or result of a queued or running job."""
    version = delete_version(ctx, version_id)
    return version_view(session, version, active_version_id(session), detail=True)


@router.post("/v1/versions/{version_id}/pin")
def pin_version(version_id: IdPath, ctx=Depends(get_ctx), session: Session = Depends(get_session),
                caller: Caller = Depends(require_scope("admin"))):
    """Keep this version whatever the retention policy (PEER_KEEP_VERSIONS) says; DELETE refuses it until it
    is unpinned. 409 for a deleted version."""
    return version_view(session, set_pinned(ctx, version_id, True), active_version_id(session), detail=True)


@router.post("/v1/versions/{version_id}/unpin")
def unpin_version(version_id: IdPath, ctx=Depends(get_ctx), session: Session = Depends(get_session),
                  caller: Caller = Depends(require_scope("admin"))):
    """Leave this version to the retention policy again."""
    return version_view(session, set_pinned(ctx, version_id, False), active_version_id(session), detail=True)
