"""Prometheus metrics of one API process and of one worker process (each its own registry, so several apps can
live in one test process).

Worker processes serve theirs over prometheus_client's own HTTP server (PEER_WORKER_METRICS_PORT, see
service/worker/app.py) rather than writing them to the database: a scrape costs the database at most one
primary-key read, needs no schema, still answers while the database is down, and a dead worker's series
disappear with it instead of lingering as rows someone must expire. What the database knows (jobs by state, the oldest queued job) the API's
``/metrics`` reads from it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from .db.models import FINAL_JOB_STATES, Job, utcnow

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # resident memory, CPU seconds, open files of this process
        self.requests = Counter("peer_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("peer_http_request_seconds", "HTTP request latency to the response start (streams: their first byte)",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.server_errors = Counter("peer_http_server_errors_total",
                                     "unhandled exceptions answered with a 500, by route and exception type",
                                     ["route", "exception"], registry=self.registry)
        self.tokens = Counter("peer_tokens_generated_total", "completion tokens generated", registry=self.registry)
        self.first_token = Histogram("peer_time_to_first_token_seconds", "submission to first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation = Histogram("peer_generation_seconds", "submission to the last token of a finished generation",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("peer_inter_token_seconds", "time between consecutive tokens of one generation",
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("peer_generation_queue_depth", "generations running or queued",
                                 registry=self.registry)
        self.active_version = Gauge("peer_active_version", "pool version served by this process",
                                    registry=self.registry)
        self.database_up = Gauge("peer_database_up", "1 when the last scrape could read the database; 0: the "
                                 "database-derived metrics (peer_jobs, peer_oldest_queued_job_seconds) were skipped",
                                 registry=self.registry)
        self.database = DatabaseGauges(self.registry)


class DatabaseGauges:
    """What ``/metrics`` reads from the database at each scrape: jobs by kind and state, the age of the oldest
    queued job. After a failed read there are none, rather than stale values (``peer_database_up`` says why)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families: list[GaugeMetricFamily] = []
        registry.register(self)

    def describe(self) -> list:
        return []  # nothing to check for name clashes at registration (and no database read then)

    def collect(self) -> list[GaugeMetricFamily]:
        return list(self.families)

    def clear(self) -> None:
        self.families = []

    def refresh(self, session: Session) -> None:
        jobs = GaugeMetricFamily("peer_jobs", "jobs by kind and state (from the database)", labels=["kind", "state"])
        for kind, state, count in session.execute(select(Job.kind, Job.state, func.count())
                                                  .group_by(Job.kind, Job.state)).all():
            jobs.add_metric([kind, state], count)
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        self.families = [jobs, GaugeMetricFamily("peer_oldest_queued_job_seconds", "age of the oldest queued job "
                                                 "(0: none queued; from the database)", value=max(0.0, age))]


class WorkerMetrics:
    """One worker process: the jobs it ran by kind and outcome, the one it runs now, its training speed.

    ``sessions`` reads the job rows: after a run, its outcome (the state the run left; ``skipped`` when this
    delivery did not finish it: not claimed, or its lease lost to another attempt; ``unknown`` when the database
    could not be read); at a scrape, the running job's tokens/s (one primary-key read, as its heartbeat wrote it).
    """

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.sessions = sessions
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.jobs = Counter("peer_worker_jobs_total", "jobs this worker ran, by kind and outcome (succeeded, failed, "
                            "cancelled; skipped: not claimed or lost to another attempt; unknown: database unreadable)",
                            ["kind", "outcome"], registry=self.registry)
        self.current_job = Gauge("peer_worker_current_job", "id of the job running now (0: idle)", ["kind"],
                                 registry=self.registry)
        self.job_seconds = Histogram("peer_worker_job_seconds", "wall time of a job run, by kind", ["kind"],
                                     buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
                                     registry=self.registry)
        self.train_tokens_per_s = Gauge("peer_worker_train_tokens_per_second",
                                        "training tokens/s of the running training job, else of the last one",
                                        registry=self.registry)
        self.train_tokens_per_s.set_function(self._tokens_per_s)
        self._running: int | None = None  # a training (or forget) job this process runs now
        self._last_tokens_per_s = 0.0

    @contextmanager
    def job(self, kind: str, job_id: int) -> Iterator[None]:
        """Around one delivery of a job's task."""
        started, clock = utcnow(), time.perf_counter()
        self.current_job.labels(kind=kind).set(job_id)
        if kind != "ingest":
            self._running = job_id
        log.info("%s job %s: delivered", kind, job_id)
        try:
            yield
        finally:
            seconds = time.perf_counter() - clock
            self.job_seconds.labels(kind=kind).observe(seconds)
            self.current_job.labels(kind=kind).set(0)
            self._running = None
            outcome, tokens_per_s = self._outcome(job_id, started)
            self.jobs.labels(kind=kind, outcome=outcome).inc()
            log.info("%s job %s: %s after %.1f s", kind, job_id, outcome, seconds)
            if kind != "ingest" and outcome == "succeeded" and tokens_per_s:
                self._last_tokens_per_s = tokens_per_s

    def _outcome(self, job_id: int, started) -> tuple[str, float | None]:
        try:
            with self.sessions() as session:
                job = session.get(Job, job_id)
        except SQLAlchemyError:
            return "unknown", None
        if job is None or job.state not in FINAL_JOB_STATES or job.finished_at is None or job.finished_at < started:
            return "skipped", None
        return job.state, job.tokens_per_s

    def _tokens_per_s(self) -> float:
        running = self._running
        if running is not None:
            try:
                with self.sessions() as session:
                    value = session.scalar(select(Job.tokens_per_s).where(Job.id == running))
                if value:
                    return float(value)
            except SQLAlchemyError:
                pass  # the last known value, rather than a failed scrape
        return self._last_tokens_per_s
