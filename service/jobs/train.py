"""The train job as a plain function (the Celery task only calls it): parent version →
:func:`peer_model.continual.continual_stage` (by default: grow a segment in every PEER layer, fine-tune everything
on half replay of earlier corpora with distillation to the parent; when an earlier corpus' text is gone from the
store, the parent's own samples are replayed instead) → bits per byte on the validation split of every corpus the
version knows (whose text is still there), and when the job names a probe, the child's and the parent's greedy
answers to it (jobs/probes.py) → publish (publish.py): the checkpoint is written first, then in one
transaction the version row, its evaluations, the job's success and (when the activation gate passes) the
activation. A crash at any point before that commit leaves no version row, so no half version is ever visible;
each attempt writes its own checkpoint key, so an attempt that lost its lease never touches a published version
(its orphaned files are collected by the store's garbage collection).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from sqlalchemy import select

from peer_model.continual import ContinualOptions, continual_stage
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainResult, resolve_device

from ..context import ServiceContext
from ..db.models import Corpus, Job
from ..errors import InvalidInput
from ..store.versions import get_version, is_pretrained
from .lease import Dispatch, JobCancelled
from .options import check_pool_size, continual_options, parse_job_options, replay_source
from .probes import load_job_probe, probe_units, score_child_and_parent
from .progress import Attempt, JobProgress
from .publish import activation_gate, check_evaluations, publish_version
from .runner import claim_base, corpus_available, evaluate_child_and_parent, run_owned_job, token_data
from .sharded_stage import run_sharded_stage


def run_train_job(ctx: ServiceContext, job_id: int, dispatch: Dispatch | None = None) -> None:
    run_owned_job(ctx, job_id, _train_and_publish, dispatch)


def _train_and_publish(ctx: ServiceContext, job_id: int, attempt: Attempt) -> None:
    settings = ctx.settings
    base_id, follows_active = claim_base(ctx, job_id, attempt.lease, "trained from")
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        base = get_version(session, base_id)
        new_ids = list(dict.fromkeys(job.corpus_ids))  # each corpus once (a job queued before ids were checked)
        corpora = {c.id: c for c in session.scalars(select(Corpus).where(Corpus.id.in_(new_ids)))}
        not_ready = [c for c in new_ids if c not in corpora or corpora[c].state != "ready"]
        if not_ready:
            raise InvalidInput(f"corpora {not_ready} are not ingested (state must be 'ready')")
        options = dict(job.options)
        old_ids = [c for c in base.corpus_ids if c not in new_ids]
        parent_segments, base_checkpoint, pretrained = base.segments, base.checkpoint, is_pretrained(base)
        base_experts = dict(base.experts)
    job_options = parse_job_options(options)
    parent = ctx.store.load_model(base_checkpoint, str(resolve_device(settings.device)))
    tokenizer = parent.tokenizer
    probe = load_job_probe(ctx, job_options.probe, parent) if job_options.probe is not None else None
    stage_options = continual_options(settings, job_options, has_old_corpora=bool(old_ids) or pretrained,
                                      has_pool=bool(parent.peer_layers()), pretrained=pretrained)
    check_pool_size(settings, base_experts, stage_options.new_experts)  # the base may have grown since submission
    if settings.train_seq_len > parent.config.max_seq_len:
        stage_options = replace(stage_options, train=replace(stage_options.train, seq_len=parent.config.max_seq_len))
    new_train = token_data(ctx, new_ids, "train", tokenizer)
    if len(new_train) < stage_options.train.seq_len:
        raise InvalidInput(f"the new corpora hold {len(new_train)} tokens of training text; "
                           f"at least {stage_options.train.seq_len} (PEER_TRAIN_SEQ_LEN) are needed")
    gone = [c for c in old_ids if not corpus_available(ctx, c, "train")]
    available = [c for c in old_ids if c not in gone]
    stage_options = replace(stage_options, replay_source=replay_source(stage_options, bool(gone), bool(available),
                                                                       pretrained))
    old_train = [token_data(ctx, [c], "train", tokenizer) for c in available]
    progress = JobProgress(attempt, stage_options.train.steps,
                           {"strategy": stage_options.strategy, "base_follows_active": follows_active})
    attempt.beat(metrics=progress.metrics())

    child, train_result, processes = train_stage(ctx, parent, new_train, old_train, stage_options, f"job:{job_id}",
                                                 progress)
    attempt.stop_if_cancelled()  # a cancel after the loop's last look: nothing is evaluated or published
    all_ids = old_ids + new_ids
    val_sets = {c: token_data(ctx, [c], "val", tokenizer) for c in all_ids
                if corpus_available(ctx, c, "val")}
    old_ids_evaluated = [c for c in old_ids if c in val_sets]
    child_bpb, parent_bpb = evaluate_child_and_parent(ctx, child, parent, val_sets, stage_options.train.seq_len,
                                                      progress, also=probe_units(probe))
    check_evaluations(child_bpb, parent_bpb)
    probe_scores = score_child_and_parent(probe, child, parent, progress) if probe is not None else None
    gate = activation_gate(child_bpb, parent_bpb, old_ids_evaluated, new_ids, settings.activation_tolerance)
    publish_version(ctx, job_id, attempt.lease, base_id, child, parent_segments, new_ids, all_ids,
                    stage_options.strategy, child_bpb, gate, job_options.activate, {
                        "strategy": stage_options.strategy, "steps": train_result.steps_done,
                        "tokens": train_result.tokens_seen, "processes": processes,
                        "train_seconds": round(train_result.elapsed_s, 2),
                        "bpb": {str(c): v for c, v in child_bpb.items()},
                        "parent_bpb": {str(c): v for c, v in parent_bpb.items()},
                        "replay_source": stage_options.replay_source, "corpora_gone": gone,
                        "loss_history": progress.loss_history,
                    }, probe_scores)


def train_stage(ctx: ServiceContext, parent: PEERTransformer, new_train: TokenData, old_train: list[TokenData],
                options: ContinualOptions, tag: str, progress: JobProgress) -> tuple[PEERTransformer, TrainResult, int]:
    """The continual stage in this process, or with PEER_TRAIN_NPROC > 1 on that many processes sharing out
    the expert tables (service/jobs/sharded_stage.py; a model without PEER layers trains here). Returns the child,
    the training result and the number of processes; raises JobCancelled when the job was cancelled."""
    processes = ctx.settings.train_nproc if parent.peer_layers() else 1
    if processes > 1:
        threads = max(1, torch.get_num_threads() // processes)
        outcome = run_sharded_stage(parent, new_train, old_train, options, tag, processes, threads, ctx.settings.device,
                                    progress.on_log, progress.should_stop,
                                    stop_grace_s=ctx.settings.train_stop_grace_seconds)
        child, result = outcome.child, outcome.train_result
    else:
        stage = continual_stage(parent, new_train, old_train, options, tag=tag, on_log=progress.on_log,
                                should_stop=progress.should_stop)
        child, result = stage.child, stage.train_result
    if result.stopped_early and progress.cancelled:
        raise JobCancelled()
    if child is None:  # the stage processes stop early only when told to, and then the job was cancelled
        raise RuntimeError("the sharded stage stopped before its end, and the job was not cancelled")
    return child, result, processes
