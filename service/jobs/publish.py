"""Publication and the gates: a trained child's checkpoint, then in one transaction its version row, its
evaluations, the job's success and (when asked, or automatically when its gate passed) its activation; the
activation gate of a training job and the gate of a forget job."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ..context import ServiceContext
from ..db.models import Evaluation, PoolVersion, utcnow
from ..db.session import transaction
from ..store.lock import store_write
from ..store.versions import activate, active_version_id, describe_pools, lock_activations
from .lease import JobCancelled, heartbeat, owned_job
from .progress import TRANSIENT_DB_ERRORS, check_finite

log = logging.getLogger(__name__)
T = TypeVar("T")


def publish_version(ctx: ServiceContext, job_id: int, lease: str, base_id: int, child, parent_segments: dict,
                    new_ids: list[int], corpus_ids: list[int], strategy: str, evaluations: dict[int, float],
                    gate: tuple[bool, str], activate_option: str, metrics: dict, probe_scores: dict | None = None
                    ) -> int:
    """Write the child's checkpoint under a key of this attempt's own (an attempt that lost its lease can
    never overwrite what another attempt published), then in one transaction its version row, its
    evaluations (bits per byte per corpus), the job's success with ``metrics`` and, when asked
    (``activate_option`` always, or auto and the gate passed), its activation. The gate compared the child
    with ``base_id`` only: an auto activation happens only while ``base_id`` is still the active version
    (another job may have activated a version meanwhile, whose corpora this child never saw: it is
    published, not activated). A job whose cancellation was requested publishes nothing: JobCancelled, before
    the checkpoint is written or at the commit. A transient database error is retried for up to
    PEER_JOB_DB_OUTAGE_SECONDS. ``probe_scores``: the child's and the parent's scores on the job's probe
    (jobs/probes.py), recorded on the version. Returns the version id."""
    gate_passed, gate_reason = gate
    if retry_transient(lambda: heartbeat(ctx.sessions, job_id, lease), ctx.settings.job_db_outage_seconds,
                       f"job {job_id}: reading its cancel flag"):
        raise JobCancelled()  # cancelled meanwhile: no checkpoint is written
    key = ctx.store.version_key(f"job-{job_id}-{lease[:12]}")
    experts, segments = describe_pools(child, parent_segments, new_ids)

    def commit() -> int:
        with transaction(ctx.sessions) as session:
            job = owned_job(session, job_id, lease)
            if job.cancel_requested:  # cancelled while the checkpoint was written: it is garbage, nothing goes live
                raise JobCancelled()
            version = PoolVersion(parent_id=base_id, job_id=job_id, checkpoint=key,
                                  model_config_json=child.config.to_dict(), experts=experts, segments=segments,
                                  corpus_ids=corpus_ids, strategy=strategy, gate_passed=gate_passed,
                                  gate_reason=gate_reason, probe_scores=probe_scores)
            session.add(version)
            session.flush()
            session.add_all(Evaluation(version_id=version.id, corpus_id=c, bpb=b) for c, b in evaluations.items())
            reason = gate_reason
            activated = activate_option == "always" or (activate_option == "auto" and gate_passed)
            if activated:
                lock_activations(session)
                active = active_version_id(session)
                if activate_option == "auto" and active != base_id:
                    activated = False
                    reason = (f"{gate_reason}; not activated: the active version moved from {base_id} to {active} "
                              f"while this job ran, and this version never saw its corpora")
                else:
                    activate(session, version.id, f"job {job_id}: {gate_reason}"[:200], f"job:{job_id}")
            job.result_version_id, job.base_version_id = version.id, base_id
            job.state, job.progress, job.finished_at, job.lease, job.eta_s = "succeeded", 1.0, utcnow(), None, 0.0
            job.metrics = {**metrics, "activated": activated, "gate": reason}
            return version.id

    with store_write(ctx):  # from the checkpoint's first chunk to its version row (store/lock.py)
        retry_transient(lambda: ctx.store.save_model(key, child, extra={"job_id": job_id, "parent_id": base_id}),
                        ctx.settings.job_db_outage_seconds, f"job {job_id}: writing the checkpoint")
        return retry_transient(commit, ctx.settings.job_db_outage_seconds, f"job {job_id}: publishing")


def retry_transient(operation: Callable[[], T], patience_s: float, what: str) -> T:
    """``operation()``, tried again with growing pauses while the database is unreachable, for up to
    ``patience_s`` seconds; then the error is raised."""
    deadline, pause = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return operation()
        except TRANSIENT_DB_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: database unreachable (%s), retrying in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 10.0)


def check_evaluations(child: dict[int, float], parent: dict[int, float]) -> None:
    """Diverged (the job fails with the reason) when a bits-per-byte figure of the child or the parent is not a
    finite number: it could be neither compared nor stored."""
    for name, evaluation in (("the new version", child), ("its parent", parent)):
        for corpus_id, bpb in evaluation.items():
            check_finite(bpb, f"{name}'s bits per byte on corpus {corpus_id}")


def activation_gate(child: dict[int, float], parent: dict[int, float], old_ids: list[int], new_ids: list[int],
                    tolerance: float) -> tuple[bool, str]:
    """Pass when every old corpus' bpb is within ``tolerance`` (relative) of the parent's and the new
    corpora's mean bpb improved. Written so that a NaN fails it (every comparison with NaN is false)."""
    worse = [c for c in old_ids if not child[c] <= parent[c] * (1 + tolerance)]
    if worse:
        details = ", ".join(f"corpus {c}: {parent[c]:.3f} → {child[c]:.3f}" for c in worse)
        return False, f"forgot more than {tolerance:.0%} on {details}"
    new_child = sum(child[c] for c in new_ids) / len(new_ids)
    new_parent = sum(parent[c] for c in new_ids) / len(new_ids)
    if not new_child < new_parent:
        return False, f"did not learn the new corpora: {new_parent:.3f} → {new_child:.3f} bpb"
    return True, f"new corpora {new_parent:.3f} → {new_child:.3f} bpb; old corpora within {tolerance:.0%}"


def forget_gate(child: dict[int, float], parent: dict[int, float], remaining: list[int], forgotten: int,
                tolerance: float) -> tuple[bool, str]:
    """Pass when every remaining corpus' bpb is within ``tolerance`` (relative) of the parent's; the
    reason also says how far the forgotten corpus' bpb moved."""
    moved = (f"corpus {forgotten}: {parent[forgotten]:.3f} → {child[forgotten]:.3f} bpb" if forgotten in child
             else f"corpus {forgotten}: its text is deleted, not measured")
    worse = [c for c in remaining if c in child and not child[c] <= parent[c] * (1 + tolerance)]
    if worse:
        details = ", ".join(f"corpus {c}: {parent[c]:.3f} → {child[c]:.3f}" for c in worse)
        return False, f"forgetting hurt other corpora by more than {tolerance:.0%}: {details} ({moved})"
    return True, f"forgot {moved}; remaining corpora within {tolerance:.0%}"
