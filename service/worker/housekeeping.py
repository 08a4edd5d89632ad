"""The periodic lifecycle work of a worker's watchdog: expert usage roll-ups (service/serving/usage.py), the
retention policy and garbage collection (service/store/retention.py)."""
from __future__ import annotations

import logging
import time

from ..context import ServiceContext
from ..serving.usage import fold_usage, prune_raw_usage
from ..store.retention import apply_retention, collect_garbage

log = logging.getLogger(__name__)


class Housekeeping:
    """The periodic lifecycle work a worker's watchdog runs: fold expert usage into its roll-ups and prune
    folded raw rows, apply the retention policy, collect garbage. :meth:`run_due` does it at most every
    PEER_HOUSEKEEPING_SECONDS; each part's failure is logged and the others still run."""

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.last_run: float | None = None

    def run_due(self) -> None:
        now = time.monotonic()
        if self.last_run is None or now - self.last_run >= self.ctx.settings.housekeeping_seconds:
            self.last_run = now
            self.run()

    def run(self) -> dict:
        settings, done = self.ctx.settings, {}
        parts = {
            "usage_folded": lambda: fold_usage(self.ctx.sessions, settings.usage_bucket_seconds),
            "usage_pruned": lambda: prune_raw_usage(self.ctx.sessions, settings.usage_raw_retention_seconds),
            "versions_deleted": lambda: apply_retention(self.ctx),
            "garbage_bytes": lambda: collect_garbage(self.ctx).bytes,
        }
        for name, part in parts.items():
            try:
                done[name] = part()
            except Exception:  # noqa: BLE001 - the rest of the housekeeping still runs; retried next time
                log.exception("housekeeping: %s failed", name)
        return done
