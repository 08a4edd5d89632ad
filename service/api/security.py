"""Who is calling, and may they: API keys with scopes (service/keys.py) and the per-route scope dependency.

Every /v1 route declares the scope it needs with ``Depends(require_scope(...))``. A key is needed for the
train and admin scopes whenever PEER_API_KEYS is set, and for read and generate too with
PEER_REQUIRE_KEY_FOR=all. On a route that needs no key a known key names the caller for the rate limits and
an unknown one is served as no key (the OpenAI client always sends one), but it is still a failed check.
Without a bearer header, the console's session cookie (service/api/sessions.py) stands for its key.

Failed key checks (PEER_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE) are counted per client address (an IPv6 client
by its /64) and per one of PEER_RATE_LIMIT_AUTH_FAILURE_BUCKETS buckets the token hashes to (no token: a
bucket of its own). Once a bucket is spent, tokens of that bucket are not compared at all: where a key is
needed they get a 429, where none is they are served as no key, so no answer tells a right guess from a
wrong one. The buckets keep known keys usable: wrong keys sent from the same address (a NAT, a proxy, a
misconfigured client) spend the buckets they hash to, and a valid key is refused only when its own bucket
is spent, which takes that budget of failures in the one bucket out of N it cannot be told to be in.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request

from ..errors import Forbidden, Overloaded, Unauthorized
from ..keys import SCOPES, ApiKey, configured_keys, find_key
from ..settings import Settings
from .bindrule import LoopbackOnlyMiddleware
from .bodylimit import BodyLimitMiddleware, BodyTooLarge, too_large_response
from .crosssite import CrossSiteMiddleware
from .ratelimit import limit_request
from .sessions import COOKIE as SESSION_COOKIE
from .sessions import session_key

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


def configured_key(settings: Settings, token: str) -> ApiKey | None:
    """The key of PEER_API_KEYS whose secret is ``token``, or None."""
    return find_key(configured_keys(tuple(settings.api_keys)), token.strip())


def key_required(settings: Settings, scope: str) -> bool:
    return bool(settings.api_keys) and (scope in WRITE_SCOPES or settings.require_key_for == "all")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def rate_limit_address(request: Request) -> str:
    """The client as the per-address budgets count it: an IPv6 client by its /64 (a host or a subscriber gets a
    whole /64 and may rotate through it for free), an IPv4 client (or an IPv4-mapped IPv6 one) by its address."""
    host = client_address(request)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def failure_bucket(request: Request, settings: Settings, credential: str) -> str:
    """Where a failed check of ``credential`` is charged: the client's address and the bucket it hashes to."""
    if not credential:
        return f"{rate_limit_address(request)}:no-key"
    digest = int.from_bytes(hashlib.sha256(credential.encode("utf-8", errors="surrogatepass")).digest()[:8], "big")
    return f"{rate_limit_address(request)}:{digest % settings.rate_limit_auth_failure_buckets}"


def checked(request: Request, settings: Settings, credential: str,
            resolve: Callable[[], ApiKey | None]) -> ApiKey | None:
    """``resolve()``, the key ``credential`` (a bearer token, a session cookie, or "" for none) stands for: called
    only while its failure bucket (see the module's docstring) has failed checks left (else 429, whatever the
    credential), and a failure (None: no credential, or a wrong one) is charged to that bucket."""
    failures = request.app.state.rate_limits.auth_failures
    bucket, per_minute = failure_bucket(request, settings, credential), settings.rate_limit_auth_failures_per_minute
    failures.refuse_if_spent(bucket, per_minute)
    key = resolve()
    if key is None:
        failures.take(bucket, per_minute)
    return key


def checked_key(request: Request, settings: Settings, token: str) -> ApiKey | None:
    """The key whose secret is ``token`` (a console sign-in's), checked as every credential is."""
    return checked(request, settings, token, lambda: configured_key(settings, token) if token else None)


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def request_key(request: Request, settings: Settings, required: bool) -> ApiKey | None:
    """The key the request acts as: its bearer token's, else its console session's (service/api/sessions.py).
    Where a key is ``required``, no credential is a failed check and a spent bucket a 429; where none is, a
    request without a credential costs nothing and one whose bucket is spent is served as one without a key
    (a right guess as a wrong one)."""
    if not settings.api_keys:
        return None
    if hasattr(request.state, "api_key"):  # resolved (and charged) once a request: a console page asks twice
        return request.state.api_key
    token, cookie = bearer_token(request), request.cookies.get(SESSION_COOKIE, "")
    if token:
        credential, resolve = token, lambda: configured_key(settings, token)
    elif cookie:
        credential, resolve = cookie, lambda: session_key(settings, request.app.state.ctx.sessions, cookie)
    elif required:
        credential, resolve = "", lambda: None
    else:
        return None
    try:
        request.state.api_key = checked(request, settings, credential, resolve)
    except Overloaded:
        if required:
            raise
        return None
    return request.state.api_key


def identify(request: Request, settings: Settings, scope: str) -> Caller:
    """The caller, checked for ``scope``: 401 without a valid key where one is needed, 403 when the key
    lacks the scope."""
    required = key_required(settings, scope)
    key = request_key(request, settings, required)
    if required:
        if key is None:
            raise Unauthorized(f"this endpoint needs an API key with the {scope!r} scope: send "
                               f"'Authorization: Bearer <key>' (the console: sign in at /ui/login)")
        if scope not in key.scopes:
            raise Forbidden(f"API key {key.name!r} lacks the {scope!r} scope (it has: "
                            f"{', '.join(sorted(key.scopes))})")
    if key is not None:
        return Caller(f"api-key:{key.name}", f"key:{key.name}", key)
    return Caller(OPEN_ACTOR, f"address:{rate_limit_address(request)}", None)


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
    """Bound every request body, refuse cross-site mutating requests, answer only loopback connections without
    PEER_API_KEYS (unless PEER_ALLOW_OPEN), and warn when anyone may mutate."""
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(CrossSiteMiddleware, allowed_origins=settings.allowed_origins)

    async def body_too_large(request: Request, exc: BodyTooLarge):
        return too_large_response(exc)

    app.add_exception_handler(BodyTooLarge, body_too_large)
    if not settings.api_keys and not settings.allow_open:
        app.add_middleware(LoopbackOnlyMiddleware)
    if not settings.api_keys:
        log.warning("PEER_API_KEYS is not set: anyone who can reach this service can upload corpora, train, "
                    "activate or roll back versions and cancel jobs; set PEER_API_KEYS (README, Security)")
