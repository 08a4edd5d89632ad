"""Console sign-in sessions: the browser holds an opaque id, the database holds what it stands for.

Signing in (``POST /ui/login``) with an API key opens a session: a random id that goes to the browser in a
cookie (HttpOnly: no script reads it; SameSite=Strict: no other site's request carries it; Secure when
PEER_PUBLIC_SCHEME is https or the request came over https), signed with a key derived from PEER_API_KEYS
(a forged or stale cookie is refused without a database read, and changing the keys signs every session
out). The row stores the id's hash (a copy of the table holds no usable cookie), the key's name and a
fingerprint of its secret, and when the session ends: PEER_CONSOLE_SESSION_SECONDS after sign-in, at
"Sign out", when the key leaves PEER_API_KEYS or gets another secret, or when ``peer-service sessions
--revoke`` ends it. A session acts with its key's scopes, for the console's pages and for the JSON API calls
its script makes from the same origin. The key itself never reaches the browser after the sign-in form.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..db.models import ConsoleSession, utcnow
from ..db.session import transaction
from ..keys import ApiKey, configured_keys
from ..settings import Settings

COOKIE = "peer_session"


def _keys(settings: Settings) -> list[ApiKey]:
    return configured_keys(tuple(settings.api_keys))


def _signing_key(settings: Settings) -> bytes:
    return hashlib.sha256(b"peer console sessions\0" + b"\0".join(sorted(k.secret for k in _keys(settings)))).digest()


def _signature(settings: Settings, session_id: str) -> str:
    mac = hmac.new(_signing_key(settings), session_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def fingerprint(key: ApiKey) -> str:
    return hashlib.sha256(b"peer console session key\0" + key.secret).hexdigest()


def open_session(settings: Settings, sessions: sessionmaker[Session], key: ApiKey) -> str:
    """A new session acting as ``key``; returns the cookie's value. Sessions that ended are dropped meanwhile."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    with transaction(sessions) as db:
        db.execute(delete(ConsoleSession).where(or_(ConsoleSession.expires_at <= now,
                                                    ConsoleSession.revoked_at.is_not(None))))
        db.add(ConsoleSession(token_hash=_hash(session_id), key_name=key.name, key_fingerprint=fingerprint(key),
                              created_at=now,
                              expires_at=now + timedelta(seconds=settings.console_session_seconds)))
    return f"{session_id}.{_signature(settings, session_id)}"


def _session_id(settings: Settings, cookie: str) -> str | None:
    """The id of a cookie this service signed, or None."""
    session_id, _, signature = cookie.rpartition(".")
    if not session_id or not hmac.compare_digest(signature.encode(), _signature(settings, session_id).encode()):
        return None
    return session_id


def session_key(settings: Settings, sessions: sessionmaker[Session], cookie: str) -> ApiKey | None:
    """The key a live session acts as, or None (unsigned, unknown, expired, revoked, or its key changed)."""
    session_id = _session_id(settings, cookie)
    if session_id is None:
        return None
    with sessions() as db:
        row = db.scalars(select(ConsoleSession).where(ConsoleSession.token_hash == _hash(session_id),
                                                      ConsoleSession.revoked_at.is_(None),
                                                      ConsoleSession.expires_at > utcnow())).one_or_none()
    if row is None:
        return None
    key = next((k for k in _keys(settings) if k.name == row.key_name), None)
    return key if key is not None and hmac.compare_digest(fingerprint(key), row.key_fingerprint) else None


def revoke_session(settings: Settings, sessions: sessionmaker[Session], cookie: str) -> None:
    session_id = _session_id(settings, cookie)
    if session_id is not None:
        with transaction(sessions) as db:
            db.execute(update(ConsoleSession).where(ConsoleSession.token_hash == _hash(session_id))
                       .values(revoked_at=utcnow()))


def revoke_sessions(sessions: sessionmaker[Session], key_name: str | None = None) -> int:
    """End every live session (of ``key_name`` only, if given); returns how many."""
    query = update(ConsoleSession).where(ConsoleSession.revoked_at.is_(None), ConsoleSession.expires_at > utcnow())
    if key_name is not None:
        query = query.where(ConsoleSession.key_name == key_name)
    with transaction(sessions) as db:
        return db.execute(query.values(revoked_at=utcnow())).rowcount
