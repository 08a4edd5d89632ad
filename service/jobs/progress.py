"""A running job's attempt and its progress: :class:`Attempt` keeps the claimed attempt alive from its claim to its
end (a heartbeat thread, the cancel flag, the database errors a heartbeat or a publication rides out) and
:class:`JobProgress` is what training reports through it (progress, speed, ETA, the loss curve) and how the
worker's shutdown (:class:`WorkerStopping`) reaches the training loop."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from sqlalchemy.exc import InterfaceError, OperationalError

from ..context import ServiceContext
from ..errors import InvalidInput
from .lease import JobCancelled, heartbeat

log = logging.getLogger(__name__)
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)  # the connection, not the statement, failed


class WorkerStopping(Exception):
    """The worker is shutting down (SIGTERM, Ctrl-C): the job goes back to the queue at once."""


class Diverged(InvalidInput):
    """Training produced a loss, or evaluation bits per byte, that is not a finite number: the job fails with
    this reason and publishes nothing (every comparison with NaN is false, so the gates would have passed it, and
    the database refuses NaN: a cryptic constraint or JSON error)."""


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise Diverged(f"{what} is {value}: the training diverged, nothing is published (a lower learning rate, "
                       f"PEER_TRAIN_LR and PEER_TRAIN_EXPERT_LR, or a smaller distill_weight may help)")


class Attempt:
    """One claimed attempt at a job, heartbeating for its whole life: a thread records a heartbeat whenever none
    was recorded for ``job_heartbeat_seconds``, so every stretch of the attempt (loading the parent, tokenising
    the corpora, training, evaluating child and parent, writing the checkpoint) keeps its lease; before, only the
    training loop did, and past ``job_stale_seconds`` of anything else the watchdog re-queued the job and the
    finished attempt lost its lease at commit. Use it as a context manager around the attempt's work.

    :meth:`beat` records a heartbeat now (with progress fields); a heartbeat that fails because the database is
    unreachable does not fail the job: it goes on and the next heartbeat tries again, for up to
    ``job_db_outage_seconds`` (below the stale timeout, after which another worker may claim the job); a longer
    outage raises the error. What the thread meets (the lease lost, an outage too long) is raised in the
    attempt's own thread at its next :meth:`beat` or :meth:`stop_if_cancelled`. ``cancelled`` is the cancel flag
    as of the latest heartbeat. ``progress`` returns the fields the thread's heartbeats carry (a
    :class:`JobProgress` installs its own): the thread beats as soon as one is due, so without them a loop that
    checks the job less often than every instant (a sharded stage polls its processes) would never record its
    progress."""

    def __init__(self, ctx: ServiceContext, job_id: int, lease: str):
        self.ctx, self.job_id, self.lease = ctx, job_id, lease
        self.cancelled = False
        self.progress: Callable[[], dict] = dict
        self._last = time.monotonic()  # the claim was a heartbeat
        self._outage_since: float | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peer-heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Attempt":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def due(self) -> bool:
        return time.monotonic() - self._last >= self.ctx.settings.job_heartbeat_seconds

    def beat(self, **fields) -> bool:
        """Record a heartbeat now, with ``fields`` (progress, tokens_per_s, eta_s, metrics); returns whether
        cancellation was requested. Raises LeaseLost, or the database's error after too long an outage."""
        if self._failure is not None:
            raise self._failure
        with self._lock:
            return self._beat(fields)

    def stop_if_cancelled(self) -> None:
        """Before a stretch that leads to publishing (evaluation, the checkpoint): the cancel flag read now;
        raises JobCancelled."""
        if self.beat():
            raise JobCancelled()

    def _beat(self, fields: dict) -> bool:
        now = time.monotonic()
        try:
            self.cancelled = heartbeat(self.ctx.sessions, self.job_id, self.lease, **fields)
            self._outage_since = None
        except TRANSIENT_DB_ERRORS as exc:
            self._outage_since = self._outage_since or now
            if now - self._outage_since > self.ctx.settings.job_db_outage_seconds:
                raise
            log.warning("job %s: heartbeat failed (%s); the job goes on, retrying", self.job_id, type(exc).__name__)
        self._last = now
        return self.cancelled

    def _run(self) -> None:
        interval = self.ctx.settings.job_heartbeat_seconds
        while not self._stop.wait(max(0.01, interval - (time.monotonic() - self._last))):
            with self._lock:
                if not self.due:
                    continue
                try:
                    self._beat(self.progress())
                except BaseException as exc:  # noqa: BLE001 - handed to the attempt's own thread
                    self._failure = exc
                    return


