"""Continual training: one stage = grow, fine-tune on a new corpus while protecting old behaviour.

:func:`continual_stage` takes a parent model, the new corpus' training tokens and the earlier corpora's,
and returns a child (the parent is never modified). Strategies (``ContinualOptions.strategy``):

* ``naive``: fine-tune everything on the new corpus (the forgetting baseline);
* ``replay``: as naive, but a ``replay_fraction`` of every batch's windows comes from earlier corpora;
* ``grow_freeze``: grow ``new_experts`` per PEER layer; the new experts and the routing (query
  projection, query BatchNorm, product sub-keys) train, every older expert is frozen; the dense
  parameters (attention, embeddings, norms, dense feed-forward blocks) are frozen unless
  ``train_dense``;
* ``grow_freeze_protect``: grow_freeze plus replay and/or distillation: ``distill_weight`` × the KL
  divergence from the parent's next-byte distribution to the child's on the replayed old windows
  (Lifelong-MoE's output regularisation, there computed on the new data: ``distill_on="all"``);
* ``sparse_finetune``: Sparse Memory Finetuning (Lin et al. 2025): train only the
  ``sparse_top_experts`` experts per layer whose usage is high relative to their usage on earlier
  corpora (TF-IDF), plus any new segment. ``sparse_selection="batch"`` (the paper's way) ranks them
  anew on every training batch's own selections (:class:`BatchSparseSelection`); ``"stage"`` once, on
  sampled batches of the new corpus (:func:`expert_scores`).

``replay_source="parent"`` replays the parent's own samples instead of the earlier corpora (generative
replay, :func:`sample_replay`), for when their text is gone. Two options apply to any strategy:
``old_lr_scale`` ("add and chill"): every parameter that existed
before the stage (dense layers, routing, old expert rows) learns at ``old_lr_scale`` × its rate while the
new experts and new sub-keys learn at the full rate; ``review_steps`` (MoE-LPR's review stage): after
training, only the routing (query projection, query BatchNorm, sub-keys) trains for that many steps on
half replay of old text, with the distillation loss when ``distill_weight`` is set, so old inputs find
their old experts again.

Growth preserves the function (peer.py): the new segment is out of retrieval's reach until training
opens it over ``train.open_steps`` steps. With ``key_init="data"`` (the default) the new sub-keys are
drawn from the new corpus' own queries, so that corpus is what retrieval sends to the new experts.

Routing parameters change under every strategy unless frozen; three switches keep old inputs finding
old experts: ``freeze_old_sub_keys`` (gradient hooks zero the rows of the sub-keys that existed before
growth: bit-identical), ``freeze_query_batchnorm_stats`` (query BatchNorm in eval mode during
training: the running statistics stay the parent's and normalisation uses them) and ``freeze_query``
(the query projection and BatchNorm affine parameters do not train).

Evaluation: :func:`evaluate_all` gives bits per byte on every corpus' validation split;
:func:`forgetting_report` turns the matrix ``R[stage][corpus]`` of those into average forgetting,
learning and (given the naive strategy's matrix) plasticity.

Forgetting on request: :func:`forget_segments` masks the segments a corpus was grown into (optionally
repairing on the remaining corpora), so a child no longer has that corpus' experts.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.data_parallel import DataParallel
from ..distributed.shards import ColumnShards
from ..generate import SamplingParams, decode_one_token, make_generator, prefill, sample_next
from ..model import PEERTransformer
from ..optim import coalesced
from ..peer import PEER
from ..pool import Segment
from ..train import (
    LossFn, TokenData, TrainConfig, TrainResult, autocast_for, build_optimizers, evaluate_bpb, id_dtype,
    next_byte_loss, place_model, resolve_device, train,
)

Strategy = Literal["naive", "replay", "grow_freeze", "grow_freeze_protect", "sparse_finetune"]
STRATEGIES: tuple[str, ...] = ("naive", "replay", "grow_freeze", "grow_freeze_protect", "sparse_finetune")
_GROWING = ("grow_freeze", "grow_freeze_protect")


@dataclass
class ContinualOptions:
    strategy: Strategy = "grow_freeze"
    new_experts: int = 0  # per PEER layer, rounded up to fill the grid; 0 = no growth
    replay_fraction: float = 0.0  # fraction of each batch's windows drawn from earlier corpora
    distill_weight: float = 0.0  # weight of KL(parent || child); 0 = off
    distill_on: Literal["old", "all"] = "old"  # windows the KL is taken on: replayed old ones, or all
    sparse_top_experts: int = 0  # sparse_finetune: experts trained per PEER layer (besides new ones)
    usage_batches: int = 8  # sparse_finetune: batches of new (and of old) data the usage is counted on
    sparse_selection: Literal["batch", "stage"] = "batch"  # sparse_finetune: rank experts per batch or per stage
    freeze_old_sub_keys: bool = False
    freeze_query_batchnorm_stats: bool = False
    freeze_query: bool = False
    train_dense: bool | None = None  # None: True for naive/replay, False for the other strategies
    key_init: Literal["data", "random"] = "data"  # new sub-keys: the new corpus' queries, or random (peer.py)
    replay_source: Literal["corpora", "parent"] = "corpora"  # replay earlier corpora, or the parent's own samples
    generated_windows: int = 256  # replay_source "parent": windows of seq_len bytes sampled from the parent
    old_lr_scale: float = 1.0  # learning-rate multiplier of everything that existed before the stage
    review_steps: int = 0  # routing-only review on half replay after training (needs earlier corpora)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        s = self.strategy
        if s not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {s!r}")
        for name in ("new_experts", "sparse_top_experts", "usage_batches", "review_steps", "generated_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.usage_batches < 1:
            raise ValueError("usage_batches must be >= 1")
        if not (isinstance(self.replay_fraction, (int, float)) and 0.0 <= self.replay_fraction < 1.0):
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if not (isinstance(self.distill_weight, (int, float)) and math.isfinite(self.distill_weight)
                and self.distill_weight >= 0):
            raise ValueError(f"distill_weight must be a finite number >= 0, got {self.distill_weight!r}")
        if not (isinstance(self.old_lr_scale, (int, float)) and 0.0 <= self.old_lr_scale <= 1.0):
            raise ValueError(f"old_lr_scale must be in [0, 1], got {self.old_lr_scale!r}")
        if self.sparse_selection not in ("batch", "stage"):
            raise ValueError(f"sparse_selection must be 'batch' or 'stage', got {self.sparse_selection!r}")
        if self.replay_source not in ("corpora", "parent"):
            raise ValueError(f"replay_source must be 'corpora' or 'parent', got {self.replay_source!r}")
        if self.replay_source == "parent" and self.generated_windows < 1:
            raise ValueError("replay_source 'parent' needs generated_windows >= 1")
        if self.key_init not in ("data", "random"):
            raise ValueError(f"key_init must be 'data' or 'random', got {self.key_init!r}")
        if self.distill_on not in ("old", "all"):
            raise ValueError(f"distill_on must be 'old' or 'all', got {self.distill_on!r}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        protection = self.replay_fraction > 0 or self.distill_weight > 0
        if s in _GROWING and self.new_experts == 0:
            raise ValueError(f"strategy {s!r} grows the pool: new_experts must be > 0")
        if s in ("naive", "grow_freeze") and protection:
            hint = "replay" if s == "naive" else "grow_freeze_protect"
            raise ValueError(f"strategy {s!r} has no protection: replay_fraction and distill_weight must be 0 "
                             f"(use {hint!r})")
        if s == "replay" and self.replay_fraction == 0:
            raise ValueError("strategy 'replay' needs replay_fraction > 0")
        if s == "grow_freeze_protect" and not protection:
            raise ValueError("strategy 'grow_freeze_protect' needs replay_fraction > 0 and/or distill_weight > 0")
        if self.distill_weight > 0 and self.distill_on == "old" and self.replay_fraction == 0:
            raise ValueError("distillation on old text (distill_on='old') needs replay_fraction > 0 "
                             "to bring old windows into the batches; or set distill_on='all'")
        if s == "sparse_finetune" and self.sparse_top_experts == 0:
            raise ValueError("strategy 'sparse_finetune' needs sparse_top_experts >= 1")
        if s != "sparse_finetune" and self.sparse_top_experts:
            raise ValueError(f"sparse_top_experts applies to 'sparse_finetune' only, not {s!r}")

    @property
    def dense_trains(self) -> bool:
        return self.strategy in ("naive", "replay") if self.train_dense is None else self.train_dense


@dataclass
class StageResult:
    child: PEERTransformer
    segments: dict[int, Segment]  # per PEER layer, the segment grown in this stage (empty: no growth)
    train_result: TrainResult
    trained_experts: dict[int, torch.Tensor] = field(default_factory=dict)  # sparse_finetune: per layer, ids


# ---- data mix ------------------------------------------------------------------------------------


class MixedData:
    """Windows from ``new`` and, each with probability ``replay_fraction``, from one of ``old``
    (chosen uniformly, so every earlier corpus is replayed alike). ``sample_batch`` returns TokenData's
    ``(inputs, targets)`` plus ``source`` (B,): -1 for the new corpus, else the index in ``old``;
    train() hands it to the loss function. Each window comes from its own source's ``sample_batch``, with
    that source's BOS; all sources must share one (one tokenizer)."""

    def __init__(self, new: TokenData, old: Sequence[TokenData], replay_fraction: float):
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {replay_fraction}")
        if replay_fraction > 0 and not old:
            raise ValueError("replay needs at least one earlier corpus")
        if any(data.bos != new.bos for data in old):
            raise ValueError(f"the corpora start windows with different BOS ids ({new.bos}, "
                             f"{sorted({data.bos for data in old})}): they were encoded by different tokenizers")
        self.new, self.old, self.replay_fraction = new, list(old), replay_fraction

    def __len__(self) -> int:
        return len(self.new)

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.full((batch_size,), -1, dtype=torch.long)
        if self.old and self.replay_fraction > 0:
            replay = torch.rand(batch_size, generator=generator) < self.replay_fraction
            which = torch.randint(0, len(self.old), (batch_size,), generator=generator)
            source = torch.where(replay, which, source)
        inputs = torch.empty(batch_size, seq_len, dtype=torch.long)
        targets = torch.empty(batch_size, seq_len, dtype=torch.long)
        for index in source.unique().tolist():
            rows = torch.nonzero(source == index).squeeze(1)
            data = self.new if index < 0 else self.old[index]
            x, y = data.sample_batch(rows.numel(), seq_len, generator)
            inputs[rows], targets[rows] = x, y
        return inputs, targets, source


