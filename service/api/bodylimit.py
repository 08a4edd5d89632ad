"""Every request body bounded, as a pure ASGI middleware (it sees the body stream; BaseHTTPMiddleware would
buffer it): a declared Content-Length over the route's limit is refused with 413 before the app runs; a
body without one (chunked, e.g. a multipart upload) is counted as it streams and cut with 413 where it
passes the limit, so nothing past the limit is parsed, spooled or kept in memory.

Limits: a corpus upload (POST /v1/corpora) PEER_MAX_CORPUS_BYTES plus room for its envelope (multipart
boundaries and form fields); a JSON one three times PEER_MAX_CORPUS_BYTES (JSON writers escape every non-ASCII
character by default, Python's "é" as "\\u00e9": 6 bytes for its 2), while the corpus' own limit counts the
documents' text, not their envelope (api/corpus_body.py); a probe upload (POST /v1/probes) PEER_MAX_PROBE_BYTES;
every other route PEER_MAX_REQUEST_BYTES.
"""
from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import error_body
from ..settings import Settings

CORPUS_ENVELOPE_BYTES = 64 * 1024  # JSON or multipart wrapping around a corpus of PEER_MAX_CORPUS_BYTES
JSON_ESCAPES = 3  # the most bytes a JSON string takes per byte of its UTF-8 text, but for escaped control characters


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` where the body passes its limit: an HTTPException, so FastAPI's body parsing
    lets it through (other errors become a 400) and the app's handler answers 413."""

    def __init__(self, limit: int, setting: str):
        super().__init__(413, f"request body passes {limit} bytes ({setting})")


def body_limit(settings: Settings, method: str, path: str, content_type: str) -> tuple[int, str]:
    """(bytes, what sets it) for a request."""
    if method == "POST" and path.rstrip("/") == "/v1/corpora":
        if content_type.split(";")[0].strip().lower() == "application/json":
            return (JSON_ESCAPES * settings.max_corpus_bytes + CORPUS_ENVELOPE_BYTES,
                    "three times PEER_MAX_CORPUS_BYTES plus 64 KiB for a JSON body")
        return settings.max_corpus_bytes + CORPUS_ENVELOPE_BYTES, "PEER_MAX_CORPUS_BYTES plus 64 KiB of envelope"
    if method == "POST" and path.rstrip("/") == "/v1/probes":
        return settings.max_probe_bytes, "PEER_MAX_PROBE_BYTES"
    return settings.max_request_bytes, "PEER_MAX_REQUEST_BYTES"


def too_large_response(exc: BodyTooLarge) -> JSONResponse:
    # the rest of the body is not read: the connection cannot carry another request
    return JSONResponse(error_body(413, exc.detail, "PayloadTooLarge"), status_code=413,
                        headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit, setting = body_limit(self.settings, scope["method"], scope["path"], headers.get("content-type", ""))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await too_large_response(BodyTooLarge(limit, setting))(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:  # read outside the routes' handlers (e.g. by a middleware): answer here
            if started:
                raise
            await too_large_response(exc)(scope, receive, send)
