"""Who is calling, and may they: API keys with scopes (service/keys.py) and the per-route scope dependency.

Every /v1 route declares the scope it needs with ``Depends(require_scope(...))``. A key is needed for the
train and admin scopes whenever PEER_API_KEYS is set, and for read and generate too with
PEER_REQUIRE_KEY_FOR=all. On a route that needs no key an unknown key is ignored (the OpenAI client
always sends one), and a known key still names the caller for the rate limits.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from functools import lru_cache

from fastapi import FastAPI, Request

from ..errors import Forbidden, Unauthorized
from ..keys import SCOPES, ApiKey, find_key, parse_api_keys
from ..settings import Settings
from .bodylimit import BodyLimitMiddleware, BodyTooLarge, too_large_response
from .crosssite import CrossSiteMiddleware
from .ratelimit import limit_request

log = logging.getLogger(__name__)

OPEN_ACTOR = "api"  # the actor recorded for a mutating request when no keys are configured
WRITE_SCOPES = ("train", "admin")


@dataclass(frozen=True)
class Caller:
    """The caller of one request: ``actor`` is what the audit records (the key's name, never its secret);
    ``client`` identifies it for the rate limits (the key's name, else the client's address)."""

    actor: str
    client: str
    key: ApiKey | None


@lru_cache(maxsize=8)
def _keys(entries: tuple[str, ...]) -> list[ApiKey]:
    return parse_api_keys(list(entries))


def configured_key(settings: Settings, token: str) -> ApiKey | None:
    """The key of PEER_API_KEYS whose secret is ``token``, or None."""
    return find_key(_keys(tuple(settings.api_keys)), token.strip())


def key_required(settings: Settings, scope: str) -> bool:
    return bool(settings.api_keys) and (scope in WRITE_SCOPES or settings.require_key_for == "all")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def checked_key(request: Request, settings: Settings, token: str) -> ApiKey | None:
    """The key whose secret is ``token`` where a key is needed: compared only while the caller's address has
    failed checks left (PEER_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE; else 429, whatever the token), and a
    failure (no key, or an unknown one) is charged to the address."""
    failures = request.app.state.rate_limits.auth_failures
    address, per_minute = client_address(request), settings.rate_limit_auth_failures_per_minute
    failures.refuse_if_spent(address, per_minute)
    key = configured_key(settings, token) if token else None
    if key is None:
        failures.take(address, per_minute)
    return key


def identify(request: Request, settings: Settings, scope: str) -> Caller:
    """The caller, checked for ``scope``: 401 without a valid key where one is needed, 403 when the key
    lacks the scope."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    address = client_address(request)
    if key_required(settings, scope):
        key = checked_key(request, settings, token)
        if key is None:
            raise Unauthorized(f"this endpoint needs an API key with the {scope!r} scope: "
                               f"send 'Authorization: Bearer <key>'")
        if scope not in key.scopes:
            raise Forbidden(f"API key {key.name!r} lacks the {scope!r} scope (it has: "
                            f"{', '.join(sorted(key.scopes))})")
    else:
        key = configured_key(settings, token) if token else None  # names the caller; an unknown one is ignored
    if key is not None:
        return Caller(f"api-key:{key.name}", f"key:{key.name}", key)
    return Caller(OPEN_ACTOR, f"address:{address}", None)


def check_activation_right(settings: Settings, caller: Caller, options: dict) -> None:
    """403 unless the caller may put a version live outside the activation gate: ``activate: "always"`` in a
    job's options (a training job, a corpus upload's ``train_options``, a forget job) activates whatever the
    evaluation says and whichever version is active meanwhile, so with a pinned old ``base_version_id`` it is a
    rollback; it needs the ``admin`` scope, as ``POST /v1/versions/{id}/activate`` does."""
    if options.get("activate") != "always" or not settings.api_keys:
        return
    if caller.key is None or "admin" not in caller.key.scopes:
        held = ", ".join(sorted(caller.key.scopes)) if caller.key else "none"
        raise Forbidden(f'"activate": "always" puts the version live without the activation gate: it needs the '
                        f"'admin' scope (the caller has: {held}); leave it \"auto\" or ask an admin")


def require_scope(scope: str):
    """The dependency for a route that needs ``scope`` (read, generate, train or admin); it returns the
    :class:`Caller` and counts the request against the caller's rate limit."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")

    def dependency(request: Request) -> Caller:
        settings = request.app.state.ctx.settings
        caller = identify(request, settings, scope)
        limit_request(request.app, caller.client, scope)
        return caller

    dependency.__name__ = f"require_scope_{scope}"
    return dependency


def protect(app: FastAPI, settings: Settings) -> None:
    """Bound every request body, refuse cross-site mutating requests, and warn when anyone may mutate."""
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(CrossSiteMiddleware, allowed_origins=settings.allowed_origins)

    async def body_too_large(request: Request, exc: BodyTooLarge):
        return too_large_response(exc)

    app.add_exception_handler(BodyTooLarge, body_too_large)
    if not settings.api_keys:
        log.warning("PEER_API_KEYS is not set: anyone who can reach this service can upload corpora, train, "
                    "activate or roll back versions and cancel jobs; set PEER_API_KEYS (README, Security)")


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
