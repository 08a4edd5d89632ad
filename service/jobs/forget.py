"""The forget job: a new version without one corpus (POST /v1/corpora/{id}/forget).

A corpus trained with growth has segments of its own in every PEER layer (the version's ``segments``
record which corpora each segment was grown for). Forgetting masks them
(:func:`peer_model.continual.forget_segments`: out of retrieval's reach, experts kept for the record),
optionally repairs on the remaining corpora (a short replay with distillation to the parent),
evaluates every corpus the parent knew (the forgotten one included, reported in the job's metrics) and
publishes the child like any training job: a version whose corpora no longer include the forgotten
one, activated when no remaining corpus got worse by more than ``PEER_ACTIVATION_TOLERANCE``.

How much is forgotten depends on where the corpus' knowledge sits: only what its segments hold goes.
Under strategies whose dense layers train (the default), much of it is in shared weights that masking
cannot take back; BENCHMARKS.md section 3c measures this per strategy.
"""
from __future__ import annotations

from peer_model.continual import forget_segments
from peer_model.train import resolve_device

from ..context import ServiceContext
from ..db.models import Job, PoolVersion
from ..errors import Conflict
from ..store.versions import get_version, is_pretrained
from .lease import Dispatch, JobCancelled
from .options import job_train_config, parse_forget_options
from .probes import load_job_probe, probe_units, score_child_and_parent
from .progress import Attempt, JobProgress
from .publish import check_evaluations, forget_gate, publish_version
from .runner import claim_base, corpus_available, evaluate_child_and_parent, run_owned_job, token_data


def segments_to_mask(version: PoolVersion, corpus_id: int) -> dict[int, list[int]]:
    """{PEER layer: positions of the active segments grown for ``corpus_id`` alone} in ``version``;
    409 when the version does not know the corpus, when no segment holds it alone (trained without
    growth, into the initial pool, or together with other corpora), or when it is forgotten already."""
    if corpus_id not in version.corpus_ids:
        raise Conflict(f"version {version.id} does not know corpus {corpus_id}")
    plan: dict[int, list[int]] = {}
    for layer, rows in version.segments.items():
        for position, row in enumerate(rows):
            if corpus_id not in row["corpus_ids"] or row.get("status", "active") == "masked":
                continue
            others = [c for c in row["corpus_ids"] if c != corpus_id]
            if others:
                raise Conflict(f"corpus {corpus_id} shares segment {position} of layer {layer} with corpora {others}: "
                               "masking it would forget them too")
            plan.setdefault(int(layer), []).append(position)
    if not plan:
        raise Conflict(f"corpus {corpus_id} has no segment of its own in version {version.id} (trained without "
                       "growth or into the initial pool): its knowledge is in shared weights and cannot be masked")
    return plan


def run_forget_job(ctx: ServiceContext, job_id: int, dispatch: Dispatch | None = None) -> None:
    run_owned_job(ctx, job_id, _forget_and_publish, dispatch)


def _forget_and_publish(ctx: ServiceContext, job_id: int, attempt: Attempt) -> None:
    settings = ctx.settings
    base_id, follows_active = claim_base(ctx, job_id, attempt.lease, "forgotten from")
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        options = parse_forget_options(dict(job.options), settings.max_train_steps)
        base = get_version(session, base_id)
        corpus_id = job.corpus_ids[0]
        plan = segments_to_mask(base, corpus_id)
        remaining = [c for c in base.corpus_ids if c != corpus_id]
        parent_segments, base_checkpoint, pretrained = base.segments, base.checkpoint, is_pretrained(base)
    repair_steps = settings.forget_repair_steps if options.repair_steps is None else options.repair_steps
    # a corpus deleted since (its text gone from the store) is neither repaired towards nor evaluated
    repair_on = [c for c in remaining if corpus_available(ctx, c, "train")]
    if repair_steps and not repair_on:
        repair_steps = 0  # nothing left to repair towards
    parent = ctx.store.load_model(base_checkpoint, str(resolve_device(settings.device)))
    probe = load_job_probe(ctx, options.probe, parent) if options.probe is not None else None
    cfg = job_train_config(settings, max(1, repair_steps), options.seed, pretrained)  # a training job's rates
    progress = JobProgress(attempt, max(1, repair_steps), {"strategy": "forget", "masked_segments": plan,
                                                           "base_follows_active": follows_active})
    attempt.beat(metrics=progress.metrics())
    remaining_train = [token_data(ctx, [c], "train", parent.tokenizer) for c in repair_on] if repair_steps else []
    child, repair = forget_segments(parent, plan, remaining_train, repair_steps, cfg, settings.distill_weight,
                                    should_stop=progress.should_stop)
    if repair is not None and repair.stopped_early and progress.cancelled:
        raise JobCancelled()
    attempt.stop_if_cancelled()  # a cancel after the repair's last look: nothing is evaluated or published

    val_sets = {c: token_data(ctx, [c], "val", parent.tokenizer) for c in [*remaining, corpus_id]
                if corpus_available(ctx, c, "val")}
    child_bpb, parent_bpb = evaluate_child_and_parent(ctx, child, parent, val_sets, cfg.seq_len, progress,
                                                      also=probe_units(probe))
    check_evaluations(child_bpb, parent_bpb)
    probe_scores = score_child_and_parent(probe, child, parent, progress) if probe is not None else None
    gate = forget_gate(child_bpb, parent_bpb, remaining, corpus_id, settings.activation_tolerance)
    publish_version(ctx, job_id, attempt.lease, base_id, child, parent_segments, [], remaining, "forget",
                    {c: child_bpb[c] for c in remaining if c in child_bpb}, gate, options.activate, {
                        "strategy": "forget", "forgotten_corpus_id": corpus_id, "masked_segments": plan,
                        "repair_steps": repair.steps_done if repair is not None else 0, "expert_lr": cfg.expert_lr,
                        "bpb": {str(c): v for c, v in child_bpb.items()},
                        "parent_bpb": {str(c): v for c, v in parent_bpb.items()},
                    }, probe_scores)