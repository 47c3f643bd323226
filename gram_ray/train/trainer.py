"""TorchTrainer assembly: data caches -> Ray Datasets -> TorchTrainer(train_loop_per_worker) -> Result.

`fit` is one training run as the CLI, the demo and jobs start it: where it continues from (resume.py), its data
(datasets.py), the trainer (build_trainer: the workers run worker.py's entry point), the run's events while it
trains (events.py: recoveries and world sizes, shown by a console if any), and result.json at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from pathlib import Path

from gram_ray import storage
from gram_ray.config import GramConfig, save_config
from gram_ray.data.preprocess import REPORT
from gram_ray.storage.uploads import abort_orphans_of_a_dead_run, now
from gram_ray.tracking import wandb_run_id
from gram_ray.train.cluster_view import fresh_cluster_view_callback
from gram_ray.train.console import Console, ProgressQueue, progress_callback, resize_callback, run_with_progress
from gram_ray.train.datasets import REST, EpochSplits, TrainingData, prepare_data
from gram_ray.train.events import RunEvents
from gram_ray.train.guards import step_beacon
from gram_ray.train.layout import RunLayout
from gram_ray.train.loop import main_metric_name
from gram_ray.train.resume import ResumePlan, resume_plan
from gram_ray.train.worker import WorkerArgs, plan_of, train_loop_per_worker

__all__ = ["build_trainer", "fit", "tracking_options", "train_env"]


def fit(
    cfg: GramConfig, output_dir: str | Path, resume_from: str | None = None, log=print, console: Console | None = None
):
    """Prepare data, train with TorchTrainer, write <output>/result.json; returns (Ray Train Result, summary).
    resume_from: None, "auto" or a checkpoint (resume_plan). With a console, progress lines are printed while it
    trains; the run's recoveries and world sizes are recorded either way."""
    started = now()
    layout = RunLayout.of(cfg, output_dir)
    layout.output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, layout.output_dir / "config.yaml")
    plan = resume_plan(layout.run_root, cfg.run.name, resume_from, log=log)
    if plan.start is not None:  # the run it continues died: what it was uploading will never complete
        abort_orphans_of_a_dead_run(layout.run_root, started, log=log)
    data = prepare_data(cfg, layout, log=log)
    log(f"training on {data.train_rows} clips with {_workers(cfg)} for {cfg.train.epochs:g} epochs ...")
    progress, events = ProgressQueue(), RunEvents()
    tracking = tracking_options(cfg, layout, run_id=lambda: wandb_run_id(layout.run_root, plan.start is not None))
    trainer = build_trainer(cfg, data, layout, plan, progress=progress, tracking=tracking)
    with train_env(cfg):
        result = run_with_progress(trainer.fit, progress, events, console)
    summary = _summary(cfg, layout, result, events)
    layout.write_result("result.json", json.dumps(summary, indent=2))
    _fetch_metrics(layout)
    if layout.shared:
        layout.write_result("config.yaml", (layout.output_dir / "config.yaml").read_text())
    return result, summary


def _workers(cfg: GramConfig) -> str:
    s = cfg.scaling
    if not s.elastic:
        return f"{s.num_workers} workers"
    sizes = "; ".join(plan_of(cfg, w).describe() for w in range(s.max_workers, s.min_workers - 1, -1))
    return f"{s.min_workers} to {s.max_workers} workers (elastic: {sizes})"


def _summary(cfg: GramConfig, layout: RunLayout, result, events: RunEvents) -> dict:
    """result.json: the best checkpoint (by the main metric) and its metrics, the last metrics, and the run's
    events."""
    metric = main_metric_name(cfg)
    # best_checkpoints holds the kept checkpoints in the order they were reported, not by score.
    kept = result.best_checkpoints or [(result.checkpoint, result.metrics)]
    best = max(kept, key=lambda pair: pair[1].get(metric, float("-inf")))
    return {
        # Ray gives a checkpoint's path inside its filesystem (bucket/key, no scheme): the run's URI is what
        # evaluate, --resume and model.init_from take.
        "checkpoint": storage.join(layout.run_root, posixpath.basename(best[0].path)) if best[0] else None,
        "best_metrics": {k: v for k, v in best[1].items() if k != "val_eval"},
        "best_eval": json.loads(best[1]["val_eval"]) if "val_eval" in best[1] else None,
        "last_metrics": {k: v for k, v in (result.metrics or {}).items() if k != "val_eval"},
        "train_cache_report": storage.join(layout.cache("train"), REPORT),
        # Each restart of the worker group (a worker or its node lost): steps lost and time to recover.
        "recoveries": events.recoveries,
        # The worker group's size over the run: from which step (and second of the run) it trained at each size.
        "world_sizes": events.world_sizes.get("", []),
    }


