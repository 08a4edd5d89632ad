"""The database is the source of truth: corpora, streams, jobs, pool versions, activations, evaluations
and expert usage. The schema is created by the Alembic migrations in ``migrations/`` only.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text,
    TypeDecorator, UniqueConstraint, false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
JOB_KINDS = ("ingest", "train", "forget")
CORPUS_STATES = ("pending", "ready", "failed", "deleted")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(timezone.utc) if value is not None and value.tzinfo else value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict: JSON, list: JSON}


class Corpus(Base):
    __tablename__ = "corpora"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))  # upload | stream | builtin
    stream_id: Mapped[int | None] = mapped_column(ForeignKey("streams.id"))
    state: Mapped[str] = mapped_column(String(20), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of the raw upload
    raw_bytes: Mapped[int] = mapped_column(BigInteger)
    documents: Mapped[int] = mapped_column(Integer)
    duplicates_removed: Mapped[int | None] = mapped_column(Integer)
    train_bytes: Mapped[int | None] = mapped_column(BigInteger)
    val_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ingested_at: Mapped[datetime | None] = mapped_column()
    deleted_at: Mapped[datetime | None] = mapped_column()  # its files are gone (state "deleted"); the row stays


class Stream(Base):
    __tablename__ = "streams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StreamDocument(Base):
    """A document appended to a stream; ``corpus_id`` is set when a flush turns it into a corpus."""

    __tablename__ = "stream_documents"
    __table_args__ = (Index("ix_stream_documents_pending", "stream_id", "corpus_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"))
    text: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(Integer)
    corpus_id: Mapped[int | None] = mapped_column(ForeignKey("corpora.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # ingest | train | forget
    state: Mapped[str] = mapped_column(String(20), default="queued")
    corpus_ids: Mapped[list] = mapped_column(default=list)
    options: Mapped[dict] = mapped_column(default=dict)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("pool_versions.id"))
    result_version_id: Mapped[int | None] = mapped_column(ForeignKey("pool_versions.id"))
    next_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))  # ingest → the training it started
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease: Mapped[str | None] = mapped_column(String(32))  # the attempt that owns a running job
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    dispatched_at: Mapped[datetime | None] = mapped_column()  # message last sent to the broker; None: not yet


class PoolVersion(Base):
    """A published model: a complete checkpoint in the store. The row exists only once the files do."""

    __tablename__ = "pool_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("pool_versions.id"))
    job_id: Mapped[int | None] = mapped_column(Integer, unique=True)  # the job that made it (no FK: jobs refer here)
    checkpoint: Mapped[str] = mapped_column(String(500), unique=True)  # path relative to the store root
    model_config_json: Mapped[dict] = mapped_column("model_config")
    experts: Mapped[dict] = mapped_column()  # {layer: number of experts}
    segments: Mapped[dict] = mapped_column()  # {layer: [{start, end, rows, cols, tag, corpus_ids}]}
    corpus_ids: Mapped[list] = mapped_column(default=list)  # corpora this version was trained on
    strategy: Mapped[str | None] = mapped_column(String(40))
    gate_passed: Mapped[bool | None] = mapped_column(Boolean)
    gate_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # lifecycle (service/store/retention.py): a pinned version outlives the retention policy; a deleted one has no
    # checkpoint any more (its row stays: lineage, evaluations, activations and usage refer to it)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    deleted_at: Mapped[datetime | None] = mapped_column()
    # the probe its job named, scored on this version and on its parent by that job (service/jobs/probes.py):
    # {"probe": id, "name": ..., "items": n, "child": {kind: {correct, total, accuracy}}, "parent": {...}}
    probe_scores: Mapped[dict | None] = mapped_column()


class Probe(Base):
    """Questions with checkable answers (peer_model/probe.py), uploaded once and named by training jobs; the JSONL
    itself is in the store (``probes/<id>/probe.jsonl``)."""

    __tablename__ = "probes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    raw_bytes: Mapped[int] = mapped_column(Integer)
    items: Mapped[int] = mapped_column(Integer)
    kinds: Mapped[dict] = mapped_column()  # {kind: items of that kind}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Activation(Base):
    """Audit trail; the active version is the one of the latest row."""

    __tablename__ = "activations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id"))
    reason: Mapped[str] = mapped_column(String(200))
    actor: Mapped[str] = mapped_column(String(100))  # "job:<id>", "api", "bootstrap"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("version_id", "corpus_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id"))
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id"))
    bpb: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExpertUsage(Base):
    """Expert selections counted while serving one version, per PEER layer and time window.

    ``counts`` holds the non-zero counters only: int64 expert ids then int64 counts, little-endian
    (a million-expert pool would make dense rows megabytes each).
    """

    __tablename__ = "expert_usage"
    __table_args__ = (Index("ix_expert_usage_version_layer", "version_id", "layer"),
                      Index("ix_expert_usage_folded", "folded", "version_id", "layer"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id"))
    layer: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column()
    window_end: Mapped[datetime] = mapped_column()
    tokens: Mapped[int] = mapped_column(BigInteger)  # token positions routed in the window
    counts: Mapped[bytes] = mapped_column(LargeBinary)
    folded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # into the roll-ups below


class ExpertUsageTotal(Base):
    """Every folded ``expert_usage`` row of one version and layer, summed: what /v1/experts/utilization reads
    (one row per layer, plus the few raw rows not folded yet) instead of the whole history."""

    __tablename__ = "expert_usage_totals"
    __table_args__ = (UniqueConstraint("version_id", "layer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id"))
    layer: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    windows: Mapped[int] = mapped_column(Integer)  # raw rows folded in
    counts: Mapped[bytes] = mapped_column(LargeBinary)  # encoded as ExpertUsage.counts


class ExpertUsageBucket(Base):
    """The folded ``expert_usage`` rows of one version and layer whose windows ended in one time bucket
    (PEER_USAGE_BUCKET_SECONDS): /v1/experts/utilization/history reads one row per bucket."""

    __tablename__ = "expert_usage_buckets"
    __table_args__ = (UniqueConstraint("version_id", "layer", "bucket_start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id"))
    layer: Mapped[int] = mapped_column(Integer)
    bucket_start: Mapped[datetime] = mapped_column()
    last_window_end: Mapped[datetime] = mapped_column()  # the latest window_end folded into the bucket
    tokens: Mapped[int] = mapped_column(BigInteger)
    windows: Mapped[int] = mapped_column(Integer)
    counts: Mapped[bytes] = mapped_column(LargeBinary)


class ConsoleSession(Base):
    """A console sign-in (service/api/sessions.py): the browser holds a signed random id in a cookie, the row
    holds its hash, the key it acts as (by name, and a fingerprint of the secret it was opened with: a key
    removed from PEER_API_KEYS or given another secret signs its sessions out) and when it ends."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the cookie's id, never the id
    key_name: Mapped[str] = mapped_column(String(64))
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()  # signed out, or revoked by `peer-service sessions`
