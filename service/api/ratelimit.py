"""Rate limits: in-process token buckets per caller (an API key's name, else the client's address).

Four budgets, each a setting per minute (0: off): generation requests (generate scope), mutating
requests (train and admin scopes), generated tokens, and failed key checks per client address (a caller
that spent it gets 429 on every route needing a key, before its key is compared: guessing keys is as slow
as the budget, whatever the guesses). A generation is charged its ``max_tokens`` when it
is admitted (the most it can produce), as OpenAI-style gateways count tokens-per-minute quotas. The
buckets live in one API process: with N API replicas a caller gets up to N times the budget.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import InvalidInput, Overloaded

MAX_IDLE_BUCKETS = 10_000  # past this many callers, full (idle) buckets are dropped


@dataclass
class Bucket:
    """``capacity`` tokens refilled at ``capacity`` per minute; starts full."""

    capacity: float
    level: float
    updated: float

    def take(self, amount: float, now: float) -> float:
        """Take ``amount``; 0.0 if it was there, else the seconds until it will be (nothing taken)."""
        wait = self.wait(amount, now)
        if not wait:
            self.level -= amount
        return wait

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is there (0.0: it is); takes nothing."""
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now
        return 0.0 if self.level >= amount else (amount - self.level) / rate


class RateLimiter:
    """One kind of budget for every caller, thread-safe (sync routes run on a thread pool)."""

    def __init__(self, what: str, setting: str):
        self.what, self.setting = what, setting
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()

    def take(self, client: str, per_minute: int, amount: float = 1.0) -> None:
        """Charge ``client``; 429 with the wait in Retry-After when its bucket is short. Off at 0."""
        self._charge(client, per_minute, amount, take=True)

    def refuse_if_spent(self, client: str, per_minute: int) -> None:
        """429 when ``client``'s bucket holds less than one; takes nothing. Off at 0."""
        self._charge(client, per_minute, 1.0, take=False)

    def _charge(self, client: str, per_minute: int, amount: float, take: bool) -> None:
        if per_minute <= 0:
            return
        if amount > per_minute:
            raise InvalidInput(f"this request needs {amount:.0f} {self.what}; the limit is {per_minute} per "
                               f"minute ({self.setting})")
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None or bucket.capacity != per_minute:
                if len(self._buckets) >= MAX_IDLE_BUCKETS:
                    self._drop_idle(now)
                bucket = self._buckets[client] = Bucket(float(per_minute), float(per_minute), now)
            wait = bucket.take(amount, now) if take else bucket.wait(amount, now)
        if wait:
            raise Overloaded(f"rate limit: {per_minute} {self.what} per minute ({self.setting}) spent; retry in "
                             f"{wait:.1f} s", retry_after=wait)

    def _drop_idle(self, now: float) -> None:
        for client, bucket in list(self._buckets.items()):
            if bucket.level + (now - bucket.updated) * bucket.capacity / 60.0 >= bucket.capacity:
                del self._buckets[client]


class RateLimits:
    """The app's buckets (``app.state.rate_limits``)."""

    def __init__(self):
        self.generations = RateLimiter("generation requests", "PEER_RATE_LIMIT_GENERATIONS_PER_MINUTE")
        self.writes = RateLimiter("mutating requests", "PEER_RATE_LIMIT_WRITES_PER_MINUTE")
        self.tokens = RateLimiter("generated tokens", "PEER_RATE_LIMIT_TOKENS_PER_MINUTE")
        self.auth_failures = RateLimiter("failed key checks", "PEER_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE")


def limit_request(app, client: str, scope: str) -> None:
    """Count one request of ``scope`` against ``client``'s budget (reads are not limited)."""
    settings, limits = app.state.ctx.settings, app.state.rate_limits
    if scope == "generate":
        limits.generations.take(client, settings.rate_limit_generations_per_minute)
    elif scope in ("train", "admin"):
        limits.writes.take(client, settings.rate_limit_writes_per_minute)


def charge_tokens(request, client: str, max_tokens: int) -> None:
    """Charge a generation its ``max_tokens`` against ``client``'s per-minute token budget."""
    settings = request.app.state.ctx.settings
    request.app.state.rate_limits.tokens.take(client, settings.rate_limit_tokens_per_minute, max_tokens)