@torch.no_grad()
def sample_replay(model: PEERTransformer, windows: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                  batch_size: int = 64) -> TokenData:
    """Generative replay: ``windows`` texts of ``seq_len`` tokens sampled from ``model`` after its
    tokenizer's BOS, one after another in one TokenData (with that BOS). For when the earlier corpora's
    text is gone (deleted, or never stored): replaying a version's own generations, distilled against it,
    keeps what it knew in the spirit of SPIN's training on a previous version's samples. ``model`` is left
    in its mode."""
    device = next(model.parameters()).device
    tokenizer = model.tokenizer
    params = SamplingParams(temperature=temperature)
    generator = make_generator(seed, device)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, windows, batch_size):
            count = min(batch_size, windows - start)
            cache = model.new_cache(count, min(model.config.max_seq_len, seq_len + 1))
            bos = torch.full((count, 1), tokenizer.bos_id, device=device)
            next_ids = sample_next(prefill(model, bos, cache), params, generator, tokenizer.never_sampled)
            sampled = [next_ids]
            for _ in range(seq_len - 1):
                next_ids = sample_next(decode_one_token(model, next_ids, cache), params, generator,
                                       tokenizer.never_sampled)
                sampled.append(next_ids)
            rows.append(torch.stack(sampled, dim=1).cpu())
    finally:
        model.train(was_training)
    return TokenData(torch.cat(rows).flatten().to(id_dtype(model.config.vocab_size)), tokenizer.bos_id)


