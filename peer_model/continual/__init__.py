"""Continual training: one stage grows the pool and fine-tunes on a new corpus while protecting old behaviour.
The stage (stage.continual_stage, the one entry point), its options, replay data, the strategies, forgetting on
request, the forgetting report. Imports the rest of peer_model, never the service; the public names are here."""
from .stage import (
    STRATEGIES, BatchSparseSelection, ContinualOptions, MixedData, StageResult, Strategy, background_frequency,
    continual_stage, distillation_loss, evaluate_all, expert_scores, forget_segments, forgetting_report,
    sample_replay, select_experts, selection_share,
)

__all__ = [
    "STRATEGIES", "BatchSparseSelection", "ContinualOptions", "MixedData", "StageResult", "Strategy",
    "background_frequency", "continual_stage", "distillation_loss", "evaluate_all", "expert_scores",
    "forget_segments", "forgetting_report", "sample_replay", "select_experts", "selection_share",
]
