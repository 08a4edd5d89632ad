"""Logging: one JSON object per line (PEER_LOG_FORMAT=json, the default of ``peer-service api|worker|serve``) or
plain text, every line carrying the request or the job it was written for.

The request id (set by the API's request-id middleware) and the job id (set by a worker around each task) live in
context variables, so any log call made while serving that request or running that job, in any module, carries
them without being passed along. asyncio gives each request's task its own copy of the context; a thread does
not inherit it, which is why :func:`job_context` is entered in the thread that runs the job.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

request_id: ContextVar[str | None] = ContextVar("peer_request_id", default=None)
job_id: ContextVar[int | None] = ContextVar("peer_job_id", default=None)

LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"
# what every LogRecord has; anything else on a record came from ``extra=`` and goes into the JSON object
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "context", "request_id", "job_id", "color_message"}  # color_message: uvicorn's, for terminals


@contextmanager
def job_context(job: int) -> Iterator[None]:
    """Log lines written inside carry ``job_id`` (a worker running one job)."""
    token = job_id.set(job)
    try:
        yield
    finally:
        job_id.reset(token)


class ContextFilter(logging.Filter):
    """Copies the request and job ids of the current context onto each record (``None`` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id, record.job_id = request_id.get(), job_id.get()
        ids = [f"{name}={value}" for name, value in (("request", record.request_id), ("job", record.job_id)) if value]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        return True


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id"?, "job_id"?, "exception"?, ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in ("request_id", "job_id"):
            if getattr(record, name, None) is not None:
                entry[name] = getattr(record, name)
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_handler(log_format: str, stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def setup_logging(log_format: str, level: str | int = "INFO", stream=None) -> None:
    """One handler on the root logger in ``log_format``; uvicorn's and Celery's loggers propagate to it (their own
    handlers are removed so that no line is written twice or in another format)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(log_format, stream))
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings (e.g. Celery's) become log lines too
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
