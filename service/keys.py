"""API keys with names and scopes, as PEER_API_KEYS gives them (comma-separated entries).

An entry is either a bare secret (the original form: the key gets every scope and is named ``key-1``,
``key-2``, ... by its position) or ``name:secret:scope+scope``. What a caller did is recorded under the
key's name, never under any part of its secret. Scopes:

- ``read``: GET routes (corpora, jobs, versions, experts, streams, status, models)
- ``generate``: generation and tokenizing
- ``train``: uploading corpora, stream documents and flushes, training and forget jobs
- ``admin``: activation (and rollback), cancelling jobs, deleting and pinning
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from functools import lru_cache

SCOPES = ("read", "generate", "train", "admin")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: bytes
    scopes: frozenset[str]

    def matches(self, token: bytes) -> bool:
        """Constant-time comparison of bytes (``hmac.compare_digest`` raises on non-ASCII str)."""
        return hmac.compare_digest(token, self.secret)


def parse_api_keys(entries: list[str]) -> list[ApiKey]:
    """The keys of PEER_API_KEYS' entries; ValueError naming the entry's position on a malformed one."""
    keys = []
    for position, entry in enumerate(entries, start=1):
        if ":" not in entry:
            keys.append(ApiKey(f"key-{position}", entry.encode(), frozenset(SCOPES)))
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"API key entry {position} must be a bare secret or name:secret:scope+scope")
        name, secret, scopes = parts
        if not _NAME.fullmatch(name):
            raise ValueError(f"API key entry {position}: the name must be 1-64 letters, digits, '_', '.' or '-'")
        if not secret:
            raise ValueError(f"API key entry {position} ({name}) has an empty secret")
        wanted = frozenset(scopes.split("+"))
        if not wanted or not wanted <= set(SCOPES):
            raise ValueError(f"API key entry {position} ({name}): scopes must be some of {'+'.join(SCOPES)}, "
                             f"got {scopes!r}")
        keys.append(ApiKey(name, secret.encode(), wanted))
    names = [key.name for key in keys]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"API key names must be unique: {', '.join(duplicates)}")
    return keys


@lru_cache(maxsize=8)
def configured_keys(entries: tuple[str, ...]) -> list[ApiKey]:
    """The keys of PEER_API_KEYS (``tuple(settings.api_keys)``), parsed once."""
    return parse_api_keys(list(entries))


def find_key(keys: list[ApiKey], token: str) -> ApiKey | None:
    """The key whose secret is ``token`` (compared as UTF-8 bytes, every key compared); None if none."""
    raw = token.encode("utf-8", errors="surrogatepass")
    found = None
    for key in keys:
        if key.matches(raw):
            found = key
    return found
