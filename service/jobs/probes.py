"""Probes in the service: accepting an upload (validated in full, its JSONL written to the store before the row
that names it commits), checking a training job's ``probe`` option at submission, and, in the job, scoring the
trained child and its parent on it (:func:`peer_model.probe.score_probe`: greedy answers, exact match) with
progress, heartbeat and cancellation. The scores are published with the version (jobs/publish.py)."""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from sqlalchemy.orm import Session
from torch import nn

from peer_model.probe import ProbeItem, parse_probe, score_probe
from peer_model.tokenizer import context_ids

from ..context import ServiceContext
from ..db.models import Probe
from ..errors import InvalidInput, PayloadTooLarge, StorageUnavailable
from ..settings import Settings
from .ingest import decode_utf8
from .progress import JobProgress


def parse_probe_upload(settings: Settings, data: bytes) -> list[ProbeItem]:
    """The items of an uploaded probe: 413 past PEER_MAX_PROBE_BYTES, 422 for anything :func:`parse_probe` refuses
    and for more items than a job scores (PEER_MAX_PROBE_ITEMS)."""
    if len(data) > settings.max_probe_bytes:
        raise PayloadTooLarge(f"the probe is {len(data)} bytes; the limit is {settings.max_probe_bytes} bytes "
                              f"(PEER_MAX_PROBE_BYTES)")
    try:
        items = parse_probe(decode_utf8(data, "the probe"))
    except ValueError as exc:
        raise InvalidInput(f"invalid probe: {exc}") from None
    check_probe_size(settings, len(items))
    return items


def check_probe_size(settings: Settings, items: int, what: str = "the probe") -> None:
    if items > settings.max_probe_items:
        raise InvalidInput(f"{what} holds {items} items; a job scores at most {settings.max_probe_items} "
                           f"(PEER_MAX_PROBE_ITEMS)")


def accept_probe(ctx: ServiceContext, session: Session, name: str, data: bytes) -> Probe:
    """Validate and record a probe: its row, then its JSONL in the store (a failed write rolls the row back; a
    failed commit leaves a file that garbage collection removes). The caller commits."""
    items = parse_probe_upload(ctx.settings, data)
    probe = Probe(name=name, sha256=hashlib.sha256(data).hexdigest(), raw_bytes=len(data), items=len(items),
                  kinds=dict(Counter(item.kind for item in items)))
    session.add(probe)
    session.flush()
    try:
        ctx.store.write_probe(probe.id, data)
    except OSError as exc:
        raise StorageUnavailable(f"the store cannot take the probe now ({exc.strerror or exc}); nothing was stored, "
                                 f"retry later") from None
    return probe


def check_probe_option(settings: Settings, session: Session, probe_id: int | None) -> None:
    """At submission: a job's ``probe`` names an uploaded probe that a job may score (422 otherwise)."""
    if probe_id is None:
        return
    probe = session.get(Probe, probe_id)
    if probe is None:
        raise InvalidInput(f"invalid job options: probe {probe_id} not found; upload it first (POST /v1/probes)")
    check_probe_size(settings, probe.items, f"probe {probe_id}")


@dataclass(frozen=True)
class JobProbe:
    id: int
    name: str
    items: list[ProbeItem]


def load_job_probe(ctx: ServiceContext, probe_id: int, model: nn.Module) -> JobProbe:
    """The job's probe, checked against ``model`` before any training (a job fails at once rather than after
    it): within PEER_MAX_PROBE_ITEMS as set now, every prompt within the model's context window."""
    with ctx.sessions() as session:
        probe = session.get(Probe, probe_id)
        if probe is None:
            raise InvalidInput(f"probe {probe_id} not found")
        name = probe.name
    items = parse_probe(ctx.store.read_probe(probe_id))
    check_probe_size(ctx.settings, len(items), f"probe {probe_id}")
    tokenizer, window = model.tokenizer, model.config.max_seq_len
    for index, item in enumerate(items, start=1):
        needed = len(context_ids(tokenizer, tokenizer.encode(item.prompt)))
        if needed > window:
            raise InvalidInput(f"probe {probe_id}, item {index}: the prompt takes {needed} tokens; the model's "
                               f"context holds {window}")
    return JobProbe(probe_id, name, items)


def score_child_and_parent(probe: JobProbe, child: nn.Module, parent: nn.Module, progress: JobProgress) -> dict:
    """Both versions' scores on the probe (each with its own tokenizer, greedy), as the version records them; the
    job's progress follows the items (:meth:`JobProgress.on_scored_item`: heartbeats, cancellation)."""
    scores = {"probe": probe.id, "name": probe.name, "items": len(probe.items)}
    for label, model in (("child", child), ("parent", parent)):
        scores[label] = score_probe(model, model.tokenizer, probe.items, on_item=progress.on_scored_item)
    return scores


def probe_units(probe: JobProbe | None) -> int:
    """Items the job will answer (child and parent), for its progress and ETA."""
    return 2 * len(probe.items) if probe is not None else 0
