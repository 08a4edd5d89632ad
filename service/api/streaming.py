"""From the scheduler thread to the event loop: a request's steps arrive on an asyncio queue."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from peer_model.generate import GenerationStep, SamplingParams

from ..context import ServiceContext
from ..metrics import Metrics
from ..serving.engine import Encoder, ModelHost, Ticket
from ..serving.status import untrained_warning

WARNING_HEADER = "X-PEER-Warning"
log = logging.getLogger(__name__)


@dataclass
class Generation:
    ticket: Ticket
    queue: asyncio.Queue
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    completion_tokens: int = 0
    finish_reason: str | None = None

    async def steps(self) -> AsyncIterator[GenerationStep]:
        """The steps in order; raises what the generation raised. Leaving early cancels the generation.
        Records time to first token, the gap before every later token and, once it finishes, the whole
        generation's duration (a failed or abandoned generation has none)."""
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                now = time.perf_counter()
                if self.first_token_at is None:
                    self.first_token_at = now
                    self.metrics.first_token.observe(now - self.started)
                else:
                    self.metrics.inter_token.observe(now - self.last_token_at)
                self.last_token_at = now
                self.completion_tokens += 1
                self.metrics.tokens.inc()
                if item.finish_reason is not None:
                    self.finish_reason = item.finish_reason
                    self.metrics.generation.observe(now - self.started)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.ticket.cancel()  # no-op once finished; stops the scheduler's work on a dropped client

    async def text(self) -> str:
        return "".join([step.text async for step in self.steps()])

    @property
    def prompt_tokens(self) -> int:
        return len(self.ticket.prompt_ids)

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def start_generation(host: ModelHost, metrics: Metrics, encode: Encoder, params: SamplingParams) -> Generation:
    """Submit the prompt ``encode`` gives with the serving version's tokenizer (see ModelHost.submit)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            pass

    ticket = host.submit(encode, params, deliver)
    metrics.queue_depth.set(host.queue_depth)
    return Generation(ticket, queue, metrics)


async def served_warning(ctx: ServiceContext, generation: Generation) -> str | None:
    """The untrained-model warning for the version serving ``generation`` (see service/serving/status.py); a
    trained version costs no database read. A failed read loses the warning, not the request."""
    if generation.ticket.version.trained:
        return None

    def read() -> str | None:
        with ctx.sessions() as session:
            return untrained_warning(session, generation.ticket.version_id)

    try:
        return await run_in_threadpool(read)
    except Exception:  # noqa: BLE001 - the generation is already running: serve it without the warning
        log.exception("could not read the untrained-model warning")
        return None


def warning_headers(warning: str | None) -> dict[str, str]:
    return {WARNING_HEADER: warning} if warning else {}


# characters JSON leaves raw that str.splitlines (hence httpx's iter_lines, and clients built on it such as
# peerctl) takes for line breaks: a token holding one would cut its event in two
SPLITLINES_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(SPLITLINES_BREAKS)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
