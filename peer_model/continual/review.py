"""Review (MoE-LPR's review stage, ``review_steps``): after training, only the routing trains, on half replay of
old text, so old inputs find their old experts again."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from ..distributed.data_parallel import DataParallel
from ..model import PEERTransformer
from ..train import TrainConfig, TrainResult, train
from .distillation import distillation_loss
from .freezing import _routing_params


def _review_routing(model: PEERTransformer, data, cfg: TrainConfig, steps: int, teacher: PEERTransformer | None,
                    distill_weight: float, eval_modules: Sequence[nn.Module],
                    should_stop: Callable[[], bool] | None, parallel: DataParallel | None = None,
                    freeze_query: bool = False) -> TrainResult:
    """Train only the routing of every PEER layer (query projection, query BatchNorm, sub-keys; only the
    sub-keys with ``freeze_query``, which the stage asked for) for ``steps`` steps on ``data``, with
    ``distill_weight`` × KL to ``teacher`` on its replayed windows (on several processes with
    ``parallel``: see :func:`continual_stage`)."""
    routing = {id(p) for layer in model.peer_layers().values() for p in _routing_params(layer)
               if not (freeze_query and p is not layer.sub_keys1 and p is not layer.sub_keys2)}
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
