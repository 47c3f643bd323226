"""Ray Tune sweeps end to end on the tiny synthetic set: trials differ, ASHA stops a trial, a bad trial fails
alone, best_config.yaml loads, and an interrupted sweep resumes without re-running what finished.

Two real sweeps (~3 min on 2 cores): each trial is a TorchTrainer with 2 workers."""

import contextlib
import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from tiny import tiny_config

from gram_ray.config import load_config
from gram_ray.train.resume import SNAPSHOT
from gram_ray.tune import run_sweep

pytestmark = [pytest.mark.tune, pytest.mark.ray]


def _sweep_config(synth_small, *overrides):
    return tiny_config(
        "train.epochs=3",
        f"data.train_annotations={synth_small['train']}",
        f"data.val_annotations={synth_small['val']}",
        f"data.video_dir={synth_small['videos']}",
        f"data.audio_dir={synth_small['audios']}",
        "tune.max_concurrent_trials=1",  # trials run in the grid's order: what ASHA sees is known
        *overrides,
    )


def _rows(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(synth_small, ray_session, s3, tmp_path_factory):
    """Media, caches, Tune's experiment state and the trials' checkpoints in a bucket of the local S3 server."""
    out = tmp_path_factory.mktemp("sweep")
    data = s3.upload_dataset(synth_small)
    cfg = _sweep_config(
        data,
        f"run.storage_path={s3.bucket_of(data)}/runs",
        "tune.num_samples=1",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        # ASHA needs a metric without ties on 8 val clips (R@1 moves in steps of 12.5): the reported learning rate
        # is deterministic, so the second trial (100x smaller) must be stopped at the first rung.
        "tune.metric=train/lr",
        "tune.mode=max",
        # A temperature of -1 is invalid: those trials must fail while the others go on.
        "tune.search_space={train.lr: {grid: [1.0e-2, 1.0e-4]}, model.temperature: {grid: [0.07, -1.0]}}",
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # W&B records the trials, with no account
        cfg.wandb.enabled = True
        results = run_sweep(cfg, out, log=lambda *_: None)
    return cfg, out, results, _rows(out)


def test_trials_differ_and_a_failing_trial_does_not_stop_the_sweep(sweep):
    _, _, _, rows = sweep
    assert len(rows) == 4
    assert {(r["train.lr"], r["model.temperature"]) for r in rows} == {
        (lr, t) for lr in ("0.01", "0.0001") for t in ("0.07", "-1.0")
    }
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 2 and all(r["model.temperature"] == "-1.0" for r in errors)
    assert all("model.temperature" in r["error"] and "greater than 0" in r["error"] for r in errors)
    assert all(r["best_metric"] for r in rows if r["status"] != "error")


def test_asha_stops_the_worse_trial_early(sweep):
    _, _, _, rows = sweep
    by_lr = {r["train.lr"]: r for r in rows if r["status"] != "error"}
    assert by_lr["0.01"]["status"] == "completed" and by_lr["0.01"]["evaluations"] == "3"
    assert by_lr["0.0001"]["status"] == "stopped_early" and by_lr["0.0001"]["evaluations"] == "1"


def test_the_sweep_state_and_caches_live_in_the_bucket(sweep):
    from ray import tune

    from gram_ray import storage
    from gram_ray.tune import SWEEP_NAME, sweep_root

    cfg, out, _, _ = sweep
    root = sweep_root(cfg)
    assert root.startswith("s3://")
    assert tune.Tuner.can_restore(storage.join(root, "ray", SWEEP_NAME))  # resumable from the bucket alone
    assert storage.exists(storage.join(root, "cache", "train", "report.json"))
    assert storage.read_text(storage.join(root, "trials.csv")) == (out / "trials.csv").read_text()


def test_a_sweep_is_one_wandb_group_with_a_run_per_trial_kept_in_the_bucket(sweep, tmp_path):
    """Each trial that trained is a W&B run whose id is its trial id, kept in its folder of the sweep's storage;
    the finished trial's run names the sweep's group. (ASHA's stopped trial ends with its workers: its copy holds
    what W&B had flushed at its last checkpoint.)"""
    import pyarrow.fs as pafs
    from wandb_records import read_records

    from gram_ray import storage
    from gram_ray.tune import sweep_root

    cfg, out, _, rows = sweep
    fs, trials = storage.resolve(storage.join(sweep_root(cfg), "trials"))
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(trials, recursive=True)) if i.path.endswith(".wandb")]
    by_trial = {path.split("/")[-2].rsplit("-", 1)[1]: path for path in files}  # offline-run-<time>-<run id>
    trained = {r["trial_id"]: r for r in rows if r["status"] != "error"}
    assert set(by_trial) == set(trained) and len(trained) == 2  # the failing two stopped before training
    (done,) = [trial for trial, r in trained.items() if r["status"] == "completed"]
    local = tmp_path / "done.wandb"
    local.write_bytes(storage.read_bytes(f"s3://{by_trial[done]}"))
    (run,) = [r.run for r in read_records(local) if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.run_group, run.display_name) == (done, f"sweep-{out.name}", f"train-{done}")


