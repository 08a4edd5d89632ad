"""The bind rule: without PEER_API_KEYS every mutating route is open to whoever reaches the port, so the service
answers loopback connections only, unless PEER_ALLOW_OPEN says an operator accepts that.

``peer-service api`` and ``serve`` refuse to listen on anything but a loopback address then (exit status 2,
:func:`open_bind_refusal`), and the app enforces the same on every connection whoever started it (``uvicorn
service.api.app:create_app --factory --host 0.0.0.0``, a test server, an embedding program):
:class:`LoopbackOnlyMiddleware` refuses a request that arrived on a network address of this machine (the ASGI
``server``, the socket's own address) with a 403 saying why. A connection without a network socket (an
in-process client, a Unix socket) is local by nature.
"""
from __future__ import annotations

import ipaddress

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import error_body
from ..settings import Settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def open_bind_refusal(host: str, settings: Settings) -> str | None:
    """Why the API must not listen on ``host`` (a non-loopback address without PEER_API_KEYS), or None."""
    if settings.api_keys or settings.allow_open or is_loopback(host):
        return None
    return (f"refusing to listen on {host!r} without PEER_API_KEYS: every mutating route would be open to the "
            f"network. Set PEER_API_KEYS, listen on 127.0.0.1, or set PEER_ALLOW_OPEN=true to accept that")


def arrived_from_network(server: tuple | None) -> bool:
    """The connection came in on a network address that is not loopback (``server``: ASGI's (host, port))."""
    if not server:
        return False
    try:
        return not ipaddress.ip_address(str(server[0])).is_loopback
    except ValueError:
        return False  # no network socket: an in-process client or a Unix socket


class LoopbackOnlyMiddleware:
    """Added by ``protect`` when PEER_API_KEYS is unset and PEER_ALLOW_OPEN is not."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and arrived_from_network(scope.get("server")):
            message = ("this service has no PEER_API_KEYS and answers loopback connections only: every mutating "
                       "route would be open to the network (set PEER_API_KEYS, or PEER_ALLOW_OPEN=true to accept "
                       "that)")
            await JSONResponse(error_body(403, message, "Forbidden"), status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)
