"""A tiny sweep through Ray Tune end to end: trials differ, ASHA stops some, a bad trial fails alone,
best_config.yaml loads, and a resumed sweep runs only what was unfinished.

Not in `make test` yet (marker `tune`; run with `pytest -m tune`): on the 2-core machine the sweep stalls after
one or two trials: the next trial's TrainController hits Ray Train's 60 s worker-group start-up limit
(WorkerGroupStartupTimeoutError) while the raylet starts workers two at a time. Issue 5 stays open on it."""

import csv

import pytest
from tiny import tiny_config

from gram_ray.config import load_config
from gram_ray.tune import run_sweep

pytestmark = pytest.mark.tune


@pytest.fixture(scope="module")
def sweep(synth_small, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(
        "train.epochs=3",
        f"data.train_annotations={synth_small['train']}",
        f"data.val_annotations={synth_small['val']}",
        f"data.video_dir={synth_small['videos']}",
        f"data.audio_dir={synth_small['audios']}",
        "tune.num_samples=2",
        "tune.max_concurrent_trials=1",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        # A temperature of -1 is invalid: those trials must fail while the others go on.
        "tune.search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, model.temperature: {grid: [0.05, 0.1, -1.0]}}",
    )
    results = run_sweep(cfg, out, log=lambda *_: None)
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    return cfg, out, results, rows


def test_trials_differ_and_a_failing_trial_does_not_stop_the_sweep(sweep):
    _, _, _, rows = sweep
    assert len(rows) == 6
    assert len({r["train.lr"] for r in rows}) == 6 and {r["model.temperature"] for r in rows} == {"0.05", "0.1", "-1.0"}
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 2 and all(r["model.temperature"] == "-1.0" for r in errors)
    assert all("temperature" in r["error"] for r in errors)
    assert all(r["best_metric"] for r in rows if r["status"] != "error")


def test_asha_stops_some_trials_early(sweep):
    _, _, _, rows = sweep
    statuses = [r["status"] for r in rows if r["status"] != "error"]
    assert "stopped_early" in statuses and "completed" in statuses
    assert all(int(r["evaluations"]) < 3 for r in rows if r["status"] == "stopped_early")


def test_best_config_is_accepted_by_the_training_loader(sweep):
    cfg, out, _, rows = sweep
    best = load_config(out / "best_config.yaml")
    winner = max((r for r in rows if r["status"] != "error"), key=lambda r: float(r["best_metric"]))
    assert best.train.lr == pytest.approx(float(winner["train.lr"]))
    assert best.model.temperature == pytest.approx(float(winner["model.temperature"]))
    assert best.model.modalities == cfg.model.modalities and (out / "sweep.png").stat().st_size > 0


def test_resume_reruns_nothing_that_finished(sweep):
    cfg, out, _, rows = sweep
    resumed = run_sweep(cfg, out, resume=True, log=lambda *_: None)
    assert len(resumed) == len(rows)
    with (out / "trials.csv").open() as f:
        again = {r["trial_id"]: r for r in csv.DictReader(f)}
    for r in rows:  # finished trials keep their results: none was run again
        assert again[r["trial_id"]]["evaluations"] == r["evaluations"]
        assert again[r["trial_id"]]["status"] == r["status"]
