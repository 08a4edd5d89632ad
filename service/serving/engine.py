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
are flushed. A watcher thread follows the database's active version, so an activation made by a worker
or by another API replica is picked up at once on PostgreSQL (the activation's NOTIFY wakes it) and within
``swap_poll_seconds`` otherwise. On CPU a loaded version's linear layers outside its expert layers take the
``serve_weights`` format (peer_model/quantize.py: int8 by default).

Activation loads first: :meth:`ModelHost.activate` loads the version, then lets the caller commit the
activation, then serves it, so a version that cannot be loaded is refused before the database points at
it. At start, when the active version cannot be loaded (its checkpoint is gone or corrupt), the host
serves the newest previously active version that loads and says so (``fallback``) instead of failing,
so the API that can repair the situation is up.

Expert usage: every PEER layer of a served model counts its selections (prompt and completion
positions alike); every ``usage_flush_seconds`` the scheduler thread moves the counters into a buffer
(a copy and a zeroing, no I/O) and a writer thread stores them per version, layer and time window in
``expert_usage``. A write that fails keeps the buffer for the next try, and a retired version is dropped
only after its counters were moved, so no count is lost and the decode loop never waits on the database.
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
import psycopg
import torch
from sqlalchemy import Engine, select

from peer_model.batching import BatchDecoder, Sequence
from peer_model.checkpoint import CheckpointError
from peer_model.generate import GenerationStep, SamplingParams, check_prompt
from peer_model.model import PEERTransformer
from peer_model.quantize import convert_linears
from peer_model.tokenizer import Tokenizer
from peer_model.train import resolve_device

from ..context import ServiceContext
from ..db.models import Activation, ExpertUsage, PoolVersion, utcnow
from ..db.session import transaction
from ..errors import InvalidInput, NotFound, NotReady, Overloaded
from ..store.versions import ACTIVATION_CHANNEL, active_version_id
from .status import is_trained

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
    SWAP_RETRY_SECONDS = 60.0  # a version that failed to load is tried again by the watcher after this long

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.settings = ctx.settings
        self.device = resolve_device(self.settings.device)
        self.fallback: str | None = None  # why the served version is not the active one (None: it is)
        self._unloadable: dict[int, float] = {}  # version id → when it last failed to load
        self._usage = UsageBuffer()
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
        self._threads = [threading.Thread(target=self._schedule, name="peer-scheduler", daemon=True),
                         threading.Thread(target=self._write_usage_loop, name="peer-usage-writer", daemon=True)]
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
        self._collect_usage()
        try:
            self._write_usage()
        except Exception:  # noqa: BLE001 - nothing left to retry with
            log.exception("could not write expert usage at shutdown")

    def dead_threads(self) -> list[str]:
        """Names of the host's threads that died (the scheduler, the usage writer, the watcher)."""
        return [thread.name for thread in self._threads if not thread.is_alive()]

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
        """Load the database's active version if it is not the one served; returns the served id. A version
        that failed to load is tried again only after SWAP_RETRY_SECONDS. The active version is read under the
        swap lock, which an activation holds from loading to serving: read before it and swapped after it, an
        older answer would have put the previous version back until the next notification or poll."""
        with self._swap_lock:
            with self.ctx.sessions() as session:
                wanted = active_version_id(session)
            failed_at = self._unloadable.get(wanted)
            if failed_at is not None and time.monotonic() - failed_at < self.SWAP_RETRY_SECONDS:
                return self.version_id
            if wanted is not None and wanted != self.version_id:
                try:
                    self.install(self.load(wanted))
                except NotReady:
                    self._unloadable[wanted] = time.monotonic()
                    raise
                self._unloadable.pop(wanted, None)
                self.fallback = None
            return self.version_id

    def start_serving(self) -> int:
        """At start: serve the active version, or, when it cannot be loaded, the newest previously active
        version that can (``fallback`` says which and why; the database still names the active one, and
        the watcher keeps trying it). Raises NotReady when no version loads at all."""
        try:
            served = self.sync_active()
        except NotReady as exc:
            failure = exc.message
        else:
            if served is None:
                raise NotReady("no active version in the database")
            return served
        with self.ctx.sessions() as session:
            wanted = active_version_id(session)
            history = session.scalars(select(Activation.version_id).order_by(Activation.id.desc())).all()
        for candidate in dict.fromkeys(v for v in history if v != wanted):
            try:
                self.swap_to(candidate)
            except NotReady as exc:
                log.error("fallback: %s", exc.message)
                continue
            self.fallback = (f"the active version {wanted} cannot be loaded ({failure}); serving version {candidate}, "
                             f"the newest earlier active version that loads: activate a version to resolve this")
            log.error(self.fallback)
            return candidate
        raise NotReady(f"no version can be loaded: {failure}")

    def load(self, version_id: int) -> LoadedVersion:
        """Load a version beside the served one (nothing changes for requests). Raises NotFound, or
        NotReady when its checkpoint cannot be loaded."""
        with self.ctx.sessions() as session:
            version = session.get(PoolVersion, version_id)
            if version is None:
                raise NotFound(f"version {version_id} not found")
            checkpoint, trained = version.checkpoint, is_trained(version)
        try:
            model = self.ctx.store.load_model(checkpoint, str(self.device)).eval()
        except (CheckpointError, OSError) as exc:
            raise NotReady(f"version {version_id} cannot be loaded: {type(exc).__name__}: {exc}") from None
        if model.embed.weight.device.type == "cpu":
            convert_linears(model, self.settings.serve_weights, self.settings.serve_int8_max_rows,
                            self.settings.serve_exact_top_k)
        for layer in model.peer_layers().values():
            layer.track_usage = True
        graphs = self.settings.cuda_graphs and model.embed.weight.is_cuda
        return LoadedVersion(version_id, model, BatchDecoder(model, self.settings.max_active_generations, graphs),
                             trained=trained)

    def install(self, loaded: LoadedVersion) -> None:
        """Serve ``loaded`` to new requests; running ones finish on their version."""
        with self._cond:
            if self._current is not None:
                self._retired.append(self._current)
            self._current = loaded
            self._cond.notify_all()
        log.info("serving version %s", loaded.version_id)

    def swap_to(self, version_id: int) -> None:
        with self._swap_lock:
            if version_id != self.version_id:
                self.install(self.load(version_id))

    def activate(self, version_id: int, commit: Callable[[], None]) -> None:
        """Load ``version_id`` (unless served), then ``commit()`` (the caller records the activation), then
        serve it: a version that cannot be loaded raises before anything is recorded."""
        with self._swap_lock:
            loaded = None if version_id == self.version_id else self.load(version_id)
            commit()
            if loaded is not None:
                self.install(loaded)
            self._unloadable.pop(version_id, None)
            self.fallback = None

    def _watch(self) -> None:
        """Follow the active version: on PostgreSQL an activation's NOTIFY wakes the watcher at once (with a poll
        every ``swap_poll_seconds`` as well, in case a notification is missed while reconnecting); elsewhere it
        polls."""
        with ActivationListener(self.ctx.engine, self._stop) as listener:
            while not self._stop.is_set():
                listener.wait(self.settings.swap_poll_seconds)
                if self._stop.is_set():
                    return
                try:
                    self.sync_active()
                except NotReady as exc:  # keep serving the loaded version; retried after SWAP_RETRY_SECONDS
                    log.error("could not load the active version: %s", exc.message)
                except Exception:  # noqa: BLE001 - e.g. the database is down: retried next poll
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
            try:
                self._round()
            except Exception:  # noqa: BLE001 - a bug in one round must not stop serving
                log.exception("scheduler round failed")

    def _round(self) -> None:
        """Admit waiting requests, advance every version's batch by one token, move usage counters."""
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
        if time.monotonic() - self._last_flush >= self.settings.usage_flush_seconds:
            self._collect_usage()

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

    def _collect_usage(self) -> None:
        """On the scheduler thread (which alone runs the models): move every served version's counters into
        the buffer, then drop retired versions whose last request ended."""
        self._last_flush = time.monotonic()
        end = utcnow()
        with self._cond:
            versions = [v for v in (self._current, *self._retired) if v is not None]
        for version in versions:
            for index, layer in version.model.peer_layers().items():
                counts = layer.usage_counts.cpu()
                if bool(counts.any()):
                    per_token = layer.config.heads * layer.config.top_k
                    self._usage.add(version.version_id, index, version.window_start, end, counts.clone(), per_token)
                    layer.reset_usage()
            version.window_start = end
        with self._cond:
            self._retired = [v for v in self._retired if v.requests > 0]
        self._usage.ready.set()

    def _write_usage_loop(self) -> None:
        while not self._stop.is_set():
            self._usage.ready.wait(timeout=self.settings.usage_flush_seconds)
            self._usage.ready.clear()
            try:
                self._write_usage()
            except Exception:  # noqa: BLE001 - the counters stay in the buffer and are written next time
                log.exception("could not write expert usage")

    def _write_usage(self) -> None:
        windows = self._usage.take()
        if not windows:
            return
        try:
            with transaction(self.ctx.sessions) as session:
                session.add_all(ExpertUsage(version_id=version_id, layer=layer, window_start=w.start, window_end=w.end,
                                            tokens=w.selections // w.per_token, counts=encode_usage(w.counts)[0])
                                for (version_id, layer), w in windows.items())
        except BaseException:
            self._usage.put_back(windows)
            raise


class ActivationListener:
    """``wait(timeout)`` returns when an activation was committed (PostgreSQL LISTEN on ACTIVATION_CHANNEL) or
    after ``timeout`` (or ``stop``). Without PostgreSQL, or while its connection is down, it waits out the
    timeout (polling)."""

    def __init__(self, engine: Engine, stop: threading.Event):
        self.url = engine.url if engine.dialect.name == "postgresql" else None
        self.stop = stop
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> "ActivationListener":
        return self

    def __exit__(self, *exc) -> None:
        if self._conn is not None:
            self._conn.close()

    def _connect(self) -> psycopg.Connection | None:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.url.set(drivername="postgresql").render_as_string(
                    hide_password=False), autocommit=True, connect_timeout=5)
                self._conn.execute(f"LISTEN {ACTIVATION_CHANNEL}")
            except psycopg.Error:
                self._conn = None
        return self._conn

    def wait(self, timeout: float) -> None:
        conn = self._connect() if self.url is not None else None
        if conn is None:
            self.stop.wait(timeout)
            return
        try:
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error:  # the connection dropped: reconnect at the next wait
            conn.close()


@dataclass
class UsageWindow:
    start: datetime
    end: datetime
    counts: torch.Tensor
    per_token: int  # selections per routed token (heads × top-k)

    @property
    def selections(self) -> int:
        return int(self.counts.sum())


class UsageBuffer:
    """Counters moved off the models and not yet stored, one window per (version, layer): what arrives while a
    write fails is merged into it (summed counts, the earliest start, the latest end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, int], UsageWindow] = {}
        self.ready = threading.Event()

    def add(self, version_id: int, layer: int, start: datetime, end: datetime, counts: torch.Tensor,
            per_token: int) -> None:
        self.put_back({(version_id, layer): UsageWindow(start, end, counts, per_token)})

    def put_back(self, windows: dict[tuple[int, int], UsageWindow]) -> None:
        with self._lock:
            for key, window in windows.items():
                held = self._windows.get(key)
                if held is None:
                    self._windows[key] = window
                    continue
                size = max(held.counts.numel(), window.counts.numel())
                counts = torch.zeros(size, dtype=torch.long)
                counts[:held.counts.numel()] += held.counts
                counts[:window.counts.numel()] += window.counts
                self._windows[key] = UsageWindow(min(held.start, window.start), max(held.end, window.end), counts,
                                                 window.per_token)

    def take(self) -> dict[tuple[int, int], UsageWindow]:
        with self._lock:
            windows, self._windows = self._windows, {}
        return windows