def test_best_config_is_accepted_by_the_training_loader(sweep):
    cfg, out, _, rows = sweep
    best = load_config(out / "best_config.yaml")
    assert best.train.lr == pytest.approx(1e-2) and best.model.temperature == pytest.approx(0.07)
    assert best.model.modalities == cfg.model.modalities and best.train.epochs == cfg.train.epochs
    assert best.data.train_annotations == cfg.data.train_annotations
    assert (out / "sweep.png").stat().st_size > 0


def _interrupt_after_second_trial_checkpoints(trials: Path, stop: threading.Event, paused: list[int]) -> None:
    """Ctrl+C for Tune (SIGUSR1: same graceful stop, and never a KeyboardInterrupt for pytest) once the second
    trial (one trial at a time, in the grid's order: trial id ..._00001) has stored and registered its first
    evaluation's checkpoint (Ray Train's snapshot is written at the first registration): it must resume from
    there. Tune's stop takes seconds (from 2 to more than 14 were seen), in which the trial would train on, so its
    Ray Train workers (found by Ray's state API, by process id) are paused first: the stop always finds it where it
    was. Watched where Ray Train writes (the sweep's trials/ folder): Tune's trial folders hold copies made when
    Tune syncs, 4 to more than 9 s later, by when the trial had evaluated again or finished."""
    import ray
    from ray.util.state import list_actors

    while not stop.is_set():
        if list(trials.glob(f"train-*_00001/{SNAPSHOT}")):
            alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            workers = list_actors(address=ray.get_runtime_context().gcs_address, filters=alive)
            for worker in workers:
                os.kill(worker.pid, signal.SIGSTOP)
                paused.append(worker.pid)
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        time.sleep(0.2)


# About 2.5 minutes: in `make test-cluster` (marker `long`), to keep `make test` under 25 minutes on 2 cores.
@pytest.mark.long
def test_interrupted_sweep_resumes_only_unfinished_trials(synth_small, ray_session, tmp_path):
    """Interrupted after the second trial's first evaluation, the sweep resumes that trial from its checkpoint (its
    training continues: Tune counts its reports from 0 again) and counts the evaluations made before the stop; the
    finished trial is kept as it was."""
    cfg = _sweep_config(
        synth_small,
        # 3 evaluations, ~7 s apart (20 epochs of 16 clips): the interruption comes after the first
        "train.epochs=60",
        "train.eval_every_epochs=20",
        "tune.num_samples=1",
        "tune.grace_period=3",  # = every evaluation: ASHA stops nothing here, so both trials must complete
        "tune.search_space={train.lr: {grid: [1.0e-2, 3.0e-3]}}",
    )
    stop, paused = threading.Event(), []
    watcher = threading.Thread(
        target=_interrupt_after_second_trial_checkpoints, args=(tmp_path / "trials", stop, paused)
    )
    watcher.start()
    try:
        run_sweep(cfg, tmp_path, log=lambda *_: None)
    finally:
        stop.set()
        watcher.join()
        for pid in paused:  # gone with their trial as a rule; never left paused
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert paused, "the second trial's first checkpoint was not seen in <out>/trials while its workers ran"
    first = {r["train.lr"]: r for r in _rows(tmp_path)}
    assert first["0.01"]["status"] == "completed" and first["0.003"]["status"] != "completed", first
    finished = next(p for p in (tmp_path / "ray" / "sweep").iterdir() if "lr=0.0100" in p.name)
    reports_before = (finished / "result.json").read_text()

    run_sweep(cfg, tmp_path, resume=True, log=lambda *_: None)
    again = {r["train.lr"]: r for r in _rows(tmp_path)}
    assert again["0.003"]["status"] == "completed" and again["0.003"]["evaluations"] == "3", again
    resumed = next(p for p in (tmp_path / "ray" / "sweep").iterdir() if "lr=0.0030" in p.name)
    last = json.loads((resumed / "result.json").read_text().splitlines()[-1])
    assert last["evaluations"] == 3 and last["training_iteration"] < 3  # continued from its checkpoint
    assert again["0.01"] == first["0.01"]  # the finished trial kept its results ...
    assert (finished / "result.json").read_text() == reports_before  # ... and was not run again
    assert json.loads(reports_before.splitlines()[-1])["training_iteration"] == 3
