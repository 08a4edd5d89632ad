"""Job options and their validation: a training job's (:class:`JobOptions`) and a forget job's
(:class:`ForgetOptions`), checked at submission (422 listing every problem; 409 for growth past the pool cap) and
again when the job runs, where a training job's resolve over the service settings into a continual stage's."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from peer_model.continual import ContinualOptions, Strategy
from peer_model.train import TrainConfig

from ..errors import Conflict, InvalidInput
from ..settings import Settings
from .probes import check_probe_option


SEED_MAX = 2**63 - 1  # a signed 64-bit integer; torch takes seeds up to 2^64 - 1, and a job adds small offsets to it
ProbeOption = Annotated[int | None, Field(ge=1, le=2**31 - 1, description="an uploaded probe (POST /v1/probes): the "
                                         "job scores the new version and its parent on it")]


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
    seed: int = Field(0, ge=0, le=SEED_MAX)
    probe: ProbeOption = None


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
                      has_pool: bool = True, pretrained: bool = False) -> ContinualOptions:
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
    grow: it fine-tunes, with replay. A job without ``steps`` takes PEER_TRAIN_STEPS, on a ``pretrained`` base
    PEER_BASE_TRAIN_STEPS.
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
    steps = job.steps or (settings.base_train_steps if pretrained else settings.train_steps)
    review_steps = settings.review_steps if job.review_steps is None else job.review_steps
    for name, value in (("steps", steps), ("review_steps", review_steps)):
        if value > settings.max_train_steps:
            raise InvalidInput(f"invalid job options: {name} {value} is over PEER_MAX_TRAIN_STEPS "
                               f"({settings.max_train_steps})")
    if new_experts > settings.max_new_experts:
        raise InvalidInput(f"invalid job options: new_experts {new_experts} is over PEER_MAX_NEW_EXPERTS "
                           f"({settings.max_new_experts})")
    try:
        train = job_train_config(settings, steps, job.seed, pretrained)
        return ContinualOptions(
            strategy=strategy, new_experts=new_experts, replay_fraction=replay, distill_weight=distill, train=train,
            sparse_top_experts=(job.sparse_top_experts or settings.sparse_top_experts)
            if strategy == "sparse_finetune" else 0,
            train_dense=(settings.train_dense if job.train_dense is None else job.train_dense) if growing else None,
            # chilling and reviewing protect what a version knows: a fresh model's pre-training has neither
            old_lr_scale=(settings.old_lr_scale if job.old_lr_scale is None else job.old_lr_scale)
            if has_old_corpora else 1.0,
            review_steps=review_steps if has_old_corpora else 0, generated_windows=settings.replay_windows,
            generated_batch=settings.replay_batch, generated_weights=settings.replay_weights,
            # old inputs keep finding old experts: old sub-keys and the query BatchNorm statistics stay the parent's
            freeze_old_sub_keys=growing, freeze_query_batchnorm_stats=growing or strategy == "sparse_finetune")
    except ValueError as exc:
        raise InvalidInput(f"invalid job options: {exc}") from None


def replay_source(options: ContinualOptions, corpora_gone: bool, corpora_available: bool, pretrained: bool) -> str:
    """What a job replays, when its stage reads earlier text at all (replay, distillation on it, the routing review):
    the parent's own samples when earlier text is not in the store (a corpus deleted since, or none yet on a
    pretrained base); on a pretrained base, its samples beside the earlier corpora (its own text is in no corpus:
    replaying only the corpora trained since kept 54% of SmolLM2's general answers after two stages against 91%
    after one, BENCHMARKS.md 15); else the earlier corpora."""
    needs_old = (options.replay_fraction > 0 or options.review_steps > 0
                 or (options.distill_weight > 0 and options.distill_on == "old"))
    if not needs_old:
        return options.replay_source
    if (corpora_gone and options.replay_fraction > 0) or not corpora_available:
        return "parent"
    return "both" if pretrained else "corpora"


def job_train_config(settings: Settings, steps: int, seed: int, pretrained: bool = False) -> TrainConfig:
    """A job's training loop: the service's batch, window and learning rates (the experts' own on a ``pretrained``
    base), a short warm-up."""
    expert_lr = settings.base_train_expert_lr if pretrained else settings.train_expert_lr
    return TrainConfig(steps=steps, batch_size=settings.train_batch_size, seq_len=settings.train_seq_len,
                       lr=settings.train_lr, expert_lr=expert_lr, param_dtype=settings.train_param_dtype,
                       warmup_steps=min(50, max(1, steps // 10)), eval_every=steps, seed=seed,
                       device=settings.device, log_every=10, loss_chunk_tokens=settings.train_loss_chunk_tokens)


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


def validate_job_options(settings: Settings, session: Session, options: dict, has_old_corpora: bool = True,
                         experts: dict[str, int] | None = None) -> dict:
    """Reject bad training options at submission (422), not when the job runs: a probe that is not there among
    them, and growth past the pool cap of the version trained from (``experts`` per layer; 409); returns the
    options unchanged."""
    job = parse_job_options(options)
    stage = continual_options(settings, job, has_old_corpora)
    check_probe_option(settings, session, job.probe)
    check_pool_size(settings, experts or {}, stage.new_experts)
    return options


class ForgetOptions(BaseModel):
    """Options of a forget job; ``repair_steps`` None takes PEER_FORGET_REPAIR_STEPS."""

    model_config = ConfigDict(extra="forbid")

    repair_steps: int | None = Field(None, ge=0)
    activate: Literal["auto", "always", "never"] = "auto"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    probe: ProbeOption = None


def parse_forget_options(options: dict, max_steps: int) -> ForgetOptions:
    parsed = parse_options(ForgetOptions, options, "forget")
    if parsed.repair_steps is not None and parsed.repair_steps > max_steps:
        raise InvalidInput(f"invalid forget options: repair_steps {parsed.repair_steps} is over "
                           f"PEER_MAX_TRAIN_STEPS ({max_steps})")
    return parsed
