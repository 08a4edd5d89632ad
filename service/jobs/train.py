"""The ingest and train jobs as plain functions (the Celery tasks only call these).

ingest: the validated upload in the store → normalised, de-duplicated train/validation splits → the
corpus is ready; optionally a training job follows.

train: parent version → :func:`peer_model.continual.continual_stage` (by default: grow a segment in
every PEER layer, fine-tune everything on half replay of earlier corpora with distillation to the
parent; when an earlier corpus' text is gone from the store, the parent's own samples are replayed
instead) → bits per byte on the validation split of every corpus the version knows (whose text is
still there) → publish: the checkpoint is written first, then in one transaction the version row, its
evaluations, the job's success and (when the activation gate passes) the activation. A crash at any
point before that commit leaves no version row, so no half version is ever visible; each attempt writes
its own checkpoint key, so an attempt that lost its lease never touches a published version (its orphaned
files are collected by the store's garbage collection).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from peer_model.continual import ContinualOptions, Strategy, continual_stage, evaluate_all
from peer_model.model import PEERTransformer
from peer_model.tokenizer import Tokenizer
from peer_model.train import TokenData, TrainConfig, TrainResult, resolve_device

from ..context import ServiceContext
from ..db.models import Corpus, Evaluation, Job, PoolVersion, utcnow
from ..db.session import transaction
from ..errors import Conflict, InvalidInput
from ..settings import Settings
from ..store.lock import save_model_locked
from ..store.retention import retain_after_publish
from ..store.versions import (activate, active_version_id, describe_pools, get_version, is_pretrained, live_version,
                              lock_activations)
from .ingest import ingest_documents, parse_upload
from .lease import (Dispatch, JobCancelled, LeaseLost, claim_job, create_job, dispatch_job, finish_job, hand_back_job,
                    heartbeat, owned_job)
from .sharded_stage import run_sharded_stage

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)  # the connection, not the statement, failed


class JobOptions(BaseModel):
    """Options of a training job (POST /v1/jobs ``options``); unset fields take the service settings."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy | None = None
    new_experts: int | None = Field(None, ge=0, description="per PEER layer")
    steps: int | None = Field(None, ge=1)
    freeze_old_experts: bool | None = None  # without a strategy: True grow_freeze_protect, False replay/naive
    replay_fraction: float | None = Field(None, ge=0, lt=1)
    distill_weight: float | None = Field(None, ge=0, allow_inf_nan=False)
    sparse_top_experts: int | None = Field(None, ge=1)
    train_dense: bool | None = None  # growing strategies; None: PEER_TRAIN_DENSE
    old_lr_scale: float | None = Field(None, ge=0, le=1)  # add and chill; None: PEER_OLD_LR_SCALE
    review_steps: int | None = Field(None, ge=0)  # routing-only review after training; None: PEER_REVIEW_STEPS
    activate: Literal["auto", "always", "never"] = "auto"
    seed: int = Field(0, ge=0)


def parse_options(schema: type[BaseModel], options: dict, what: str):
    """``options`` validated by ``schema``; a 422 listing every problem (``invalid {what} options: ...``)."""
    try:
        return schema.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid {what} options: {problems}") from None


def parse_job_options(options: dict) -> JobOptions:
    return parse_options(JobOptions, options, "job")


