"""FastAPI dependencies: the service context, a database session, the model host (the caller and its
scopes: security.py)."""
from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from ..context import ServiceContext
from ..jobs.lease import Dispatch
from ..serving.engine import ModelHost


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
