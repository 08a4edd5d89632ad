"""Liveness (the model host's threads run), readiness (a version is loaded and the database answers), metrics and
the API's documentation (the OpenAPI schema, Swagger UI, ReDoc: reading, so with PEER_REQUIRE_KEY_FOR=all they need
a key with the read scope, as /metrics does; the probes never do)."""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from ..security import require_scope

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)
READY_DATABASE_TIMEOUT_S = 5.0


@router.get("/healthz")
async def healthz(request: Request):
    """The process is alive: 200 while the model host's threads (the scheduler that runs every forward pass,
    the usage writer, the version watcher) run; 503 naming the dead ones otherwise (restart the process)."""
    dead = request.app.state.host.dead_threads()
    if dead:
        return JSONResponse(status_code=503, content={"status": "dead threads", "dead_threads": dead})
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """200 when a model version is loaded, the host's threads run and the database answers (within
    READY_DATABASE_TIMEOUT_S); else 503. It costs no generation: a busy server is ready, not ejected, and its
    probes do not count as expert usage. ``fallback`` is set while the active version cannot be loaded and
    an earlier one serves. Open to anyone (a load balancer sends no key), so it tells no error's text: the
    log has it, and GET /v1/status the fallback's cause."""
    state = request.app.state
    host = state.host
    checks: dict[str, str] = {}

    def select_one() -> None:
        with state.ctx.sessions() as session:
            session.execute(text("SELECT 1"))

    try:
        await asyncio.wait_for(run_in_threadpool(select_one), READY_DATABASE_TIMEOUT_S)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised; its text (hosts, users, paths) only in the log
        log.warning("/readyz: the database does not answer: %s: %s", type(exc).__name__, exc)
        checks["database"] = "error: the database does not answer (the API's log says why)"
    dead = host.dead_threads()
    if host.version_id is None:
        checks["model"] = "error: no version loaded"
    elif dead:
        checks["model"] = f"error: dead threads {', '.join(dead)}"
    else:
        checks["model"] = f"ok: version {host.version_id}"
    ready = all(value.startswith("ok") for value in checks.values())
    fallback = (f"version {host.version_id} serves in place of the active version, which cannot be loaded "
                f"(GET /v1/status says why)") if host.fallback else None
    return JSONResponse(status_code=200 if ready else 503,
                        content={"ready": ready, "checks": checks, "fallback": fallback})


@router.get("/metrics", dependencies=[Depends(require_scope("read"))])
def metrics(request: Request):
    """Prometheus text format: requests, latencies, server errors, tokens, generation and inter-token times,
    queue depth, active version, process memory and CPU; from the database, job states and the oldest queued
    job's age. With the database down it still answers 200: ``peer_database_up 0`` and no database gauges.
    Reading, like /v1: with PEER_REQUIRE_KEY_FOR=all it needs a key with the read scope."""
    state = request.app.state
    m = state.metrics
    m.queue_depth.set(state.host.queue_depth)
    m.active_version.set(state.host.version_id or 0)
    try:
        with state.ctx.sessions() as session:
            m.database.refresh(session)
        m.database_up.set(1)
    except SQLAlchemyError as exc:
        log.warning("/metrics: the database could not be read (%s); its gauges are left out", exc)
        m.database.clear()
        m.database_up.set(0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_scope("read"))])
def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(require_scope("read"))])
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - Swagger UI")


@router.get("/redoc", include_in_schema=False, dependencies=[Depends(require_scope("read"))])
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")
