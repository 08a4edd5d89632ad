"""Cross-site requests to mutating routes are refused (403), as a pure ASGI middleware.

A web page on another site can make a visitor's browser send "simple" requests (text/plain or form
bodies, bodiless POSTs) without a CORS preflight, and with PEER_API_KEYS unset nothing else stops them:
any page could roll back the model or poison training. Browsers say where a request comes from:
``Sec-Fetch-Site`` (every current browser) and ``Origin`` (on every cross-origin POST). A POST, PUT, PATCH
or DELETE is refused when ``Sec-Fetch-Site`` is ``cross-site`` or ``same-site``, or, without it, when
``Origin`` names another host than the request's ``Host``; origins listed in PEER_ALLOWED_ORIGINS are let
through. Clients that are not browsers send neither header and are not affected; the console at /ui calls
the API from its own origin.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import error_body

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def cross_site(headers: Headers, allowed_origins: list[str]) -> str | None:
    """Why this request comes from another site, or None when it does not (or comes from an allowed origin)."""
    origin = headers.get("origin")
    if origin is not None and origin.lower() in allowed_origins:
        return None
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site in ("cross-site", "same-site"):
        return f"the browser says the request comes from another site (Sec-Fetch-Site: {fetch_site})"
    if fetch_site is not None or origin is None:
        return None  # same-origin or typed by the user; or not a browser
    host = headers.get("host", "").lower()
    if origin == "null" or urlsplit(origin).netloc.lower() != host:
        return f"its Origin {origin} is not this service ({host})"
    return None


class CrossSiteMiddleware:
    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app, self.allowed_origins = app, allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in MUTATING:
            reason = cross_site(Headers(scope=scope), self.allowed_origins)
            if reason is not None:
                message = (f"cross-site request refused: {reason}; call the API from its own origin, or list "
                           f"the calling origin in PEER_ALLOWED_ORIGINS")
                await JSONResponse(error_body(403, message, "Forbidden"), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
