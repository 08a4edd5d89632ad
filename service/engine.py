"""The model host of one API process: the active version, a token-by-token scheduler, hot swap, usage.

One scheduler thread runs every forward pass. Requests are admitted (at most
``max_active_generations`` at once, ``max_queued_generations`` more waiting, then 429) and advanced
one token each in turn, so a long completion does not hold the others back and a request's first
token comes after at most one round. A request is bound to the version that was active when it was
submitted and is served to the end by that version alone.

Hot swap: :meth:`ModelHost.swap_to` loads the new version beside the old one (outside the scheduler),
then flips one reference; requests already running finish on the version they started with, new ones
get the new version; an old version is dropped once its last request ends, after its usage counters
are flushed. A watcher thread polls the database for the active version, so an activation made by a
worker or by another API process is picked up within ``swap_poll_seconds``.

Expert usage: every PEER layer of a served model counts its selections (prompt and completion
positions alike); every ``usage_flush_seconds`` the scheduler writes the non-zero counters per version,
layer and time window to ``expert_usage`` and zeroes them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch

from peer_model.generate import GenerationStep, SamplingParams, generate
from peer_model.model import PEERTransformer
from peer_model.train import resolve_device

from .context import ServiceContext
from .db.models import ExpertUsage, PoolVersion, utcnow
from .db.session import transaction
from .errors import InvalidInput, NotReady, Overloaded
from .versions import active_version_id

log = logging.getLogger(__name__)

StepCallback = Callable[[GenerationStep | BaseException], None]


@dataclass(eq=False)
class LoadedVersion:
    version_id: int
    model: PEERTransformer
    window_start: datetime = field(default_factory=utcnow)
    requests: int = 0  # in flight on this version (scheduler thread only)


@dataclass(eq=False)
class Ticket:
    """A submitted generation; ``cancel()`` (e.g. the client went away) ends it at the next step."""

    version_id: int
    prompt_tokens: int
    steps: Iterator[GenerationStep]
    on_step: StepCallback
    version: LoadedVersion
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def encode_usage(counts: torch.Tensor) -> tuple[bytes, int]:
    """Non-zero counters as little-endian int64 ids then counts; and the total selections."""
    ids = torch.nonzero(counts).squeeze(1)
    values = counts[ids]
    return (np.concatenate([ids.numpy(), values.numpy()]).astype("<i8").tobytes(), int(values.sum()))


def decode_usage(blob: bytes, num_experts: int) -> torch.Tensor:
    pairs = np.frombuffer(blob, dtype="<i8")
    half = pairs.size // 2
    counts = torch.zeros(num_experts, dtype=torch.long)
    ids = torch.from_numpy(pairs[:half].copy())
    keep = ids < num_experts
    counts.index_add_(0, ids[keep], torch.from_numpy(pairs[half:].copy())[keep])
    return counts


class ModelHost:
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.settings = ctx.settings
        self.device = resolve_device(self.settings.device)
        self._current: LoadedVersion | None = None
        self._retired: list[LoadedVersion] = []
        self._pending: deque[Ticket] = deque()
        self._active: list[Ticket] = []
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_flush = time.monotonic()
        self.tokens_generated = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, watch: bool = True) -> None:
        torch.set_num_threads(self.settings.api_torch_threads)
        self._threads = [threading.Thread(target=self._schedule, name="peer-scheduler", daemon=True)]
        if watch:
            self._threads.append(threading.Thread(target=self._watch, name="peer-swap-watcher", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self._flush_usage(force=True)

    # ---- versions --------------------------------------------------------------------------------

    @property
    def version_id(self) -> int | None:
        current = self._current
        return current.version_id if current else None

    def sync_active(self) -> int | None:
        """Load the database's active version if it is not the one served; returns the served id."""
        with self.ctx.sessions() as session:
            wanted = active_version_id(session)
        if wanted is not None and wanted != self.version_id:
            self.swap_to(wanted)
        return self.version_id

    def swap_to(self, version_id: int) -> None:
        with self._swap_lock:
            if version_id == self.version_id:
                return
            with self.ctx.sessions() as session:
                version = session.get(PoolVersion, version_id)
                if version is None:
                    raise InvalidInput(f"version {version_id} not found")
                checkpoint = version.checkpoint
            model = self.ctx.store.load_model(checkpoint, str(self.device)).eval()
            for layer in model.peer_layers().values():
                layer.track_usage = True
            loaded = LoadedVersion(version_id, model)
            with self._cond:
                if self._current is not None:
                    self._retired.append(self._current)
                self._current = loaded
                self._cond.notify_all()
            log.info("serving version %s", version_id)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.swap_poll_seconds):
            try:
                self.sync_active()
            except Exception:  # noqa: BLE001 - keep serving the loaded version; retried next poll
                log.exception("could not sync the active version")

    # ---- requests --------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._active)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_step: StepCallback) -> Ticket:
        """Queue a generation; ``on_step`` is called from the scheduler thread with each step, or once
        with an exception. Raises NotReady, Overloaded, InvalidInput (prompt too long)."""
        with self._cond:
            current = self._current
            if current is None:
                raise NotReady("no model version is loaded yet")
            limit = self.settings.max_active_generations + self.settings.max_queued_generations
            if self.queue_depth >= limit:
                raise Overloaded(f"{self.queue_depth} generations are running or queued (limit {limit}); retry later")
            try:
                steps = generate(current.model, prompt_ids, params)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            ticket = Ticket(current.version_id, len(prompt_ids), steps, on_step, current)
            current.requests += 1
            self._pending.append(ticket)
            self._cond.notify_all()
        return ticket

    # ---- the scheduler thread --------------------------------------------------------------------

    def _schedule(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while len(self._active) < self.settings.max_active_generations and self._pending:
                    self._active.append(self._pending.popleft())
                if not self._active:
                    self._cond.wait(timeout=self.settings.usage_flush_seconds)
            for ticket in list(self._active):
                self._advance(ticket)
            self._flush_usage()

    def _advance(self, ticket: Ticket) -> None:
        done = ticket.cancelled.is_set()
        if not done:
            try:
                step = next(ticket.steps)
            except StopIteration:
                done = True
            except Exception as exc:  # noqa: BLE001 - delivered to the request, the scheduler goes on
                log.exception("generation failed on version %s", ticket.version_id)
                ticket.on_step(exc)
                done = True
            else:
                self.tokens_generated += 1
                ticket.on_step(step)
                done = step.finish_reason is not None
        if done:
            ticket.steps.close()
            with self._cond:
                self._active.remove(ticket)
                ticket.version.requests -= 1

    def _flush_usage(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.settings.usage_flush_seconds:
            return
        self._last_flush = now
        with self._cond:
            idle = [v for v in self._retired if v.requests == 0]
            self._retired = [v for v in self._retired if v.requests > 0]
            versions = [v for v in (self._current, *self._retired, *idle) if v is not None]
        try:
            self._write_usage(versions)
        except Exception:  # noqa: BLE001 - counters stay and are written next time
            log.exception("could not write expert usage")

    def _write_usage(self, versions: list[LoadedVersion]) -> None:
        rows = []
        end = utcnow()
        for version in versions:
            for index, layer in version.model.peer_layers().items():
                counts = layer.usage_counts.cpu()
                if not bool(counts.any()):
                    continue
                blob, selections = encode_usage(counts)
                per_token = layer.config.heads * layer.config.top_k
                rows.append((ExpertUsage(version_id=version.version_id, layer=index, window_start=version.window_start,
                                         window_end=end, tokens=selections // per_token, counts=blob), layer))
        if rows:
            with transaction(self.ctx.sessions) as session:
                session.add_all(row for row, _ in rows)
            for _, layer in rows:
                layer.reset_usage()
        for version in versions:
            version.window_start = end
