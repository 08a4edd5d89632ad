"""The FastAPI application: routers, one error mapping, request ids and metrics, the model host's life.

``create_app`` builds everything from settings; on start-up it makes sure a first version exists
(a fresh model of the configured shape, plus a bootstrap training job on a small real corpus when
PEER_BOOTSTRAP_CORPUS is set; or the retrofitted PEER_BASE_MODEL), loads the active version and starts the
scheduler and the swap watcher. A PEER_BASE_MODEL that cannot be loaded stops the start-up (InvalidSetting).
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import logs
from ..context import ServiceContext
from ..errors import ServiceError, error_body
from ..jobs.bootstrap import bootstrap
from ..jobs.lease import Dispatch
from ..metrics import Metrics
from ..serving.engine import ModelHost
from ..settings import Settings
from ..ui import pages as console
from .ratelimit import RateLimits
from .routes import corpora, experts, generate, health, jobs, openai, probes, status, streams, versions
from .schemas import ERROR_RESPONSES
from .security import protect

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def client_request_id(request: Request) -> str | None:
    """The caller's X-Request-Id when it is a plain token (it goes into logs and back into a header)."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else None


def route_path(request: Request) -> str:
    """The matched route's template (``/v1/jobs/{job_id}``): a bounded label set, unlike raw paths."""
    return getattr(request.scope.get("route"), "path", "unmatched")


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """An unhandled exception: logged with its traceback, counted by route and exception type, answered as a
    JSON 500 that gives the request id to quote (never the exception's text, which may hold internals)."""
    request_id = logs.request_id.get() or client_request_id(request) or uuid.uuid4().hex
    kind = type(exc).__name__
    log.error("unhandled %s on %s %s", kind, request.method, request.url.path, exc_info=exc)
    request.app.state.metrics.server_errors.labels(route=route_path(request), exception=kind).inc()
    body = error_body(500, f"internal server error (request id {request_id}); the service logged the cause",
                      "InternalError")
    return JSONResponse(status_code=500, content={**body, "request_id": request_id},
                        headers={"X-Request-Id": request_id})


def create_app(settings: Settings | None = None, dispatch: Dispatch | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx = ServiceContext.from_settings(settings)
        if dispatch is None:
            from ..worker.app import dispatcher, make_celery

            app.state.dispatch = dispatcher(make_celery(settings))
        else:
            app.state.dispatch = dispatch
        app.state.ctx = ctx
        bootstrap(ctx, app.state.dispatch)
        host = ModelHost(ctx)
        host.start_serving()
        host.start()
        app.state.host = host
        try:
            yield
        finally:
            host.stop()
            ctx.close()

    app = FastAPI(title="peer-service", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="A lifelong-learning language model on a growing pool of PEER experts.",
                  docs_url=None, redoc_url=None, openapi_url=None)  # served by routes/health.py, scope-checked
    app.state.metrics = Metrics()
    app.state.rate_limits = RateLimits(settings)
    app.state.started_at = time.time()
    for module in (generate, openai, corpora, streams, probes, jobs, versions, experts, status, health):
        app.include_router(module.router)
    console.mount(app)  # the operator console at /ui
    protect(app, settings)  # body limits, cross-site refusal (service/api/security.py)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                            content=error_body(exc.status_code, exc.message, type(exc).__name__))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(status_code=422, content=error_body(422, f"invalid request: {problems}", "InvalidInput"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # e.g. 404 unknown path, 405 method
        return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                            content=error_body(exc.status_code, str(exc.detail), "HTTPError"))

    @app.exception_handler(Exception)
    async def unhandled_error(request: Request, exc: Exception):  # raised outside the middleware below
        return internal_error(request, exc)

    @app.middleware("http")
    async def request_id_and_metrics(request: Request, call_next):
        request_id = client_request_id(request) or uuid.uuid4().hex
        logs.request_id.set(request_id)  # this request's task (and what it starts) logs with it
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a bug: a JSON 500 carrying the request id, logged and counted
            response = internal_error(request, exc)
        path = route_path(request)
        metrics: Metrics = request.app.state.metrics
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(request.method, path).observe(time.perf_counter() - start)
        response.headers["X-Request-Id"] = request_id
        return response

    return app
