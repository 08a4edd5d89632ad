"""Liveness, readiness (a model answers a real forward pass and the database answers) and metrics."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from peer_model.generate import SamplingParams

from ...db.models import Job
from ..streaming import start_generation

router = APIRouter(tags=["health"])
READY_FORWARD_TIMEOUT_S = 10.0


@router.get("/healthz")
async def healthz():
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """200 when a model version is loaded and generates one token, and the database answers; else 503."""
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        with state.ctx.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = f"error: {type(exc).__name__}: {exc}"
    try:
        generation = start_generation(state.host, state.metrics, lambda tokenizer: [],
                                      SamplingParams(max_tokens=1, temperature=0.0))
        await asyncio.wait_for(generation.text(), READY_FORWARD_TIMEOUT_S)
        checks["model"] = f"ok: version {generation.ticket.version_id}"
    except Exception as exc:  # noqa: BLE001
        checks["model"] = f"error: {type(exc).__name__}: {exc}"
    ready = all(value.startswith("ok") for value in checks.values())
    return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "checks": checks})


@router.get("/metrics")
def metrics(request: Request):
    """Prometheus text format: requests, latencies, tokens, queue depth, active version, job states."""
    state = request.app.state
    m = state.metrics
    m.queue_depth.set(state.host.queue_depth)
    m.active_version.set(state.host.version_id or 0)
    with state.ctx.sessions() as session:
        rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
    m.jobs.clear()
    for kind, job_state, count in rows:
        m.jobs.labels(kind=kind, state=job_state).set(count)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