# ---- freezing ------------------------------------------------------------------------------------


def _routing_params(layer: PEER) -> list[nn.Parameter]:
    return [layer.sub_keys1, layer.sub_keys2, *layer.query.parameters(), *layer.query_norm.parameters()]


def _freeze_dense(model: nn.Module) -> None:
    """requires_grad=False for everything but the PEER layers' experts and routing."""
    keep = {id(p) for layer in model.modules() if isinstance(layer, PEER)
            for p in (layer.expert_down, layer.expert_up, *_routing_params(layer))}
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)


def _zero_rows_hook(rows: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:rows] = 0
        return grad
    return hook


def _restore_trainable(model: nn.Module) -> None:
    """Every expert row trainable, and every parameter as the model's config says (``base_trains``: a
    retrofitted pretrained model's base stays frozen whatever a stage froze or unfroze)."""
    if isinstance(model, PEERTransformer):
        model.restore_trainable()
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    for layer in model.modules():
        if isinstance(layer, PEER):
            layer.set_trainable(slice(None), True)


# ---- sparse memory finetuning: which experts to train ----------------------------------------------


@torch.no_grad()
def _count_usage(model: PEERTransformer, data, batches: int, batch_size: int, seq_len: int,
                 generator: torch.Generator, per_batch: bool) -> dict[int, torch.Tensor]:
    """Per PEER layer: selections per expert over ``batches`` sampled batches (eval mode), or, with
    ``per_batch``, the number of batches in which each expert was selected (a document frequency)."""
    device = next(model.parameters()).device
    layers = model.peer_layers()
    saved = {i: (layer.track_usage, layer.usage_counts.clone()) for i, layer in layers.items()}
    totals = {i: torch.zeros_like(layer.usage_counts) for i, layer in layers.items()}
    was_training = model.training
    model.eval()
    try:
        for layer in layers.values():
            layer.track_usage = True
        for _ in range(batches):
            for layer in layers.values():
                layer.reset_usage()
            inputs = data.sample_batch(batch_size, seq_len, generator)[0]
            with autocast_for(device):
                model(inputs.to(device))
            for i, layer in layers.items():
                totals[i] += (layer.usage_counts > 0).long() if per_batch else layer.usage_counts
    finally:
        model.train(was_training)
        for i, layer in layers.items():
            layer.track_usage, counts = saved[i]
            layer.usage_counts.copy_(counts)
    return totals


