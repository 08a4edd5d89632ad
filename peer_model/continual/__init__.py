"""Continual training: one stage grows the pool and fine-tunes on a new corpus while protecting old behaviour.
stage.continual_stage is the one entry point; beside it its options, replay data, one module per strategy family,
forgetting on request and the report. Imports the rest of peer_model, never the service; public names are here."""
from .data import MixedData, sample_replay
from .distillation import distillation_loss
from .forgetting import forget_segments
from .options import STRATEGIES, ContinualOptions, Strategy
from .report import evaluate_all, forgetting_report
from .sparse import BatchSparseSelection, background_frequency, expert_scores, select_experts, selection_share
from .stage import StageResult, continual_stage

__all__ = [
    "STRATEGIES", "BatchSparseSelection", "ContinualOptions", "MixedData", "StageResult", "Strategy",
    "background_frequency", "continual_stage", "distillation_loss", "evaluate_all", "expert_scores",
    "forget_segments", "forgetting_report", "sample_replay", "select_experts", "selection_share",
]
