"""The console a person watches: one line per log interval and per evaluation, printed by the driver while the
blocking fit runs in a thread, and the fit's own error raised where it was called."""

import queue
import time

import pytest

from gram_ray.train.console import Console, run_with_progress, step_record
from gram_ray.train.events import RunEvents

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

    assert run_with_progress(fit, progress, RunEvents(), console, poll_s=0.01) == "result"
    assert len(lines) == 3
    assert lines[0].startswith("epoch 2/4  step 10/40  loss 1.7500  lr 1.00e-03  512 samples/s  ETA")
    assert "step 20/40" in lines[1] and "ETA 0m00s" in lines[1]  # 10 steps in ~0.05 s: 20 more take ~0.1 s
    assert lines[2] == "eval  epoch 2/4  step 20/40  val text-video-audio/t2v/R@1 87.5  checkpoint saved"


def test_an_error_in_fit_reaches_the_caller():
    def fit():
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        run_with_progress(fit, queue.Queue(), RunEvents(), Console(lambda line: None, bar=False), poll_s=0.01)


def test_a_failure_and_a_resize_are_followed_by_what_they_cost_and_the_world_size_over_time():
    """Steps lost: the newest step seen before the failure (or resize) minus the step of the checkpoint the group
    restarted from; time: from the failure's (resize's) report to the first step after the restart. The world
    size comes with the step records; each change is a line and an entry of world_sizes."""
    from gram_ray.train.events import FAILED, NOTE, RESIZING, RESTARTED, RunEvents

    # the time of each record below
    clock = iter([0.0, 0.0, 10.0, 12.0, 40.0, 41.0, 50.0, 51.0, 60.0, 61.0, 62.0])
    lines = []
    events = RunEvents(clock=lambda: next(clock))
    console = Console(lines.append, bar=False, main_metric=METRIC)

    def show(record: dict):
        console.show(record, events.record(record))

    def step(n: int, workers: int):
        show(step_record(_step(n), epochs=4) | {"workers": workers})

    step(2, 2)
    step(3, 2)
    show({"kind": NOTE, "event": FAILED, "text": "worker group failed: rank 1 (node died)"})
    show({"kind": NOTE, "event": RESTARTED, "step": 1, "text": "restarted from the checkpoint of step 1"})
    step(2, 1)
    step(3, 1)
    step(4, 1)
    show({"kind": NOTE, "event": RESIZING, "text": "resizing the worker group: 1 -> 2 workers"})
    show({"kind": NOTE, "event": RESTARTED, "step": 4, "text": "restarted from the checkpoint of step 4"})
    step(5, 2)
    step(6, 2)
    assert events.recoveries == [
        {
            "cause": "failure",
            "failed_after_step": 3,
            "restarted_from_step": 1,
            "steps_lost": 2,
            "recovery_s": 30.0,
            "first_step_after": 2,
            "workers": 1,
        },
        {
            "cause": "resize",
            "failed_after_step": 4,
            "restarted_from_step": 4,
            "steps_lost": 0,
            "recovery_s": 10.0,
            "first_step_after": 5,
            "workers": 2,
        },
    ]
    assert events.world_sizes[""] == [
        {"from_step": 2, "workers": 2, "at_s": 0.0},
        {"from_step": 2, "workers": 1, "at_s": 40.0},
        {"from_step": 5, "workers": 2, "at_s": 61.0},
    ]
    tracked = [line for line in lines if line.startswith(("recovered:", "resized:", "world size:"))]
    assert tracked == [
        "recovered: 2 steps lost (trained up to step 3, restarted from the checkpoint of step 1), 30.0 s from the "
        "failure to the first step after it",
        "world size: 2 -> 1 workers from step 2",
        "resized: 0 steps lost (trained up to step 4, restarted from the checkpoint of step 4), 10.0 s from the "
        "resize to the first step after it",
        "world size: 1 -> 2 workers from step 5",
    ]
    assert lines.index(tracked[0]) == 4  # printed just before the first step line after the restart


def test_an_evaluation_without_a_val_split_is_not_shown_as_zero_recall():
    """The loop reports the main metric as 0.0 when there is no val split (checkpoints are scored by it); the
    eval line says there is no val split instead."""
    from gram_ray.train.console import progress_callback

    progress = queue.Queue()
    callback = progress_callback(progress, METRIC, epochs=4)
    report = {"step": 8, "total_steps": 8, "epoch": 3, METRIC: 0.0}
    callback.after_report(run_context=None, metrics=[report], checkpoint=object())
    callback.after_report(run_context=None, metrics=[report | {METRIC: 62.5, "val_eval": "{}"}], checkpoint=None)
    console = Console(lambda line: None, bar=False, main_metric=METRIC)
    lines = [console.eval_line(progress.get_nowait()), console.eval_line(progress.get_nowait())]
    assert lines == [
        "eval  epoch 4/4  step 8/8  no val split  checkpoint saved",
        "eval  epoch 4/4  step 8/8  val text-video-audio/t2v/R@1 62.5",
    ]


def test_a_run_without_a_console_still_records_its_recoveries_and_world_sizes():
    """fit writes recoveries and world sizes into result.json from its RunEvents, console or not (they were empty
    whenever no console was attached)."""
    from gram_ray.train.events import FAILED, NOTE, RESTARTED

    progress = queue.Queue()
    events = RunEvents()

    def fit():
        for record in (
            step_record(_step(3), epochs=4) | {"workers": 2},
            {"kind": NOTE, "event": FAILED, "text": "worker group failed"},
            {"kind": NOTE, "event": RESTARTED, "step": 1, "text": "restarted"},
            step_record(_step(2), epochs=4) | {"workers": 1},
        ):
            progress.put(record)
        return "result"

    assert run_with_progress(fit, progress, events, console=None, poll_s=0.01) == "result"
    assert [(r["cause"], r["steps_lost"], r["workers"]) for r in events.recoveries] == [("failure", 2, 1)]
    assert [w["workers"] for w in events.world_sizes[""]] == [2, 1]
