"""Jobs run in a thread of this process, one at a time: a dispatch for tests and demos that want the whole
loop (ingest → train → publish → hot swap) in one process without a broker. ``peer-service serve`` uses
Celery workers instead; the job functions are the same.

    with InlineWorker(settings) as worker:
        app = create_app(settings, dispatch=worker.dispatch)
"""
from __future__ import annotations

import logging
import queue
import threading

from ..context import ServiceContext
from ..db.models import Job
from ..jobs.forget import run_forget_job
from ..jobs.ingest import run_ingest_job
from ..jobs.train import run_train_job
from ..logs import job_context
from ..settings import Settings

log = logging.getLogger(__name__)


class InlineWorker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._queue: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="peer-inline-worker", daemon=True)
        self._ctx: ServiceContext | None = None

    def dispatch(self, job: Job) -> None:
        self._queue.put((job.kind, job.id))

    def _run(self) -> None:
        ctx = self._ctx = ServiceContext.from_settings(self.settings)
        while (item := self._queue.get()) is not None:
            kind, job_id = item
            try:
                with job_context(job_id):  # its log lines carry job_id, as a Celery worker's do
                    if kind == "ingest":
                        run_ingest_job(ctx, job_id, self.dispatch)
                    elif kind == "train":
                        run_train_job(ctx, job_id)
                    elif kind == "forget":
                        run_forget_job(ctx, job_id)
            except Exception:  # noqa: BLE001 - the job functions record failures; keep serving the queue
                log.exception("inline worker: %s job %s", kind, job_id)
            finally:
                self._queue.task_done()
        ctx.close()

    def join(self) -> None:
        """Wait until every job dispatched so far (and what they dispatched) has run."""
        self._queue.join()

    def __enter__(self) -> "InlineWorker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join(timeout=120)
