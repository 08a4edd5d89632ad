"""The Celery app: two queues (``ingest``, ``train``: training and forget jobs), tasks that only call
service/jobs/ (ingest, train, forget).

Reliability settings (DESIGN.md): ``acks_late`` + ``reject_on_worker_lost`` (a task whose worker
process dies is redelivered), prefetch 1, a Redis visibility timeout above the longest job, no result
backend (job state lives in the database). Every worker also runs a watchdog thread (every
``job_watchdog_seconds``) that sends jobs whose message never reached the broker (it was down when the
API stored them) or was lost, re-queues jobs whose heartbeat stopped (a whole worker killed) and fails
them after ``job_max_attempts`` claims: see service/jobs/lease.py. A warm shutdown (SIGTERM, Ctrl-C) hands
the running job back to the queue at once instead of finishing it.

Embedded default: Celery's filesystem transport in ``<home>/broker`` needs no server; the API
process only writes messages there and the worker process started by ``peer-service serve`` reads them.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from prometheus_client import start_http_server

from ..context import ServiceContext
from ..db.models import Job
from ..jobs.forget import run_forget_job
from ..jobs.ingest import run_ingest_job
from ..jobs.lease import QUEUES, Dispatch, recover_stale_jobs
from ..jobs.sharded_stage import sweep_work_directories
from ..jobs.train import run_train_job
from ..logs import job_context
from ..metrics import WorkerMetrics
from ..settings import Settings
from .housekeeping import Housekeeping

log = logging.getLogger(__name__)

TASKS = {"ingest": "peer.ingest", "train": "peer.train", "forget": "peer.forget"}  # job kind → task name


def broker_options(settings: Settings) -> dict:
    if settings.embedded:
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                "control_folder": str(folder / "control")}
    return {"visibility_timeout": settings.broker_visibility_timeout}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("peer_service", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="ingest",
        task_routes={name: {"queue": QUEUES[kind]} for kind, name in TASKS.items()},
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded,  # the filesystem transport has no broadcast
    )
    app.peer_settings = settings
    state: dict[str, ServiceContext] = {}

    def context() -> ServiceContext:
        if "ctx" not in state:  # created in the process that runs tasks (after any fork)
            if settings.worker_torch_threads:
                torch.set_num_threads(settings.worker_torch_threads)
            state["ctx"] = ServiceContext.from_settings(settings)
        return state["ctx"]

    dispatch = dispatcher(app)
    app.peer_metrics = metrics = WorkerMetrics(lambda: context().sessions())

    @contextmanager
    def running(kind: str, job_id: int) -> Iterator[ServiceContext]:
        """A job's task: its log lines carry job_id, its run is counted in the worker's metrics."""
        with job_context(job_id), metrics.job(kind, job_id):
            yield context()

    @app.task(name=TASKS["ingest"], acks_late=True)
    def ingest(job_id: int) -> None:
        with running("ingest", job_id) as ctx:
            run_ingest_job(ctx, job_id, dispatch)

    @app.task(name=TASKS["train"], acks_late=True)
    def train(job_id: int) -> None:
        with running("train", job_id) as ctx:
            run_train_job(ctx, job_id, dispatch)

    @app.task(name=TASKS["forget"], acks_late=True)
    def forget(job_id: int) -> None:
        with running("forget", job_id) as ctx:
            run_forget_job(ctx, job_id, dispatch)

    watchdog_stop = threading.Event()

    @worker_ready.connect(weak=False)
    def start_watchdog(sender=None, **_):
        if getattr(sender, "app", None) is not app:
            return
        sweep_work_directories()  # what a sharded stage of a killed worker left in the temporary folder
        if settings.worker_metrics_port:  # the solo pool (the default) runs the tasks in this very process
            try:
                start_http_server(settings.worker_metrics_port, registry=metrics.registry)
                log.info("worker metrics on port %s", settings.worker_metrics_port)
            except OSError as exc:  # metrics are not worth a worker without its watchdog
                log.error("worker metrics not served: port %s: %s", settings.worker_metrics_port, exc)
        interval = settings.job_watchdog_seconds

        def loop() -> None:
            ctx = ServiceContext.from_settings(settings)
            housekeeping = Housekeeping(ctx)  # usage roll-ups, retention, garbage collection (housekeeping.py)
            while True:  # a first pass at once: jobs handed back or never sent go without waiting
                try:
                    recovered = recover_stale_jobs(ctx.sessions, dispatch, settings.job_stale_seconds)
                    if recovered:
                        log.warning("re-queued stale jobs %s", recovered)
                except Exception:  # noqa: BLE001 - the watchdog must outlive a database hiccup
                    log.exception("watchdog pass failed")
                housekeeping.run_due()
                if watchdog_stop.wait(interval):
                    return

        threading.Thread(target=loop, name="peer-job-watchdog", daemon=True).start()

    @worker_shutting_down.connect(weak=False)
    def hand_back(sender=None, **_):
        """Warm shutdown (SIGTERM, Ctrl-C) begins: the running job stops at its next step and goes back to
        the queue (service.jobs.progress.WorkerStopping) instead of holding the worker until it ends."""
        if "ctx" in state:
            state["ctx"].stopping.set()

    @worker_shutdown.connect(weak=False)
    def stop_watchdog(sender=None, **_):
        watchdog_stop.set()

    return app


def dispatcher(app: Celery) -> Dispatch:
    def dispatch(job: Job) -> None:
        app.send_task(TASKS[job.kind], args=[job.id], queue=QUEUES[job.kind])

    return dispatch
