"""GET /v1/status: what the console's header shows on every page (and what a script can poll)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from ...serving.status import service_status
from ..deps import get_ctx, get_host, get_session
from ..security import require_scope

router = APIRouter(tags=["status"])


@router.get("/v1/status", dependencies=[Depends(require_scope("read"))])
def status(ctx=Depends(get_ctx), host=Depends(get_host), session: Session = Depends(get_session)):
    """The active and the served version; ``base``: the model the served version descends from (name,
    family, pretrained); ``warning`` while the active version is untrained (a fresh model
    before its bootstrap job is done: "the model is untrained: bootstrap job 2 is at 37%"); unfinished jobs
    by state; whether mutating endpoints need an API key (PEER_API_KEYS); ``fallback`` while the active
    version cannot be loaded and an earlier one serves (why, and what to do)."""
    return {**service_status(session, host.version_id, bool(ctx.settings.api_keys)), "fallback": host.fallback}