class JobProgress:
    """Training callbacks: a heartbeat with progress, speed, ETA and loss whenever the attempt's is due, the cancel
    flag, the worker's shutdown (raises WorkerStopping).

    The job's ``metrics`` carry ``base_metrics`` (e.g. the strategy), the latest step, loss and learning
    rate, and ``loss_history``: [step, loss] points over the whole run, at most ``HISTORY_POINTS`` (when
    full, every other point is dropped and points are kept half as often), always ending at the latest
    record. The console draws it as the job's loss curve."""

    HISTORY_POINTS = 200

    def __init__(self, attempt: Attempt, steps: int, base_metrics: dict | None = None):
        self.attempt, self.steps = attempt, steps
        self.base_metrics = dict(base_metrics or {})
        self.record: dict = {}
        self._points: list[list[float]] = []
        self._seen = 0
        self._stride = 1
        self._evaluation: tuple[float, int, int] | None = None  # (start, batches done, batches in all)
        if attempt is not None:
            attempt.progress = self._fields

    @property
    def cancelled(self) -> bool:
        return self.attempt.cancelled

    def on_log(self, record: dict) -> None:
        check_finite(float(record["loss"]), f"the training loss at step {record['step']}")
        self.record = record
        if self._seen % self._stride == 0:
            self._points.append([record["step"], round(float(record["loss"]), 4)])
            if len(self._points) > self.HISTORY_POINTS:
                self._points, self._stride = self._points[::2], self._stride * 2
        self._seen += 1

    @property
    def loss_history(self) -> list[list[float]]:
        if not self.record or (self._points and self._points[-1][0] == self.record["step"]):
            return list(self._points)
        return [*self._points[1 - self.HISTORY_POINTS:], [self.record["step"], round(float(self.record["loss"]), 4)]]

    def metrics(self) -> dict:
        if not self.record:
            return dict(self.base_metrics)
        return {**self.base_metrics, "step": self.record["step"], "loss": self.record["loss"],
                "lr": self.record["lr"], "loss_history": self.loss_history}

    def evaluating(self, batches: int) -> None:
        """Evaluation starts: ``batches`` batches in all, each reported by :meth:`on_eval_batch`."""
        self._evaluation = (time.monotonic(), 0, max(1, batches))

    def on_eval_batch(self, *_) -> None:
        """One more evaluation batch done (the arguments of ``evaluate_bpb``'s ``on_batch`` are not needed): the
        job's progress runs from 90% to 100% over the batches, the ETA from their pace; heartbeats as in training."""
        start, done, batches = self._evaluation
        self._evaluation = (start, done + 1, batches)
        self.should_stop()

    def on_scored_item(self, *_) -> None:
        """One more probe item answered (after evaluation, in its share of the progress: see
        ``evaluate_child_and_parent``'s ``also``); raises JobCancelled once the job is cancelled: a cancelled
        job's version is never published, so the rest of the probe would be wasted."""
        self.on_eval_batch()
        if self.cancelled:
            raise JobCancelled()

    def _fields(self) -> dict:
        """The heartbeat's progress, speed and ETA: training's over its steps, then evaluation's."""
        if self._evaluation is not None:
            start, done, batches = self._evaluation
            eta = (time.monotonic() - start) / done * (batches - done) if done else None
            return {"progress": 0.9 + 0.1 * done / batches, "eta_s": eta, "metrics": self.metrics()}
        step = self.record.get("step", 0)
        fields = {"progress": 0.9 * step / self.steps}  # the last 10%: evaluation and publishing
        if self.record:
            fields.update(tokens_per_s=self.record["tokens_per_s"], eta_s=self.record["eta_s"], metrics=self.metrics())
        return fields

    def should_stop(self) -> bool:
        if self.attempt.ctx.stopping.is_set():
            raise WorkerStopping()
        if self.attempt.due:
            self.attempt.beat(**self._fields())
        return self.attempt.cancelled
