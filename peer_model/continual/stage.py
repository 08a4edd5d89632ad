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
replay, :func:`sample_replay`), for when their text is gone; ``"both"`` replays them as one more earlier
corpus, for a parent that knows text no corpus holds (a pretrained base: replaying only the corpora trained
since protects those and not what the base knew). Two options apply to any strategy:
``old_lr_scale`` ("add and chill"): every parameter that existed
before the stage (dense layers, query projection, old expert rows, old sub-key rows) learns at
``old_lr_scale`` × its rate and the query BatchNorm's running statistics move at that fraction of their
momentum, while the new experts and new sub-keys learn at the full rate; ``review_steps`` (MoE-LPR's review stage): after
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

This module is the stage itself; its parts live beside it: options.py, data.py (mixing, generative replay),
freezing.py (grow and freeze), chill.py (add and chill), distillation.py, sparse.py (sparse memory finetuning),
review.py, forgetting.py (forgetting on request) and report.py (evaluation, the forgetting report).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..distributed.data_parallel import DataParallel
from ..distributed.shards import ColumnShards
from ..model import PEERTransformer
from ..pool import Segment
from ..train import TokenData, TrainResult, autocast_for, build_optimizers, place_model, resolve_device, train
from .chill import _chill_scales, _chilled_statistics
from .data import MixedData, sample_replay
from .distillation import distillation_loss
from .freezing import _freeze_dense, _restore_trainable, _zero_rows_hook
from .options import _GROWING, ContinualOptions
from .review import _review_routing
from .sparse import BatchSparseSelection, background_frequency, expert_scores, select_experts


@dataclass
class StageResult:
    child: PEERTransformer
    segments: dict[int, Segment]  # per PEER layer, the segment grown in this stage (empty: no growth)
    train_result: TrainResult
    trained_experts: dict[int, torch.Tensor] = field(default_factory=dict)  # sparse_finetune: per layer, ids



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
    if needs_old and options.replay_source != "corpora":
        generated = sample_replay(parent, options.generated_windows, cfg.seq_len, seed=cfg.seed + 3,
                                  batch_size=options.generated_batch, weights=options.generated_weights)
        old_train = [generated] if options.replay_source == "parent" else [*old_train, generated]
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

    device = next(child.parameters()).device  # growth draws from the stage's seed, not the global generator
    grow_generator = torch.Generator(device).manual_seed(cfg.seed + 4)
    segments = child.grow(options.new_experts, tag=tag, generator=grow_generator) if options.new_experts else {}
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
        with _chilled_statistics(child, options.old_lr_scale):
            result = train(child, data, None, replace(cfg, track_usage=True) if per_batch else cfg, on_log=on_log,
                           should_stop=should_stop, loss_fn=loss_fn, eval_modules=batchnorms, optimizers=optimizers,
                           after_backward=selection if per_batch else None, parallel=parallel)
        if per_batch:
            trained = selection.trained
        if options.review_steps and not result.stopped_early:
            review = _review_routing(child, MixedData(new_train, old_train, 0.5), cfg, options.review_steps, teacher,
                                     options.distill_weight, batchnorms, should_stop, parallel, options.freeze_query)
            result.history.extend({**record, "review": True} for record in review.history)
            result.stopped_early = review.stopped_early
    finally:
        for hook in hooks:
            hook.remove()
        _restore_trainable(child)
    return StageResult(child, segments, result, trained)



@torch.no_grad()
def _peer_queries(model: PEERTransformer, data, batches: int, batch_size: int, seq_len: int,
                  generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Per PEER layer, the normalised queries (eval mode) of ``batches`` sampled batches of ``data``."""
    device = next(model.parameters()).device
    layers = model.peer_layers()
    queries: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def capture(index):
        def hook(layer, args, output):
            queries[index].append(layer.query_norm(layer.query(layer.sub_tokens(args[0]))))
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
