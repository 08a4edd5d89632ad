"""Evaluation and the forgetting report: bits per byte on every validation set, and the matrix of those over a
stream of stages summed up as forgetting, learning and plasticity."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from ..train import TokenData, TrainConfig, evaluate_bpb


def evaluate_all(model: nn.Module, val_sets: Mapping[str, TokenData], seq_len: int, batch_size: int,
                 max_batches: int | None = None, chunk_tokens: int = TrainConfig.loss_chunk_tokens,
                 on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Bits per byte of ``model`` on every validation set, by name (see :func:`~peer_model.train.evaluate_bpb`)."""
    return {name: evaluate_bpb(model, data, seq_len, batch_size, max_batches, chunk_tokens, on_batch)
            for name, data in val_sets.items()}



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