def continual_options(settings: Settings, job: JobOptions, has_old_corpora: bool,
                      has_pool: bool = True) -> ContinualOptions:
    """The job's options over the service defaults (``settings.strategy`` and friends).

    ``has_old_corpora``: the parent knows text worth protecting (earlier corpora, or a pretrained base's
    own). Without a strategy: a version that knows none yet (a fresh model) is pre-trained as a whole
    (naive, no growth); otherwise the default strategy, or with ``freeze_old_experts`` True
    grow_freeze_protect (old experts frozen), with False fine-tuning of everything (replay when a replay
    fraction is set). Replay and distillation need earlier text: with none they are off, and a
    protecting strategy falls back to its unprotected form (a pretrained base's text is not in the store:
    its jobs replay the parent's own samples). A PEER pool grows by ``PEER_NEW_EXPERTS`` under
    replay as under the growing strategies (the default, replay + distillation + growth, is the winner
    of BENCHMARKS.md section 3); a model without one (``has_pool`` False: a baseline feed-forward) cannot
    grow: it fine-tunes, with replay.
    """
    replay = settings.replay_fraction if job.replay_fraction is None else job.replay_fraction
    distill = settings.distill_weight if job.distill_weight is None else job.distill_weight
    strategy = job.strategy
    if strategy is None:
        if not has_old_corpora:
            strategy = "naive"
        elif job.freeze_old_experts is None:
            strategy = settings.strategy
        elif job.freeze_old_experts:
            strategy = "grow_freeze_protect"
        else:
            strategy = "replay" if replay > 0 else "naive"
    if not has_pool and strategy in ("grow_freeze", "grow_freeze_protect", "sparse_finetune"):
        strategy = "replay" if has_old_corpora and replay > 0 else "naive"
    if not has_old_corpora:
        strategy = {"grow_freeze_protect": "grow_freeze", "replay": "naive"}.get(strategy, strategy)
    if strategy in ("naive", "grow_freeze", "sparse_finetune"):
        replay, distill = 0.0, 0.0
    growing = strategy in ("grow_freeze", "grow_freeze_protect")
    grows_by_default = growing or (strategy == "replay" and has_pool)
    new_experts = job.new_experts if job.new_experts is not None else (settings.new_experts if grows_by_default else 0)
    steps = job.steps or settings.train_steps
    review_steps = settings.review_steps if job.review_steps is None else job.review_steps
    for name, value in (("steps", steps), ("review_steps", review_steps)):
        if value > settings.max_train_steps:
            raise InvalidInput(f"invalid job options: {name} {value} is over PEER_MAX_TRAIN_STEPS "
                               f"({settings.max_train_steps})")
    if new_experts > settings.max_new_experts:
        raise InvalidInput(f"invalid job options: new_experts {new_experts} is over PEER_MAX_NEW_EXPERTS "
                           f"({settings.max_new_experts})")
    try:
        train = job_train_config(settings, steps, job.seed)
        return ContinualOptions(
            strategy=strategy, new_experts=new_experts, replay_fraction=replay, distill_weight=distill, train=train,
            sparse_top_experts=(job.sparse_top_experts or settings.sparse_top_experts)
            if strategy == "sparse_finetune" else 0,
            train_dense=(settings.train_dense if job.train_dense is None else job.train_dense) if growing else None,
            # chilling and reviewing protect what a version knows: a fresh model's pre-training has neither
            old_lr_scale=(settings.old_lr_scale if job.old_lr_scale is None else job.old_lr_scale)
            if has_old_corpora else 1.0,
            review_steps=review_steps if has_old_corpora else 0,
            # old inputs keep finding old experts: old sub-keys and the query BatchNorm statistics stay the parent's
            freeze_old_sub_keys=growing, freeze_query_batchnorm_stats=growing or strategy == "sparse_finetune")
    except ValueError as exc:
        raise InvalidInput(f"invalid job options: {exc}") from None