@torch.no_grad()
def _peer_queries(model: PEERTransformer, data, batches: int, batch_size: int, seq_len: int,
                  generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Per PEER layer, the normalised queries (eval mode) of ``batches`` sampled batches of ``data``."""
    device = next(model.parameters()).device
    layers = model.peer_layers()
    queries: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def capture(index):
        def hook(layer, args, output):
            queries[index].append(layer.query_norm(layer.query(args[0].reshape(-1, layer.d_model))))
        return hook

    hooks = [layer.register_forward_hook(capture(i)) for i, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for _ in range(batches):
            with autocast_for(device):
                model(data.sample_batch(batch_size, seq_len, generator)[0].to(device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(q) for i, q in queries.items()}


def background_frequency(model: PEERTransformer, new: TokenData, old: Sequence[TokenData], batches: int,
                         batch_size: int, seq_len: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """Per PEER layer, the IDF of every expert: log((B + 1) / (df + 1)) where df counts the B batches
    of old data (earlier corpora mixed alike) in which the expert was selected at least once; experts
    the old data uses everywhere get ~0. With no old data, 1 for every expert."""
    generator = torch.Generator().manual_seed(seed)
    if not old:
        return {i: torch.ones(layer.num_experts, dtype=torch.float64) for i, layer in model.peer_layers().items()}
    df = _count_usage(model, MixedData(new, old, 1.0), batches, batch_size, seq_len, generator, per_batch=True)
    return {i: torch.log((batches + 1) / (counts.double() + 1)) for i, counts in df.items()}


def expert_scores(model: PEERTransformer, new: TokenData, old: Sequence[TokenData], batches: int,
                  batch_size: int, seq_len: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """TF-IDF score of every expert of every PEER layer for the new corpus against the earlier ones.

    TF = the expert's share of all selections over ``batches`` batches of new data; IDF: see
    :func:`background_frequency`. This is the ranking of Sparse Memory Finetuning (Lin et al. 2025,
    memory slots there, experts here) computed once per stage from samples; :class:`BatchSparseSelection`
    computes it per training batch, as the paper does. With no old data the ranking is plain usage.
    """
    generator = torch.Generator().manual_seed(seed)
    tf = _count_usage(model, new, batches, batch_size, seq_len, generator, per_batch=False)
    idf = background_frequency(model, new, old, batches, batch_size, seq_len, seed=seed + 1)
    return {i: counts.double() / max(1, int(counts.sum())) * idf[i] for i, counts in tf.items()}


class BatchSparseSelection:
    """Sparse Memory Finetuning per batch (Lin et al. 2025): after each backward, every PEER layer keeps
    the gradient rows of only the ``top`` experts with the best TF-IDF of this batch's selections (TF:
    the layer's usage counts of the step, IDF: ``idf`` from :func:`background_frequency`), and of any
    expert grown after ``idf`` was taken; the optimizer then touches no other row, so the rest stay
    bit-identical. Needs usage tracking on during training (``TrainConfig.track_usage``).
    ``trained``: per layer, every expert that was kept at least once. With ``shards`` (a model sharded over
    processes, each training on its rows of the batch) the counts are summed over the processes first, so
    that every process keeps the same rows."""

    def __init__(self, model: PEERTransformer, idf: Mapping[int, torch.Tensor], top: int,
                 shards: ColumnShards | None = None):
        self.layers = model.peer_layers()
        self.idf, self.top, self.shards = dict(idf), top, shards
        self.kept = {i: torch.zeros(layer.num_experts, dtype=torch.bool) for i, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.reset_usage()

    @property
    def trained(self) -> dict[int, torch.Tensor]:
        return {i: torch.nonzero(kept).squeeze(1) for i, kept in self.kept.items()}

    @torch.no_grad()
    def __call__(self) -> None:
        for i, layer in self.layers.items():
            counts = layer.usage_counts if self.shards is None else self.shards.all_reduce_(layer.usage_counts.clone())
            counts = counts.cpu()
            old = self.idf[i].numel()
            keep = torch.zeros(layer.num_experts, dtype=torch.bool)
            keep[select_experts(counts[:old].double() / max(1, int(counts.sum())) * self.idf[i], self.top)] = True
            keep[old:] = True
            if len(self.kept[i]) < len(keep):
                self.kept[i] = torch.cat([self.kept[i], self.kept[i].new_zeros(len(keep) - len(self.kept[i]))])
            self.kept[i] |= keep & (counts > 0)
            keep = keep.to(layer.usage_counts.device)
            for table in (layer.expert_down, layer.expert_up):
                if table.grad is not None:
                    table.grad = _sparse_rows_kept(coalesced(table.grad), keep)
            layer.reset_usage()


def _sparse_rows_kept(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    rows, values = grad.indices()[0], grad.values()
    mask = keep[rows]
    return torch.sparse_coo_tensor(rows[mask].unsqueeze(0), values[mask], grad.shape, is_coalesced=True,
                                   check_invariants=False)


def select_experts(scores: torch.Tensor, top: int) -> torch.Tensor:
    """Ids of the ``top`` best-scoring experts with a positive score, best first (ties: lower id)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:top]
    return order[scores[order] > 0]


