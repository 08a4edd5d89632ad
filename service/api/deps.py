"""FastAPI dependencies: the service context, a database session, the model host, the caller's key."""
from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from ..context import ServiceContext
from ..engine import ModelHost
from ..errors import Unauthorized
from ..jobs import Dispatch


def get_ctx(request: Request) -> ServiceContext:
    return request.app.state.ctx


def get_host(request: Request) -> ModelHost:
    return request.app.state.host


def get_dispatch(request: Request) -> Dispatch:
    return request.app.state.dispatch


def get_session(ctx: ServiceContext = Depends(get_ctx)) -> Iterator[Session]:
    """One session per request; the route commits what it means to keep, the rest is rolled back."""
    with ctx.sessions() as session:
        yield session


def require_key(request: Request, ctx: ServiceContext = Depends(get_ctx)) -> str:
    """Mutating endpoints: ``Authorization: Bearer <key>`` when PEER_API_KEYS is set; returns the actor."""
    keys = ctx.settings.api_keys
    if not keys:
        return "api"
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), key) for key in keys):
        raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    return f"api-key:{token.strip()[:4]}…"
