"""A training job's loss history (what the console's loss curve draws) stays bounded over any length of run."""
from __future__ import annotations

from service.jobs.progress import JobProgress


def test_the_loss_history_covers_the_whole_run_in_at_most_200_points_ending_at_the_latest_record():
    progress = JobProgress(attempt=None, steps=50_000, base_metrics={"strategy": "replay"})
    assert progress.metrics() == {"strategy": "replay"} and progress.loss_history == []
    for step in range(10, 50_001, 10):  # a record every log_every = 10 steps
        progress.on_log({"step": step, "loss": 10_000 / step, "lr": 1e-3})
        history = progress.loss_history
        assert len(history) <= JobProgress.HISTORY_POINTS and history[-1] == [step, round(10_000 / step, 4)]
    steps = [point[0] for point in history]
    assert steps[0] == 10 and steps == sorted(steps) and len(steps) > JobProgress.HISTORY_POINTS // 2
    gaps = {b - a for a, b in zip(steps, steps[1:-1])}
    assert len(gaps) == 1, "evenly spaced over the run (but for the latest record)"
    assert progress.metrics()["loss_history"] == history and progress.metrics()["step"] == 50_000
