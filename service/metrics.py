"""Prometheus metrics of one API process (its own registry, so several apps can live in one test process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("peer_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("peer_http_request_seconds", "HTTP request latency to the response start (streams: their first byte)",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("peer_tokens_generated_total", "completion tokens generated", registry=self.registry)
        self.first_token = Histogram("peer_time_to_first_token_seconds", "submission to first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("peer_generation_queue_depth", "generations running or queued",
                                 registry=self.registry)
        self.active_version = Gauge("peer_active_version", "pool version served by this process",
                                    registry=self.registry)
        self.jobs = Gauge("peer_jobs", "jobs by kind and state (from the database)", ["kind", "state"],
                          registry=self.registry)
