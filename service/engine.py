"""The model host of one API process: the active version, a token-by-token scheduler, hot swap, usage.

One scheduler thread runs every forward pass. A request's prompt is encoded by the tokenizer of the
version that will serve it (each version's checkpoint carries its own; a swap may change it), so a
request never mixes one version's ids with another's model. Requests are admitted (at most
``max_active_generations`` at once, ``max_queued_generations`` more waiting, then 429), prefilled
alone, and then decoded together: every round advances each running request by one token in one
batched forward (continuous batching, :class:`peer_model.batching.BatchDecoder`), so a long
completion does not hold the others back and a new request joins at the next round. A request is
bound to the version that was active when it was submitted and is served to the end by that version
alone (each loaded version has its own batch).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch

from peer_model.checkpoint import CheckpointError
from peer_model.batching import BatchDecoder, Sequence
from peer_model.generate import GenerationStep, SamplingParams, check_prompt
from peer_model.model import PEERTransformer
from peer_model.tokenizer import Tokenizer
from peer_model.train import resolve_device

from .context import ServiceContext
from .db.models import ExpertUsage, PoolVersion, utcnow
from .db.session import transaction
from .errors import InvalidInput, NotReady, Overloaded
from .status import is_trained
from .versions import active_version_id

log = logging.getLogger(__name__)

StepCallback = Callable[[GenerationStep | BaseException], None]
Encoder = Callable[[Tokenizer], list[int]]  # a request's prompt → ids of the serving version's tokenizer


@dataclass(eq=False)
class LoadedVersion:
    version_id: int
    model: PEERTransformer
    decoder: BatchDecoder
    window_start: datetime = field(default_factory=utcnow)
    trained: bool = True  # False: a fresh model that has learnt no corpus yet (responses carry a warning)
    requests: int = 0  # submitted to this version and not finished
    running: dict[Sequence, "Ticket"] = field(default_factory=dict)  # in the decoder's batch


@dataclass(eq=False)
class Ticket:
    """A submitted generation; ``cancel()`` (e.g. the client went away) ends it at the next step."""

    prompt_ids: list[int]
    params: SamplingParams
    on_step: StepCallback
    version: LoadedVersion
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def version_id(self) -> int:
        return self.version.version_id

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
        self._running = 0  # tickets in some version's batch
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_flush = time.monotonic()

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

    def active_tokenizer(self) -> tuple[int, Tokenizer]:
        """The served version and its tokenizer (what a new request would be encoded with)."""
        current = self._current
        if current is None:
            raise NotReady("no model version is loaded yet")
        return current.version_id, current.model.tokenizer

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
                checkpoint, trained = version.checkpoint, is_trained(version)
            try:
                model = self.ctx.store.load_model(checkpoint, str(self.device)).eval()
            except CheckpointError as exc:
                raise NotReady(f"version {version_id} cannot be loaded: {exc}") from None
            for layer in model.peer_layers().values():
                layer.track_usage = True
            graphs = self.settings.cuda_graphs and model.embed.weight.is_cuda
            loaded = LoadedVersion(version_id, model, BatchDecoder(model, self.settings.max_active_generations, graphs),
                                   trained=trained)
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
        return len(self._pending) + self._running

    def submit(self, encode: Encoder, params: SamplingParams, on_step: StepCallback) -> Ticket:
        """Queue a generation of the prompt ``encode`` gives with the active version's tokenizer (its
        ValueError is the request's fault); ``on_step`` is called from the scheduler thread with each step,
        or once with an exception. Raises NotReady, Overloaded, InvalidInput (bad or too long prompt)."""
        with self._cond:
            current = self._current
            if current is None:
                raise NotReady("no model version is loaded yet")
            limit = self.settings.max_active_generations + self.settings.max_queued_generations
            if self.queue_depth >= limit:
                raise Overloaded(f"{self.queue_depth} generations are running or queued (limit {limit}); retry later")
            current.requests += 1  # held while encoding (outside the lock), so a swap cannot drop the version
        try:
            prompt_ids = self._encode(current.model, encode, params)
        except BaseException:
            with self._cond:
                current.requests -= 1
            raise
        ticket = Ticket(prompt_ids, params, on_step, current)
        with self._cond:
            self._pending.append(ticket)
            self._cond.notify_all()
        return ticket

    @staticmethod
    def _encode(model: PEERTransformer, encode: Encoder, params: SamplingParams) -> list[int]:
        try:
            prompt_ids = list(encode(model.tokenizer))
            check_prompt(model, prompt_ids, params)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return prompt_ids

    # ---- the scheduler thread --------------------------------------------------------------------

    def _schedule(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                room = self.settings.max_active_generations - self._running
                admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self._running += len(admitted)
                if not admitted and not self._running:
                    self._cond.wait(timeout=self.settings.usage_flush_seconds)
                versions = [v for v in (self._current, *self._retired) if v is not None]
            for ticket in admitted:
                self._start(ticket)
            for version in versions:
                if version.running:
                    self._advance(version)
            self._flush_usage()

    def _start(self, ticket: Ticket) -> None:
        """Prefill a ticket into its version's batch (its first token comes with the next round)."""
        version = ticket.version
        if ticket.cancelled.is_set():
            self._finish(ticket)
            return
        try:
            sequence = version.decoder.add(ticket.prompt_ids, ticket.params)
        except Exception as exc:  # noqa: BLE001 - delivered to the request, the scheduler goes on
            log.exception("prefill failed on version %s", version.version_id)
            self._deliver(ticket, exc)
            self._finish(ticket)
            return
        version.running[sequence] = ticket

    def _advance(self, version: LoadedVersion) -> None:
        """One round: cancelled requests leave, every other running request gets one token."""
        for sequence, ticket in list(version.running.items()):
            if ticket.cancelled.is_set():
                version.decoder.remove(sequence)
                del version.running[sequence]
                self._finish(ticket)
        if not version.running:
            return
        try:
            steps = version.decoder.step()
        except Exception as exc:  # noqa: BLE001 - every request of this batch gets the error
            log.exception("decode failed on version %s", version.version_id)
            for sequence, ticket in list(version.running.items()):
                version.decoder.remove(sequence)
                self._deliver(ticket, exc)
                self._finish(ticket)
            version.running.clear()
            return
        for sequence, step in steps:
            ticket = version.running[sequence]
            self._deliver(ticket, step)
            if step.finish_reason is not None:
                del version.running[sequence]
                self._finish(ticket)

    @staticmethod
    def _deliver(ticket: Ticket, item: GenerationStep | BaseException) -> None:
        try:
            ticket.on_step(item)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the scheduler
            log.exception("could not deliver a generation step")
            ticket.cancel()

    def _finish(self, ticket: Ticket) -> None:
        with self._cond:
            self._running -= 1
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
