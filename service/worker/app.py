"""The Celery app: two queues (``ingest``, ``train``: training and forget jobs), tasks that only call
service.training and service.forgetting.

Reliability settings (DESIGN.md): ``acks_late`` + ``reject_on_worker_lost`` (a task whose worker
process dies is redelivered), prefetch 1, a Redis visibility timeout above the longest job, no result
backend (job state lives in the database). Every worker also runs a watchdog thread that re-queues
jobs whose heartbeat stopped (a whole worker killed, a message lost) and fails them after
``job_max_attempts`` claims: see service/jobs.py.

Embedded default: Celery's filesystem transport in ``<home>/broker`` needs no server; the API
process only writes messages there and the worker process started by ``peer-service serve`` reads them.
"""
from __future__ import annotations

import logging
import threading

import torch
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from ..context import ServiceContext
from ..db.models import Job
from ..jobs import Dispatch, recover_stale_jobs
from ..settings import Settings
from ..forgetting import run_forget_job
from ..training import run_ingest_job, run_train_job

log = logging.getLogger(__name__)

TASKS = {"ingest": "peer.ingest", "train": "peer.train", "forget": "peer.forget"}  # job kind → task name
QUEUES = {"ingest": "ingest", "train": "train", "forget": "train"}  # job kind → queue (forgetting loads a model)


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

    @app.task(name=TASKS["ingest"], acks_late=True)
    def ingest(job_id: int) -> None:
        run_ingest_job(context(), job_id, dispatch)

    @app.task(name=TASKS["train"], acks_late=True)
    def train(job_id: int) -> None:
        run_train_job(context(), job_id)

    @app.task(name=TASKS["forget"], acks_late=True)
    def forget(job_id: int) -> None:
        run_forget_job(context(), job_id)

    watchdog_stop = threading.Event()

    @worker_ready.connect(weak=False)
    def start_watchdog(sender=None, **_):
        if getattr(sender, "app", None) is not app:
            return
        interval = max(1.0, settings.job_stale_seconds / 4)

        def loop() -> None:
            ctx = ServiceContext.from_settings(settings)
            while not watchdog_stop.wait(interval):
                try:
                    recovered = recover_stale_jobs(ctx.sessions, dispatch, settings.job_stale_seconds)
                    if recovered:
                        log.warning("re-queued stale jobs %s", recovered)
                except Exception:  # noqa: BLE001 - the watchdog must outlive a database hiccup
                    log.exception("watchdog pass failed")

        threading.Thread(target=loop, name="peer-job-watchdog", daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def stop_watchdog(sender=None, **_):
        watchdog_stop.set()

    return app


def dispatcher(app: Celery) -> Dispatch:
    def dispatch(job: Job) -> None:
        app.send_task(TASKS[job.kind], args=[job.id], queue=QUEUES[job.kind])

    return dispatch
