"""The console a person watches: one line per log interval and per evaluation, printed by the driver while the
blocking fit runs in a thread, and the fit's own error raised where it was called."""

import queue
import time

import pytest

from gram_ray.train.console import Console, run_with_progress, step_record

METRIC = "val/text-video-audio/t2v/R@1"


def _step(step):
    return {
        "step": step,
        "total_steps": 40,
        "epoch": step // 10,
        "train/loss": 2.0 - step / 40,
        "train/lr": 1e-3,
        "train/samples_per_s": 512.0,
        "val_eval": "{}",
    }


def test_step_and_eval_lines_say_where_training_is():
    lines = []
    console = Console(lines.append, bar=False, main_metric=METRIC)
    progress = queue.Queue()

    def fit():
        for step in (10, 20):
            progress.put(step_record(_step(step), epochs=4))
            time.sleep(0.05)
        progress.put(
            {"kind": "eval", "step": 20, "total_steps": 40, "epoch": 1, "epochs": 4, METRIC: 87.5, "checkpoint": True}
        )
        return "result"

    assert run_with_progress(fit, progress, console, poll_s=0.01) == "result"
    assert len(lines) == 3
    assert lines[0].startswith("epoch 2/4  step 10/40  loss 1.7500  lr 1.00e-03  512 samples/s  ETA")
    assert "step 20/40" in lines[1] and "ETA 0m00s" in lines[1]  # 10 steps in ~0.05 s: 20 more take ~0.1 s
    assert lines[2] == "eval  epoch 2/4  step 20/40  val text-video-audio/t2v/R@1 87.5  checkpoint saved"


def test_an_error_in_fit_reaches_the_caller():
    def fit():
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        run_with_progress(fit, queue.Queue(), Console(lambda line: None, bar=False), poll_s=0.01)
