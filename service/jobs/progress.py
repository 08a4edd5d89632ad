"""A running job's progress: a heartbeat with progress, speed, ETA and the loss curve, the cancel flag, the
worker's shutdown (:class:`WorkerStopping`), and the database errors a heartbeat (or a publication) rides out."""
from __future__ import annotations

import logging
import time

from sqlalchemy.exc import InterfaceError, OperationalError

from ..context import ServiceContext
from .lease import heartbeat

log = logging.getLogger(__name__)
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)  # the connection, not the statement, failed


class WorkerStopping(Exception):
    """The worker is shutting down (SIGTERM, Ctrl-C): the job goes back to the queue at once."""


class JobProgress:
    """Training callbacks: heartbeat (progress, speed, ETA, loss) every ``job_heartbeat_seconds``, cancel flag,
    the worker's shutdown (raises WorkerStopping).

    A heartbeat that fails because the database is unreachable does not fail the job: training goes on
    and the next heartbeat tries again, for up to ``job_db_outage_seconds`` (below the stale timeout, after
    which another worker may claim the job); a longer outage raises the error.

    The job's ``metrics`` carry ``base_metrics`` (e.g. the strategy), the latest step, loss and learning
    rate, and ``loss_history``: [step, loss] points over the whole run, at most ``HISTORY_POINTS`` (when
    full, every other point is dropped and points are kept half as often), always ending at the latest
    record. The console draws it as the job's loss curve."""

    HISTORY_POINTS = 200

    def __init__(self, ctx: ServiceContext, job_id: int, lease: str, steps: int, base_metrics: dict | None = None):
        self.ctx, self.job_id, self.lease, self.steps = ctx, job_id, lease, steps
        self.base_metrics = dict(base_metrics or {})
        self.last_beat = 0.0
        self.record: dict = {}
        self.cancelled = False
        self._outage_since: float | None = None
        self._points: list[list[float]] = []
        self._seen = 0
        self._stride = 1
        self._evaluation: tuple[float, int, int] | None = None  # (start, batches done, batches in all)

    def on_log(self, record: dict) -> None:
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
        if self.ctx.stopping.is_set():
            raise WorkerStopping()
        now = time.monotonic()
        if now - self.last_beat >= self.ctx.settings.job_heartbeat_seconds:
            self.last_beat = now
            try:
                self.cancelled = heartbeat(self.ctx.sessions, self.job_id, self.lease, **self._fields())
                self._outage_since = None
            except TRANSIENT_DB_ERRORS as exc:
                self._outage_since = self._outage_since or now
                if now - self._outage_since > self.ctx.settings.job_db_outage_seconds:
                    raise
                log.warning("job %s: heartbeat failed (%s); training goes on, retrying", self.job_id,
                            type(exc).__name__)
        return self.cancelled