def selection_share(model: PEERTransformer, data: TokenData, first_id: Mapping[int, int], batches: int,
                    batch_size: int, seq_len: int, seed: int = 0) -> float:
    """Fraction of all expert selections on ``data`` (eval mode, all PEER layers) that land on experts
    with id >= ``first_id[layer]``: with the base model's expert counts and an old corpus, how much of
    the old text's routing has moved to experts grown since (0 = old inputs still find only old experts).
    """
    counts = _count_usage(model, data, batches, batch_size, seq_len, torch.Generator().manual_seed(seed),
                          per_batch=False)
    total = sum(int(c.sum()) for c in counts.values())
    return sum(int(c[first_id[i]:].sum()) for i, c in counts.items()) / max(1, total)


# ---- one stage -----------------------------------------------------------------------------------


def continual_stage(parent: PEERTransformer, new_train: TokenData, old_train: Sequence[TokenData],
                    options: ContinualOptions, tag: str = "", on_log: Callable[[dict], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    shards: ColumnShards | None = None) -> StageResult:
    """Grow, freeze per ``options.strategy``, fine-tune on ``new_train`` (+ replay); the parent is unchanged.

    The child comes back with every expert trainable again and its parameters as its config says (the
    freezing is this stage's; a frozen base stays frozen).
    ``on_log`` and ``should_stop`` are passed to :func:`peer_model.train.train` (progress, cancellation).

    ``shards`` (peer_model/distributed): this process is one of several that run the stage together on a
    parent whose PEER layers are sharded over them. Every process calls it with the same arguments, the
    same torch seed and its shard of the same parent; each trains on its rows of every global batch
    (``cfg.batch_size``), and everything sampled before training (usage, data-keyed sub-keys, growth) is
    drawn alike on every process, so the replicated parts stay equal. ``should_stop`` must answer the same
    on every process.
    """
    cfg = options.train
    if cfg.seq_len > parent.config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {parent.config.max_seq_len}")
    needs_old = (options.replay_fraction > 0 or (options.distill_weight > 0 and options.distill_on == "old")
                 or options.review_steps > 0)
    if needs_old and options.replay_source == "parent":
        old_train = [sample_replay(parent, options.generated_windows, cfg.seq_len, seed=cfg.seed + 3)]
    if needs_old and not old_train:
        raise ValueError(f"strategy {options.strategy!r} with replay/distillation needs earlier corpora (old_train)")
    child = copy.deepcopy(parent)
    _restore_trainable(child)
    layers = child.peer_layers()
    before = {i: (layer.grid.rows, layer.grid.cols, layer.num_experts) for i, layer in layers.items()}

    # which experts train (decided on the parent's experts, before growth)
    trained: dict[int, torch.Tensor] = {}
    per_batch = options.strategy == "sparse_finetune" and options.sparse_selection == "batch"
    if per_batch:
        selection = BatchSparseSelection(child, background_frequency(child, new_train, old_train, options.usage_batches,
                                                                     cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1),
                                         options.sparse_top_experts, shards)
    elif options.strategy == "sparse_finetune":
        scores = expert_scores(child, new_train, old_train, options.usage_batches, cfg.batch_size, cfg.seq_len,
                               seed=cfg.seed + 1)
        trained = {i: select_experts(s, options.sparse_top_experts) for i, s in scores.items()}

    segments = child.grow(options.new_experts, tag=tag) if options.new_experts else {}
    if segments and options.key_init == "data":
        generator = torch.Generator().manual_seed(cfg.seed + 2)
        queries = _peer_queries(child, new_train, options.usage_batches, cfg.batch_size, cfg.seq_len, generator)
        for i, layer in layers.items():
            layer.key_new_sub_keys(queries[i], before[i][0], before[i][1], generator)

    for i, layer in layers.items():
        old_n = before[i][2]
        if options.strategy in _GROWING:
            layer.set_trainable(slice(0, old_n), False)
        elif options.strategy == "sparse_finetune" and not per_batch:
            layer.set_trainable(slice(0, old_n), False)
            layer.set_trainable(trained[i], True)
    if not options.dense_trains:
        _freeze_dense(child)
    if options.freeze_query:
        for layer in layers.values():
            for p in (*layer.query.parameters(), *layer.query_norm.parameters()):
                p.requires_grad_(False)

    hooks = []
    if options.freeze_old_sub_keys:
        for i, layer in layers.items():
            rows, cols, _ = before[i]
            for table, n in ((layer.sub_keys1, rows), (layer.sub_keys2, cols)):
                if table.requires_grad:
                    hooks.append(table.register_hook(_zero_rows_hook(n)))
    batchnorms = [layer.query_norm for layer in layers.values()
                  if options.freeze_query_batchnorm_stats and isinstance(layer.query_norm, nn.modules.batchnorm._BatchNorm)]

    data = MixedData(new_train, old_train, options.replay_fraction) if options.replay_fraction > 0 else new_train
    parallel = None if shards is None else DataParallel(child, shards)
    if parallel is not None:
        data = parallel.batches(data)
    teacher = copy.deepcopy(parent).to(resolve_device(cfg.device)).eval() if options.distill_weight > 0 else None
    loss_fn = None
    if teacher is not None:
        loss_fn = distillation_loss(teacher, options.distill_weight, options.distill_on == "old", shards)
    place_model(child, cfg)
    optimizers = build_optimizers(child, cfg, _chill_scales(child, before, options.old_lr_scale))
    try:
        result = train(child, data, None, replace(cfg, track_usage=True) if per_batch else cfg, on_log=on_log,
                       should_stop=should_stop, loss_fn=loss_fn, eval_modules=batchnorms, optimizers=optimizers,
                       after_backward=selection if per_batch else None, parallel=parallel)
        if per_batch:
            trained = selection.trained
        if options.review_steps and not result.stopped_early:
            review = _review_routing(child, MixedData(new_train, old_train, 0.5), cfg, options.review_steps, teacher,
                                     options.distill_weight, batchnorms, should_stop, parallel)
            result.history.extend({**record, "review": True} for record in review.history)
            result.stopped_early = review.stopped_early
    finally:
        for hook in hooks:
            hook.remove()
        _restore_trainable(child)
    return StageResult(child, segments, result, trained)


def _chill_scales(model: PEERTransformer, before: Mapping[int, tuple[int, int, int]],
                  scale: float) -> dict[int, float | torch.Tensor]:
    """Learning-rate multipliers for add-and-chill: ``scale`` for every parameter that existed before
    the stage and for old expert rows; 1 for new expert rows and the sub-key tables (their old rows
    are held by ``freeze_old_sub_keys`` where asked)."""
    if scale == 1.0:
        return {}
    scales: dict[int, float | torch.Tensor] = {id(p): scale for p in model.parameters()}
    for i, layer in model.peer_layers().items():
        rows = torch.ones(layer.num_experts)
        rows[: before[i][2]] = scale
        scales[id(layer.expert_down)] = scales[id(layer.expert_up)] = rows
        scales[id(layer.sub_keys1)] = scales[id(layer.sub_keys2)] = 1.0
    return scales


def _review_routing(model: PEERTransformer, data, cfg: TrainConfig, steps: int, teacher: PEERTransformer | None,
                    distill_weight: float, eval_modules: Sequence[nn.Module],
                    should_stop: Callable[[], bool] | None, parallel: DataParallel | None = None) -> TrainResult:
    """Train only the routing of every PEER layer (query projection, query BatchNorm, sub-keys) for
    ``steps`` steps on ``data``, with ``distill_weight`` × KL to ``teacher`` on its replayed windows
    (on several processes with ``parallel``: see :func:`continual_stage`)."""
    routing = {id(p) for layer in model.peer_layers().values() for p in _routing_params(layer)}
    for param in model.parameters():
        param.requires_grad_(id(param) in routing)
    review_cfg = replace(cfg, steps=steps, warmup_steps=max(1, steps // 10), log_every=max(1, steps // 4),
                         eval_every=10**9, seed=cfg.seed + 7)
    loss_fn = None
    if teacher is not None and distill_weight:
        loss_fn = distillation_loss(teacher, distill_weight, True, None if parallel is None else parallel.shards)
    if parallel is not None:
        data = parallel.batches(data)
    return train(model, data, None, review_cfg, should_stop=should_stop, loss_fn=loss_fn, eval_modules=eval_modules,
                 parallel=parallel)


# ---- forgetting on request -----------------------------------------------------------------------


def forget_segments(parent: PEERTransformer, segments: Mapping[int, Sequence[int]],
                    remaining_train: Sequence[TokenData], repair_steps: int = 0,
                    train_cfg: TrainConfig | None = None, distill_weight: float = 1.0,
                    should_stop: Callable[[], bool] | None = None) -> tuple[PEERTransformer, TrainResult | None]:
    """A child of ``parent`` without the knowledge held in ``segments`` ({PEER layer: segment indices}):
    those segments are masked (out of retrieval's reach, see pool.py), and with ``repair_steps`` the
    child trains that many steps on the ``remaining_train`` corpora (uniformly mixed) with
    ``distill_weight`` × KL to the parent there, so what the remaining corpora had routed to the masked
    experts is relearnt elsewhere (the masked experts cannot be selected, so they stay as they were).
    The parent is unchanged. Returns the child and the repair's result (None without repair)."""
    layers = parent.peer_layers()
    for i, indices in segments.items():
        if i not in layers:
            raise ValueError(f"block {i} has no PEER layer")
        for index in indices:
            if not 0 < index < len(layers[i].segments):
                raise ValueError(f"layer {i} has no grown segment {index} (the initial segment cannot be masked)")
    if repair_steps and not remaining_train:
        raise ValueError("repairing needs the remaining corpora's text")
    child = copy.deepcopy(parent)
    _restore_trainable(child)
    for i, indices in segments.items():
        for index in indices:
            child.peer_layers()[i].set_segment_status(index, "masked")
    if not repair_steps:
        return child, None
    cfg = replace(train_cfg or TrainConfig(), steps=repair_steps, warmup_steps=max(1, repair_steps // 10),
                  log_every=max(1, repair_steps // 4), eval_every=10**9)
    teacher = copy.deepcopy(parent).to(resolve_device(cfg.device)).eval()
    loss_fn = distillation_loss(teacher, distill_weight, True) if distill_weight else None
    result = train(child, MixedData(remaining_train[0], remaining_train, 1.0), None, cfg, should_stop=should_stop,
                   loss_fn=loss_fn)
    return child, result


def distillation_loss(teacher: PEERTransformer, weight: float, old_rows_only: bool,
                      shards: ColumnShards | None = None) -> LossFn:
    """Next-byte cross-entropy + ``weight`` · KL(teacher ‖ model) on the windows from earlier corpora
    (``old_rows_only``: rows whose MixedData source is >= 0) or on every window (Lifelong-MoE style), the KL
    averaged over the positions of those windows.

    With ``shards`` this process holds its rows of a batch split over several (see :func:`continual_stage`):
    the KL is averaged over the distilled positions of the whole batch (the processes' gradients are then
    averaged, as one process' on the whole batch would be), and the sharded teacher runs on every process,
    also one with no such window in its rows, since its forward exchanges columns with the others."""

    def loss_fn(logits, inputs, targets, extras):
        loss = next_byte_loss(logits, inputs, targets, extras)
        if not old_rows_only:
            rows = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
        elif extras:
            rows = extras[0] >= 0
        else:
            return loss  # plain TokenData: no replayed windows
        windows, processes = rows.sum().reshape(1).float(), 1
        if shards is not None:
            windows, processes = shards.all_reduce_(windows), shards.size
        if not bool(windows):
            return loss
        with torch.no_grad(), autocast_for(inputs.device):
            teacher_logits = teacher(inputs[rows])
        kl = F.kl_div(F.log_softmax(logits[rows].float(), -1).flatten(0, 1),
                      F.log_softmax(teacher_logits.float(), -1).flatten(0, 1), reduction="sum", log_target=True)
        return loss + weight * kl * processes / (windows[0] * logits.shape[1])

    return loss_fn


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate_all(model: nn.Module, val_sets: Mapping[str, TokenData], seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> dict[str, float]:
    """Bits per byte of ``model`` on every validation set, by name."""
    return {name: evaluate_bpb(model, data, seq_len, batch_size, max_batches) for name, data in val_sets.items()}


def forgetting_report(R: Sequence[Sequence[float | None]],
                      reference: Sequence[Sequence[float | None]] | None = None) -> dict:
    """Summary of a matrix ``R[stage][corpus]`` of validation bits per byte (None: not seen yet).

    A corpus is introduced at the first stage with a value. For every corpus introduced before the
    last stage, forgetting = final bpb − best (lowest) bpb over the stages before the last (≥ 0 up
    to noise; 0 = nothing forgotten); ``average_forgetting`` is their mean (None with one stage).
    ``learning[j]`` = bpb on corpus j right after the stage that introduced it. With ``reference``
    (the naive strategy's matrix on the same stream), ``plasticity`` = mean over the corpora introduced
    by a continual stage (after stage 0, whose corpus the shared base model learned before any strategy
    ran) of learning − the reference's learning: > 0 means the strategy learns new corpora worse than
    naive; ``relative_plasticity`` = mean of learning / reference learning − 1 (0.05: 5% worse).
    """
    if not R or any(len(row) != len(R[0]) for row in R):
        raise ValueError("R must be a non-empty rectangular matrix (stages × corpora)")
    last = len(R) - 1
    n_corpora = len(R[0])

    def intro(matrix, j):
        return next((s for s, row in enumerate(matrix) if row[j] is not None), None)

    forgetting: dict[int, float] = {}
    learning: dict[int, float] = {}
    for j in range(n_corpora):
        s0 = intro(R, j)
        if s0 is None:
            continue
        learning[j] = R[s0][j]
        if s0 < last and R[last][j] is not None:
            earlier = [R[s][j] for s in range(s0, last) if R[s][j] is not None]
            forgetting[j] = R[last][j] - min(earlier)
    report = {
        "matrix": [list(row) for row in R],
        "forgetting": forgetting,
        "average_forgetting": sum(forgetting.values()) / len(forgetting) if forgetting else None,
        "learning": learning,
        "final_average_bpb": _mean([v for v in R[last] if v is not None]),
    }
    if reference is not None:
        if len(reference) != len(R) or any(len(row) != n_corpora for row in reference):
            raise ValueError("reference must have the shape of R")
        pairs = [(value, reference[s0][j]) for j, value in learning.items()
                 if intro(R, j) > 0 and (s0 := intro(reference, j)) is not None]
        report["plasticity"] = _mean([value - ref for value, ref in pairs])
        report["relative_plasticity"] = _mean([value / ref - 1 for value, ref in pairs])
    return report


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
