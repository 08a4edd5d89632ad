"""A training job's loss history (what the console's loss curve draws) stays bounded over any length of run; its
progress and ETA go on through evaluation."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from service.jobs import progress as progress_module
from service.jobs.progress import Attempt, JobProgress


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


def test_evaluation_reports_progress_from_90_to_100_percent_with_an_eta(monkeypatch):
    beats = []
    monkeypatch.setattr(progress_module, "heartbeat",
                        lambda sessions, job_id, lease, **fields: beats.append(fields) or False)
    ctx = SimpleNamespace(stopping=threading.Event(), sessions=None,
                          settings=SimpleNamespace(job_heartbeat_seconds=0.0, job_db_outage_seconds=60.0))
    progress = JobProgress(Attempt(ctx, job_id=1, lease="lease"), steps=10)  # its thread not started: beats in line
    progress.on_log({"step": 10, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 5.0, "eta_s": 0.0})
    assert progress.should_stop() is False and beats[-1]["progress"] == 0.9
    progress.evaluating(4)
    for done in range(1, 5):
        time.sleep(0.01)
        progress.on_eval_batch(done, 4)
        assert beats[-1]["progress"] == 0.9 + 0.1 * done / 4
        assert beats[-1]["eta_s"] == pytest.approx(0.01 * (4 - done), abs=0.02 * (4 - done) + 0.005)
    assert beats[-1]["eta_s"] == 0.0


def test_the_heartbeat_thread_carries_the_latest_progress_between_the_jobs_own_checks(monkeypatch):
    """A sharded stage reports steps from other processes and checks the job only every few tenths of a second:
    the attempt's heartbeat thread, which beats as soon as one is due, must record the progress too, or the job's
    step, loss and ETA never reach the database."""
    beats = []
    monkeypatch.setattr(progress_module, "heartbeat",
                        lambda sessions, job_id, lease, **fields: beats.append(fields) or False)
    ctx = SimpleNamespace(stopping=threading.Event(), sessions=None,
                          settings=SimpleNamespace(job_heartbeat_seconds=0.02, job_db_outage_seconds=60.0))
    with Attempt(ctx, job_id=1, lease="lease") as attempt:
        progress = JobProgress(attempt, steps=100, base_metrics={"strategy": "replay"})
        progress.on_log({"step": 10, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 5.0, "eta_s": 9.0})
        deadline = time.monotonic() + 10
        while not any(beat.get("metrics", {}).get("step") == 10 for beat in beats) and time.monotonic() < deadline:
            time.sleep(0.01)
    recorded = [beat for beat in beats if beat.get("metrics", {}).get("step") == 10]
    assert recorded, "the heartbeat thread recorded no progress"
    assert recorded[0]["progress"] == pytest.approx(0.09) and recorded[0]["eta_s"] == 9.0
    assert recorded[0]["metrics"]["strategy"] == "replay"