def job_train_config(settings: Settings, steps: int, seed: int) -> TrainConfig:
    """A job's training loop: the service's batch, window and learning rates, a short warm-up."""
    return TrainConfig(steps=steps, batch_size=settings.train_batch_size, seq_len=settings.train_seq_len,
                       lr=settings.train_lr, expert_lr=settings.train_expert_lr, param_dtype=settings.train_param_dtype,
                       warmup_steps=min(50, max(1, steps // 10)), eval_every=steps, seed=seed,
                       device=settings.device, log_every=10)


def check_pool_size(settings: Settings, experts: dict[str, int], new_experts: int) -> None:
    """409 when growing every PEER layer of a pool of ``experts`` (per layer) by ``new_experts`` passes
    PEER_MAX_POOL_EXPERTS: every API process holds the active version's whole pool in memory."""
    over = sorted((int(layer), count + new_experts) for layer, count in experts.items()
                  if new_experts and count + new_experts > settings.max_pool_experts)
    if over:
        layers = ", ".join(f"layer {layer}: {count}" for layer, count in over)
        raise Conflict(f"growing by {new_experts} experts would make the pool larger than PEER_MAX_POOL_EXPERTS "
                       f"({settings.max_pool_experts} per layer): {layers}; train without growth "
                       f'({{"new_experts": 0}}) or raise the limit')


def validate_job_options(settings: Settings, options: dict, has_old_corpora: bool = True,
                         experts: dict[str, int] | None = None) -> dict:
    """Reject bad training options at submission (422), not when the job runs, and growth past the pool cap
    of the version trained from (``experts`` per layer; 409); returns the options unchanged."""
    stage = continual_options(settings, parse_job_options(options), has_old_corpora)
    check_pool_size(settings, experts or {}, stage.new_experts)
    return options


# ---- ingest --------------------------------------------------------------------------------------


def run_ingest_job(ctx: ServiceContext, job_id: int, dispatch: Dispatch) -> None:
    settings = ctx.settings
    lease = claim_job(ctx.sessions, job_id, settings.job_max_attempts, settings.job_stale_seconds)
    if lease is None:
        return
    follow_up: Job | None = None
    try:
        with ctx.sessions() as session:
            job = session.get(Job, job_id)
            corpus_id, train_after = job.corpus_ids[0], bool(job.options.get("train", False))
            train_options = dict(job.options.get("train_options", {}))
            fmt = job.options.get("format", "text")
        raw = ctx.store.read_corpus_bytes(corpus_id, "raw")
        upload = parse_upload(raw, fmt, max(settings.max_corpus_bytes, len(raw)))
        result = ingest_documents(upload.documents, settings.val_fraction)
        ctx.store.write_corpus(corpus_id, "train", result.train)
        ctx.store.write_corpus(corpus_id, "val", result.val)
        with transaction(ctx.sessions) as session:
            job = owned_job(session, job_id, lease)
            corpus = session.get(Corpus, corpus_id)
            corpus.state, corpus.ingested_at = "ready", utcnow()
            corpus.duplicates_removed = result.duplicates_removed
            corpus.train_bytes, corpus.val_bytes = len(result.train.encode()), len(result.val.encode())
            job.state, job.progress, job.finished_at, job.lease = "succeeded", 1.0, utcnow(), None
            job.metrics = {"documents": len(upload.documents), "paragraphs": result.paragraphs,
                           "duplicates_removed": result.duplicates_removed}
            if train_after:
                follow_up = create_job(session, "train", [corpus_id], train_options)
                job.next_job_id = follow_up.id
    except LeaseLost:
        return
    except InvalidInput as exc:
        _fail_ingest(ctx, job_id, lease, exc.message)
        return
    except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost in a log only
        log.exception("ingest job %s failed", job_id)
        _fail_ingest(ctx, job_id, lease, f"{type(exc).__name__}: {exc}")
        return
    if follow_up is not None:
        dispatch_job(ctx.sessions, dispatch, follow_up)


def _fail_ingest(ctx: ServiceContext, job_id: int, lease: str, error: str) -> None:
    _finish_quietly(ctx, job_id, lease, "failed", error)  # the corpus fails with it (jobs.close_job)


# ---- train ---------------------------------------------------------------------------------------


def run_train_job(ctx: ServiceContext, job_id: int, dispatch: Dispatch | None = None) -> None:
    run_owned_job(ctx, job_id, _train_and_publish, dispatch)


def run_owned_job(ctx: ServiceContext, job_id: int, body: Callable[[ServiceContext, int, str], None],
                  dispatch: Dispatch | None = None) -> None:
    """Claim the job and run ``body(ctx, job_id, lease)``; its end (cancelled, failed with the reason)
    is recorded on the job unless the lease was lost to another attempt. Interrupted by the worker's
    shutdown (``ctx.stopping``), the job is handed back and sent again through ``dispatch`` (without one,
    the watchdog sends it)."""
    settings = ctx.settings
    lease = claim_job(ctx.sessions, job_id, settings.job_max_attempts, settings.job_stale_seconds)
    if lease is None:
        return
    try:
        body(ctx, job_id, lease)
    except LeaseLost:
        log.warning("job %s: lost its lease; another attempt owns it", job_id)
    except JobCancelled:
        _finish_quietly(ctx, job_id, lease, "cancelled")
    except WorkerStopping:
        log.warning("job %s: handed back, the worker is shutting down", job_id)
        try:
            hand_back_job(ctx.sessions, job_id, lease)
        except LeaseLost:
            return
        if dispatch is not None:
            with ctx.sessions() as session:
                job = session.get(Job, job_id)
            if job.state == "queued":
                dispatch_job(ctx.sessions, dispatch, job)
    except (InvalidInput, Conflict) as exc:
        _finish_quietly(ctx, job_id, lease, "failed", exc.message)
    except Exception as exc:  # noqa: BLE001 - recorded on the job
        log.exception("job %s failed", job_id)
        _finish_quietly(ctx, job_id, lease, "failed", f"{type(exc).__name__}: {exc}")
    else:
        retain_after_publish(ctx)


def _finish_quietly(ctx: ServiceContext, job_id: int, lease: str, state: str, error: str | None = None) -> None:
    try:
        finish_job(ctx.sessions, job_id, lease, state, error)
    except LeaseLost:
        pass


class WorkerStopping(Exception):
    """The worker is shutting down (SIGTERM, Ctrl-C): the job goes back to the queue at once."""


class JobProgress:
    """Training callbacks: heartbeat (progress, speed, ETA, loss) every ``job_heartbeat_seconds``, cancel flag,
    the worker's shutdown (raises WorkerStopping).

    A heartbeat that fails because the database is unreachable does not fail the job: training goes on
    and the next heartbeat tries again, for up to ``job_db_outage_seconds`` (below the stale timeout, after
    which another worker may claim the job); a longer outage raises the error.

    The job's ``metrics`` carry ``base_metrics`` (e.g. the strategy), the latest step, loss and learning
    rate, and ``loss_history``: [step, loss] points over the whole run, at most ``HISTORY_POINTS`` (when
    full, every other point is dropped and points are kept half as often), always ending at the latest
    record. The console draws it as the job's loss curve."""

    HISTORY_POINTS = 200

    def __init__(self, ctx: ServiceContext, job_id: int, lease: str, steps: int, base_metrics: dict | None = None):
        self.ctx, self.job_id, self.lease, self.steps = ctx, job_id, lease, steps
        self.base_metrics = dict(base_metrics or {})
        self.last_beat = 0.0
        self.record: dict = {}
        self.cancelled = False
        self._outage_since: float | None = None
        self._points: list[list[float]] = []
        self._seen = 0
        self._stride = 1

    def on_log(self, record: dict) -> None:
        self.record = record
        if self._seen % self._stride == 0:
            self._points.append([record["step"], round(float(record["loss"]), 4)])
            if len(self._points) > self.HISTORY_POINTS:
                self._points, self._stride = self._points[::2], self._stride * 2
        self._seen += 1

    @property
    def loss_history(self) -> list[list[float]]:
        if not self.record or (self._points and self._points[-1][0] == self.record["step"]):
            return list(self._points)
        return [*self._points[1 - self.HISTORY_POINTS:], [self.record["step"], round(float(self.record["loss"]), 4)]]

    def metrics(self) -> dict:
        if not self.record:
            return dict(self.base_metrics)
        return {**self.base_metrics, "step": self.record["step"], "loss": self.record["loss"],
                "lr": self.record["lr"], "loss_history": self.loss_history}

    def should_stop(self) -> bool:
        if self.ctx.stopping.is_set():
            raise WorkerStopping()
        now = time.monotonic()
        if now - self.last_beat >= self.ctx.settings.job_heartbeat_seconds:
            self.last_beat = now
            step = self.record.get("step", 0)
            fields = {"progress": 0.9 * step / self.steps}  # the last 10%: evaluation and publishing
            if self.record:
                fields.update(tokens_per_s=self.record["tokens_per_s"], eta_s=self.record["eta_s"],
                              metrics=self.metrics())
            try:
                self.cancelled = heartbeat(self.ctx.sessions, self.job_id, self.lease, **fields)
                self._outage_since = None
            except TRANSIENT_DB_ERRORS as exc:
                self._outage_since = self._outage_since or now
                if now - self._outage_since > self.ctx.settings.job_db_outage_seconds:
                    raise
                log.warning("job %s: heartbeat failed (%s); training goes on, retrying", self.job_id,
                            type(exc).__name__)
        return self.cancelled


def token_data(ctx: ServiceContext, corpus_ids: list[int], part: str, tokenizer: Tokenizer) -> TokenData:
    """The corpora's text in the ids of the model that trains or is evaluated on it (``tokenizer``: its own);
    evaluation still reports bits per byte, so versions with different tokenizers compare."""
    return TokenData.from_text("".join(ctx.store.read_corpus(c, part) for c in corpus_ids), tokenizer)


def claim_base(ctx: ServiceContext, job_id: int, lease: str, use: str) -> tuple[int, bool]:
    """The version this attempt starts from, recorded on the job at once (retention keeps a running job's
    base): the pinned ``base_version_id``, or for an unpinned job the version active now. Returns it and
    whether it follows the active version (a retried attempt then takes the version active at its own start:
    ``metrics.base_follows_active``). ``use`` names the use in the error for a deleted version."""
    with transaction(ctx.sessions) as session:
        job = owned_job(session, job_id, lease)
        follows = job.base_version_id is None or bool(job.metrics.get("base_follows_active"))
        base_id = active_version_id(session) if follows else job.base_version_id
        if base_id is None:
            raise InvalidInput(f"no version to be {use}: activate one first")
        live_version(session, base_id, use)  # locked against a concurrent deletion until this commits
        job.base_version_id = base_id
        job.metrics = {**job.metrics, "base_follows_active": follows}
        return base_id, follows


def corpus_available(ctx: ServiceContext, corpus_id: int, part: str) -> bool:
    """The corpus' text is in the store (a deleted corpus' is not)."""
    return ctx.store.has_corpus(corpus_id, part)


def _train_and_publish(ctx: ServiceContext, job_id: int, lease: str) -> None:
    settings = ctx.settings
    base_id, follows_active = claim_base(ctx, job_id, lease, "trained from")
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        base = get_version(session, base_id)
        new_ids = list(job.corpus_ids)
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
    stage_options = continual_options(settings, job_options, has_old_corpora=bool(old_ids) or pretrained,
                                      has_pool=bool(parent.peer_layers()))
    check_pool_size(settings, base_experts, stage_options.new_experts)  # the base may have grown since submission
    if settings.train_seq_len > parent.config.max_seq_len:
        stage_options = replace(stage_options, train=replace(stage_options.train, seq_len=parent.config.max_seq_len))
    new_train = token_data(ctx, new_ids, "train", tokenizer)
    if len(new_train) < stage_options.train.seq_len:
        raise InvalidInput(f"the new corpora hold {len(new_train)} tokens of training text; "
                           f"at least {stage_options.train.seq_len} (PEER_TRAIN_SEQ_LEN) are needed")
    gone = [c for c in old_ids if not corpus_available(ctx, c, "train")]
    needs_old = stage_options.replay_fraction > 0 or stage_options.review_steps > 0
    if (gone and stage_options.replay_fraction > 0) or (needs_old and not old_ids):
        # earlier text is not in the store (a corpus deleted since, or the pretrained base's own corpus):
        # replay the parent's own samples instead
        stage_options = replace(stage_options, replay_source="parent")
    old_train = [token_data(ctx, [c], "train", tokenizer) for c in old_ids if c not in gone]
    progress = JobProgress(ctx, job_id, lease, stage_options.train.steps,
                           {"strategy": stage_options.strategy, "base_follows_active": follows_active})
    heartbeat(ctx.sessions, job_id, lease, metrics=progress.metrics())

    child, train_result, processes = train_stage(ctx, parent, new_train, old_train, stage_options, f"job:{job_id}",
                                                 progress)
    all_ids = old_ids + new_ids
    val_sets = {c: token_data(ctx, [c], "val", tokenizer) for c in all_ids
                if corpus_available(ctx, c, "val")}
    old_ids_evaluated = [c for c in old_ids if c in val_sets]
    seq_len, batch = stage_options.train.seq_len, settings.train_batch_size
    child_bpb = evaluate_all(child, val_sets, seq_len, batch, settings.eval_max_batches)
    parent_bpb = evaluate_all(parent, val_sets, seq_len, batch, settings.eval_max_batches)
    gate = activation_gate(child_bpb, parent_bpb, old_ids_evaluated, new_ids, settings.activation_tolerance)
    publish_version(ctx, job_id, lease, base_id, child, parent_segments, new_ids, all_ids, stage_options.strategy,
                    child_bpb, gate, job_options.activate, {
                        "strategy": stage_options.strategy, "steps": train_result.steps_done,
                        "tokens": train_result.tokens_seen, "processes": processes,
                        "train_seconds": round(train_result.elapsed_s, 2),
                        "bpb": {str(c): v for c, v in child_bpb.items()},
                        "parent_bpb": {str(c): v for c, v in parent_bpb.items()},
                        "replay_source": stage_options.replay_source, "corpora_gone": gone,
                        "loss_history": progress.loss_history,
                    })


def train_stage(ctx: ServiceContext, parent: PEERTransformer, new_train: TokenData, old_train: list[TokenData],
                options: ContinualOptions, tag: str, progress: JobProgress) -> tuple[PEERTransformer, TrainResult, int]:
    """The continual stage in this process, or with PEER_TRAIN_NPROC > 1 on that many processes sharing out
    the expert tables (service/jobs/sharded_stage.py; a model without PEER layers trains here). Returns the child,
    the training result and the number of processes; raises JobCancelled when the job was cancelled."""
    processes = ctx.settings.train_nproc if parent.peer_layers() else 1
    if processes > 1:
        threads = max(1, torch.get_num_threads() // processes)
        outcome = run_sharded_stage(parent, new_train, old_train, options, tag, processes, threads, ctx.settings.device,
                                    progress.on_log, progress.should_stop)
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


def publish_version(ctx: ServiceContext, job_id: int, lease: str, base_id: int, child, parent_segments: dict,
                    new_ids: list[int], corpus_ids: list[int], strategy: str, evaluations: dict[int, float],
                    gate: tuple[bool, str], activate_option: str, metrics: dict) -> int:
    """Write the child's checkpoint under a key of this attempt's own (an attempt that lost its lease can
    never overwrite what another attempt published), then in one transaction its version row, its
    evaluations (bits per byte per corpus), the job's success with ``metrics`` and, when asked
    (``activate_option`` always, or auto and the gate passed), its activation. The gate compared the child
    with ``base_id`` only: an auto activation happens only while ``base_id`` is still the active version
    (another job may have activated a version meanwhile, whose corpora this child never saw: it is
    published, not activated). A transient database error is retried for up to PEER_JOB_DB_OUTAGE_SECONDS.
    Returns the version id."""
    gate_passed, gate_reason = gate
    key = ctx.store.version_key(f"job-{job_id}-{lease[:12]}")
    retry_transient(lambda: save_model_locked(ctx, key, child, extra={"job_id": job_id, "parent_id": base_id}),
                    ctx.settings.job_db_outage_seconds, f"job {job_id}: writing the checkpoint")
    experts, segments = describe_pools(child, parent_segments, new_ids)

    def commit() -> int:
        with transaction(ctx.sessions) as session:
            job = owned_job(session, job_id, lease)
            version = PoolVersion(parent_id=base_id, job_id=job_id, checkpoint=key,
                                  model_config_json=child.config.to_dict(), experts=experts, segments=segments,
                                  corpus_ids=corpus_ids, strategy=strategy, gate_passed=gate_passed,
                                  gate_reason=gate_reason)
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


def activation_gate(child: dict[int, float], parent: dict[int, float], old_ids: list[int], new_ids: list[int],
                    tolerance: float) -> tuple[bool, str]:
    """Pass when every old corpus' bpb is within ``tolerance`` (relative) of the parent's and the new
    corpora's mean bpb improved."""
    worse = [c for c in old_ids if child[c] > parent[c] * (1 + tolerance)]
    if worse:
        details = ", ".join(f"corpus {c}: {parent[c]:.3f} → {child[c]:.3f}" for c in worse)
        return False, f"forgot more than {tolerance:.0%} on {details}"
    new_child = sum(child[c] for c in new_ids) / len(new_ids)
    new_parent = sum(parent[c] for c in new_ids) / len(new_ids)
    if new_child >= new_parent:
        return False, f"did not learn the new corpora: {new_parent:.3f} → {new_child:.3f} bpb"
    return True, f"new corpora {new_parent:.3f} → {new_child:.3f} bpb; old corpora within {tolerance:.0%}"
