"""Expert usage roll-ups: what /v1/experts/* reads instead of every window ever stored.

The engine writes one ``expert_usage`` row per version, PEER layer and flush window (thousands a day per
layer). :func:`fold_usage` (run by the worker's housekeeping) adds the rows not folded yet into two roll-ups
and marks them folded, in one transaction:

- ``expert_usage_totals``: one row per (version, layer), the sum of every folded window;
- ``expert_usage_buckets``: one row per (version, layer, time bucket of PEER_USAGE_BUCKET_SECONDS by the
  window's end), for the history.

Readers add the rows not folded yet to the roll-ups in the same SQL statement (one snapshot: a fold that
commits in between cannot make a window count twice or not at all), so the answers are exactly the sums
over the raw rows, at O(layers) rows for the utilization and O(buckets) for the history, plus the few
windows since the last fold. Folded raw rows older than PEER_USAGE_RAW_RETENTION_SECONDS are deleted.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import cast, delete, false, literal, null, select, true, union_all, update
from sqlalchemy.orm import Session, sessionmaker

from ..db.models import ExpertUsage, ExpertUsageBucket, ExpertUsageTotal, utcnow
from ..db.session import transaction

FOLD_BATCH = 1000  # raw rows per fold transaction


def merge_counts(blobs: list[bytes]) -> bytes:
    """Sum sparse counters in the ``expert_usage.counts`` encoding (int64 ids, then int64 counts; an id appears
    at most once per blob), through one dense array as long as the largest id."""
    total = np.zeros(0, dtype=np.int64)
    for blob in blobs:
        pairs = np.frombuffer(blob, dtype="<i8")
        ids, counts = pairs[:pairs.size // 2], pairs[pairs.size // 2:]
        if not ids.size:
            continue
        if int(ids.max()) >= total.size:
            total = np.pad(total, (0, int(ids.max()) + 1 - total.size))
        total[ids] += counts
    used = np.flatnonzero(total)
    return np.concatenate([used, total[used]]).astype("<i8").tobytes() if used.size else b""


def bucket_of(moment: datetime, bucket_seconds: int) -> datetime:
    """The start of the time bucket ``moment`` falls in (buckets are aligned on the Unix epoch)."""
    seconds = int(moment.timestamp()) // bucket_seconds * bucket_seconds
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


@dataclass
class Usage:
    """Summed windows; ``counts`` in the ``expert_usage.counts`` encoding (merged once, when first read)."""

    tokens: int = 0
    windows: int = 0
    last_end: datetime | None = None
    parts: list[bytes] = field(default_factory=list)

    def add(self, tokens: int, windows: int, counts: bytes, end: datetime | None = None) -> None:
        self.tokens += tokens
        self.windows += windows
        self.parts.append(counts)
        if end is not None and (self.last_end is None or end > self.last_end):
            self.last_end = end

    @property
    def counts(self) -> bytes:
        if len(self.parts) != 1:
            self.parts = [merge_counts(self.parts)]
        return self.parts[0]


# ---- folding -----------------------------------------------------------------------------------------


def fold_usage(sessions: sessionmaker[Session], bucket_seconds: int, batch: int = FOLD_BATCH) -> int:
    """Fold every raw row not folded yet into the totals and buckets; returns the number folded. Safe to
    run in several processes at once: a row is marked folded by a conditional UPDATE before its counts are
    added, and a transaction that could not mark all of its rows adds nothing."""
    folded = 0
    while True:
        with transaction(sessions) as session:
            rows = session.execute(
                select(ExpertUsage.id, ExpertUsage.version_id, ExpertUsage.layer, ExpertUsage.window_end,
                       ExpertUsage.tokens, ExpertUsage.counts)
                .where(ExpertUsage.folded.is_(false())).order_by(ExpertUsage.id).limit(batch)
                .with_for_update(skip_locked=True)).all()
            if not rows:
                return folded
            ids = [row.id for row in rows]
            marked = session.execute(update(ExpertUsage).where(ExpertUsage.id.in_(ids), ExpertUsage.folded.is_(false()))
                                     .values(folded=True)).rowcount
            if marked != len(ids):  # another process folds these rows: leave them to it
                session.rollback()
                return folded
            _add_to_rollups(session, rows, bucket_seconds)
        folded += len(rows)


def _add_to_rollups(session: Session, rows, bucket_seconds: int) -> None:
    totals: dict[tuple[int, int], Usage] = defaultdict(Usage)
    buckets: dict[tuple[int, int, datetime], Usage] = defaultdict(Usage)
    for row in rows:
        totals[row.version_id, row.layer].add(row.tokens, 1, row.counts)
        buckets[row.version_id, row.layer, bucket_of(row.window_end, bucket_seconds)].add(
            row.tokens, 1, row.counts, row.window_end)
    for (version_id, layer), usage in totals.items():
        total = session.scalars(select(ExpertUsageTotal).where(
            ExpertUsageTotal.version_id == version_id, ExpertUsageTotal.layer == layer).with_for_update()).one_or_none()
        if total is None:
            session.add(ExpertUsageTotal(version_id=version_id, layer=layer, tokens=usage.tokens,
                                         windows=usage.windows, counts=usage.counts))
            continue
        total.tokens, total.windows = total.tokens + usage.tokens, total.windows + usage.windows
        total.counts = merge_counts([total.counts, usage.counts])
    for (version_id, layer, start), usage in buckets.items():
        bucket = session.scalars(select(ExpertUsageBucket).where(
            ExpertUsageBucket.version_id == version_id, ExpertUsageBucket.layer == layer,
            ExpertUsageBucket.bucket_start == start).with_for_update()).one_or_none()
        if bucket is None:
            session.add(ExpertUsageBucket(version_id=version_id, layer=layer, bucket_start=start,
                                          last_window_end=usage.last_end, tokens=usage.tokens,
                                          windows=usage.windows, counts=usage.counts))
            continue
        bucket.tokens, bucket.windows = bucket.tokens + usage.tokens, bucket.windows + usage.windows
        bucket.counts = merge_counts([bucket.counts, usage.counts])
        bucket.last_window_end = max(bucket.last_window_end, usage.last_end)


def prune_raw_usage(sessions: sessionmaker[Session], retention_seconds: float) -> int:
    """Delete folded raw rows whose window ended more than ``retention_seconds`` ago; returns how many."""
    cutoff = utcnow() - timedelta(seconds=retention_seconds)
    with transaction(sessions) as session:
        return session.execute(delete(ExpertUsage).where(ExpertUsage.folded.is_(true()),
                                                         ExpertUsage.window_end < cutoff)).rowcount


# ---- reading -----------------------------------------------------------------------------------------


def _unfolded(version_id: int, layer: int):
    return (ExpertUsage.version_id == version_id, ExpertUsage.layer == layer, ExpertUsage.folded.is_(false()))


def usage_total(session: Session, version_id: int, layer: int) -> Usage:
    """Every window ``version_id`` served on ``layer``, summed: its roll-up row plus the windows not folded yet,
    read in one statement."""
    rolled = select(ExpertUsageTotal.tokens, ExpertUsageTotal.windows, ExpertUsageTotal.counts).where(
        ExpertUsageTotal.version_id == version_id, ExpertUsageTotal.layer == layer)
    raw = select(ExpertUsage.tokens, literal(1).label("windows"), ExpertUsage.counts).where(*_unfolded(version_id, layer))
    usage = Usage()
    for row in session.execute(union_all(rolled, raw)):
        usage.add(row.tokens, row.windows, row.counts)
    return usage


def usage_buckets(session: Session, version_id: int, layer: int, bucket_seconds: int) -> list[Usage]:
    """The windows ``version_id`` served on ``layer`` per time bucket, oldest first: the bucket roll-ups plus
    the windows not folded yet, read in one statement."""
    rolled = select(ExpertUsageBucket.bucket_start.label("start"), ExpertUsageBucket.last_window_end.label("end"),
                    ExpertUsageBucket.tokens, ExpertUsageBucket.windows, ExpertUsageBucket.counts).where(
        ExpertUsageBucket.version_id == version_id, ExpertUsageBucket.layer == layer)
    raw = select(cast(null(), ExpertUsageBucket.bucket_start.type).label("start"), ExpertUsage.window_end.label("end"),
                 ExpertUsage.tokens,
                 literal(1).label("windows"), ExpertUsage.counts).where(*_unfolded(version_id, layer))
    buckets: dict[datetime, Usage] = defaultdict(Usage)
    for row in session.execute(union_all(rolled, raw)):
        end = _aware(row.end)
        start = _aware(row.start) if row.start is not None else bucket_of(end, bucket_seconds)
        buckets[start].add(row.tokens, row.windows, row.counts, end)
    return [buckets[start] for start in sorted(buckets)]


def _aware(moment: datetime) -> datetime:
    """A datetime from a UNION (the column type's UTC handling does not apply there): UTC, timezone-aware."""
    if isinstance(moment, str):  # SQLite returns the stored text through a UNION
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
