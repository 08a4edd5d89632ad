"""Rate limits: token buckets per caller (an API key's name, else the client's address).

Four budgets, each a setting per minute (0: off): generation requests (generate scope), mutating
requests (train and admin scopes), generated tokens, and failed key checks per client address and token
bucket (service/api/security.py: a spent bucket's tokens are not compared, so guessing keys is as slow as the
budget, whatever the guesses).

The buckets live in Redis when there is one (PEER_RATE_LIMIT_REDIS_URL, by default the broker when it is
Redis): every API replica then charges the same buckets, and a restart keeps them. Without Redis (the
embedded default) they live in the API process, so N replicas would allow N times the budget. A Redis that
cannot be reached does not take the API down with it: requests pass uncounted, with a warning, until it is back.

A generation is charged its ``max_tokens`` when it is admitted (the most it can produce), as OpenAI-style
gateways count tokens-per-minute quotas; one that is refused (422, 429, 503) is given them back.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidInput, Overloaded
from ..settings import Settings

log = logging.getLogger(__name__)

MAX_IDLE_BUCKETS = 10_000  # past this many callers, full (idle) buckets are dropped


@dataclass
class Bucket:
    """``capacity`` tokens refilled at ``capacity`` per minute; starts full."""

    capacity: float
    level: float
    updated: float

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` (a negative one gives back, up to the capacity); 0.0 if it was there, else the seconds
        until it will be (nothing taken)."""
        wait = self.wait(amount, now)
        if not wait:
            self.level = min(self.capacity, self.level - amount)
        return wait

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is there (0.0: it is); takes nothing."""
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now
        return 0.0 if self.level >= amount else (amount - self.level) / rate


class LocalBuckets:
    """Buckets in this process, thread-safe (sync routes run on a thread pool)."""

    def __init__(self):
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()

    def charge(self, key: str, per_minute: int, amount: float, take: bool) -> float:
        """Charge ``key``'s bucket ``amount`` (``take`` False: only look); the seconds to wait, 0.0 if it passed."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None or bucket.capacity != per_minute:
                if len(self._buckets) >= MAX_IDLE_BUCKETS:
                    self._drop_idle(now)
                bucket = self._buckets[key] = Bucket(float(per_minute), float(per_minute), now)
            return bucket.take(amount, now) if take else bucket.wait(amount, now)

    def _drop_idle(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.level + (now - bucket.updated) * bucket.capacity / 60.0 >= bucket.capacity:
                del self._buckets[key]


# The same refill and charge as Bucket, atomic in Redis, on Redis' clock; a bucket expires once it would be full.
_CHARGE = """
local capacity, amount, take = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'level', 'updated')
local rate = capacity / 60
local level = tonumber(state[1]) or capacity
local updated = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - updated) * rate)
local wait = 0
if level >= amount then
  if take then level = math.min(capacity, level - amount) end
else
  wait = (amount - level) / rate
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((capacity - level) / rate) + 1)
return tostring(wait)
"""


class RedisBuckets:
    """Buckets in Redis, shared by every API process that uses the same Redis. After a failed call Redis is
    left alone for ``RETRY_AFTER_S`` (requests pass uncounted), so an outage costs one timeout, not one a request."""

    PREFIX = "peer:ratelimit:"
    TIMEOUT_S = 1.0
    RETRY_AFTER_S = 5.0

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, socket_timeout=self.TIMEOUT_S, socket_connect_timeout=self.TIMEOUT_S)
        self.script = self.client.register_script(_CHARGE)
        self._down_until = float("-inf")

    def charge(self, key: str, per_minute: int, amount: float, take: bool) -> float:
        if time.monotonic() < self._down_until:
            return 0.0
        try:
            return float(self.script(keys=[f"{self.PREFIX}{per_minute}:{key}"], args=[per_minute, amount, int(take)]))
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + self.RETRY_AFTER_S
            log.warning("rate limits: Redis unreachable (%s); requests pass uncounted for %.0f s",
                        type(exc).__name__, self.RETRY_AFTER_S)
            return 0.0


class RateLimiter:
    """One kind of budget for every caller."""

    def __init__(self, what: str, setting: str, buckets: LocalBuckets | RedisBuckets):
        self.what, self.setting, self.buckets = what, setting, buckets

    def take(self, client: str, per_minute: int, amount: float = 1.0) -> None:
        """Charge ``client``; 429 with the wait in Retry-After when its bucket is short. Off at 0."""
        self._charge(client, per_minute, amount, take=True)

    def refund(self, client: str, per_minute: int, amount: float) -> None:
        """Give ``amount`` back to ``client``'s bucket (what a refused request was charged). Off at 0."""
        if per_minute > 0:
            self.buckets.charge(f"{self.setting}:{client}", per_minute, -amount, True)

    def refuse_if_spent(self, client: str, per_minute: int) -> None:
        """429 when ``client``'s bucket holds less than one; takes nothing. Off at 0."""
        self._charge(client, per_minute, 1.0, take=False)

    def _charge(self, client: str, per_minute: int, amount: float, take: bool) -> None:
        if per_minute <= 0:
            return
        if amount > per_minute:
            raise InvalidInput(f"this request needs {amount:.0f} {self.what}; the limit is {per_minute} per "
                               f"minute ({self.setting})")
        wait = self.buckets.charge(f"{self.setting}:{client}", per_minute, amount, take)
        if wait:
            raise Overloaded(f"rate limit: {per_minute} {self.what} per minute ({self.setting}) spent; retry in "
                             f"{wait:.1f} s", retry_after=wait)

class RateLimits:
    """The app's buckets (``app.state.rate_limits``): in Redis when ``settings`` name one, else in this process."""

    def __init__(self, settings: Settings):
        url = settings.resolved_rate_limit_redis_url
        buckets = RedisBuckets(url) if url else LocalBuckets()
        self.shared = url is not None
        self.generations = RateLimiter("generation requests", "PEER_RATE_LIMIT_GENERATIONS_PER_MINUTE", buckets)
        self.writes = RateLimiter("mutating requests", "PEER_RATE_LIMIT_WRITES_PER_MINUTE", buckets)
        self.tokens = RateLimiter("generated tokens", "PEER_RATE_LIMIT_TOKENS_PER_MINUTE", buckets)
        self.auth_failures = RateLimiter("failed key checks", "PEER_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE", buckets)


def limit_request(app, client: str, scope: str) -> None:
    """Count one request of ``scope`` against ``client``'s budget (reads are not limited)."""
    settings, limits = app.state.ctx.settings, app.state.rate_limits
    if scope == "generate":
        limits.generations.take(client, settings.rate_limit_generations_per_minute)
    elif scope in ("train", "admin"):
        limits.writes.take(client, settings.rate_limit_writes_per_minute)


@asynccontextmanager
async def token_budget(request, client: str, max_tokens: int) -> AsyncIterator[None]:
    """Charge a generation its ``max_tokens`` against ``client``'s per-minute token budget around its admission
    (the block): a generation that is not admitted (a prompt longer than the context, a full queue, no version
    loaded) is given its tokens back. From an async route: a Redis round trip runs on the thread pool, never on
    the event loop."""
    settings, limits = request.app.state.ctx.settings, request.app.state.rate_limits
    per_minute = settings.rate_limit_tokens_per_minute
    if per_minute <= 0:
        yield
        return
    call = run_in_threadpool if limits.shared else _now
    await call(limits.tokens.take, client, per_minute, max_tokens)
    try:
        yield
    except BaseException:
        await call(limits.tokens.refund, client, per_minute, max_tokens)
        raise


async def _now(function, *args):
    return function(*args)