def build_trainer(
    cfg: GramConfig,
    data: TrainingData,
    layout: RunLayout,
    resume: ResumePlan | None = None,
    callbacks: list | None = None,
    progress=None,
    source: str = "",
    tracking: dict | None = None,
):
    """The TorchTrainer of a run. resume: where its worker groups start (resume_plan; default: afresh, or
    wherever Ray Train's checkpoints of this run name say for a restart). tracking: {"run_id": the W&B run id,
    "credentials": an ObjectRef of tracking.wandb_credentials(), "sync_to": where rank 0 copies its logs}
    (tracking_options)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    if data.train_rows < cfg.step_clips:
        raise ValueError(
            f"{data.train_rows} training clips cannot fill one step of {cfg.worker_batch} per worker x "
            f"{s.max_workers} workers x {cfg.train.grad_accum} accumulated; lower train.batch_size, "
            "train.grad_accum or scaling.num_workers"
        )
    resume = resume or ResumePlan(layout.run_root)
    splits = EpochSplits(data.train, cfg, resume, data.train_shards, data.file_rows)
    datasets = {"train": splits.train, REST: splits.rest}  # called at every worker-group (re)start
    if data.val is not None:
        datasets["val"] = data.val
    callbacks = list(callbacks or [])
    if progress is not None:
        callbacks.append(progress_callback(progress, main_metric_name(cfg), cfg.train.epochs, source))
        if s.elastic:
            callbacks.append(resize_callback(progress, source))
    if s.elastic:  # the size a restart takes follows the nodes left within a second (train/cluster_view.py)
        callbacks.append(fresh_cluster_view_callback())
    args = WorkerArgs(
        cfg=cfg.model_dump(mode="json"),
        vocab=data.vocab,
        train_rows=data.train_rows,
        file_rows=data.file_rows,
        output_dir=str(layout.output_dir),
        caches={split: layout.cache(split) for split in ("train", "val")},
        resume=resume,
        progress=progress,
        source=source,
        tracking=tracking,
        beacon=step_beacon() if cfg.train.watchdog_steps else None,
        test_hang=os.environ.get("GRAM_RAY_TEST_HANG"),  # tests only: the step watchdog's hung rank
    )
    return TorchTrainer(
        train_loop_per_worker,
        datasets=datasets,
        train_loop_config=args.as_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,  # (min, max): Ray Train's elastic scaling
            use_gpu=s.use_gpu,
            resources_per_worker=s.resources_per_worker,
            **({"elastic_resize_monitor_interval_s": s.resize_check_s} if s.elastic else {}),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            **storage.run_storage(layout.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=main_metric_name(cfg),
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            callbacks=callbacks,
        ),
        # Only the train splits are sharded: sharding drops rows to equalise shards, and evaluation must see
        # every clip.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[k for k in datasets if k != "val"], execution_options=_ingest_options(cfg)
        ),
    )


def _ingest_options(cfg: GramConfig):
    """Ray Data's options for the datasets handed to the workers: Ray Train's defaults, in order if asked."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or cfg.data.preserve_order
    return options


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train hands these from the driver to its controller
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"


# An elastic group starts only on resources Ray's autoscaling coordinator reserved for it, which are there: a
# placement group over them is granted in a second or two. After a node is lost without notice the coordinator's
# view lags (it refreshes every 20 s), and each start at the old size waits this long before Ray Train decides
# again with fewer workers.
ELASTIC_START_TIMEOUT_S = 5.0
# How often Ray Train's watcher looks for drained nodes (Ray's default 5 s): every second of a notice (GCP gives
# about 30 s) is a second to train on before the preemption checkpoint. One GCS read a second.
PREEMPTION_POLL_S = 1.0


@contextlib.contextmanager
def train_env(cfg: GramConfig):
    """The environment Ray Train's controller reads, around a fit: the worker group's start timeout
    (scaling.start_timeout_s) and how often it looks for drained nodes, each unless the user set the variable.
    Restored afterwards (Tune runs several fits in one process)."""
    s = cfg.scaling
    timeout = s.start_timeout_s or (ELASTIC_START_TIMEOUT_S if s.elastic else None)
    wanted = {PREEMPTION_POLL_ENV: str(PREEMPTION_POLL_S)}
    if timeout is not None:
        wanted[START_TIMEOUT_ENV] = str(timeout)
    ours = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)


def tracking_options(cfg: GramConfig, layout: RunLayout, run_id) -> dict:
    """What rank 0 needs to record the run (build_trainer's tracking): its W&B run id (run_id(), called only when
    W&B is on), the W&B credentials by reference (ray.put: in no config, log or job metadata), and where to copy
    its logs (the run's storage, when it has one)."""
    import ray

    from gram_ray.tracking import wandb_credentials, wandb_mode

    credentials = wandb_credentials()
    mode = wandb_mode(cfg, credentials)
    on = mode != "disabled"
    return {
        "wandb_mode": mode,  # decided here, once: rank 0's own environment may say otherwise
        "run_id": run_id() if on else None,
        "credentials": ray.put(credentials) if on else None,
        "sync_to": layout.run_root if layout.shared else None,
    }


def _fetch_metrics(layout: RunLayout) -> None:
    """The driver's own copy of metrics.jsonl, where rank 0 ran on another node (it kept it on the run's storage)."""
    from gram_ray.tracking import METRICS_FILE

    remote = storage.join(layout.run_root, METRICS_FILE)
    if layout.shared and not layout.metrics.exists() and storage.exists(remote):
        storage.write_bytes_with(layout.metrics, lambda f: f.write(storage.read_bytes(remote)))
