"""Ray Tune sweeps (the Ray >= 2.51 "Train V2" pattern): a Tuner over a driver function that builds and fits
one TorchTrainer per trial and reports through TuneReportCallback. ASHA stops poor trials early on the val
metric; the Parquet caches are decoded once, before the sweep, and shared by every trial.

Outputs in <out>: trials.csv (each trial's swept values, best metric, evaluations, status), best_config.yaml (a
complete config that `gram-ray train` accepts) and sweep.png (the metric over learning rate and temperature).
Each trial's checkpoints: <out>/trials/train-<trial id>/, or <storage_path>/<run.name>-sweep/trials/ with
run.storage_path (then every node must reach it; without it, <out> must be).
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

from gram_ray import storage
from gram_ray.config import ConfigError, GramConfig, apply_overrides, save_config
from gram_ray.train.loop import main_metric_name

__all__ = ["search_space", "run_sweep", "trial_driver", "write_outputs", "sweep_root"]

SWEEP_NAME = "sweep"
EVALUATIONS = "evaluations"  # the metric each report carries: the run's evaluations so far, those before a resume too


def search_space(cfg: GramConfig) -> dict:
    from ray import tune

    makers = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    space = {}
    for key, spec in cfg.tune.search_space.items():
        if len(spec) != 1:
            raise ConfigError(f"tune.search_space.{key}: give exactly one of loguniform, uniform, choice, grid")
        ((kind, values),) = spec.items()
        space[key] = makers[kind](values)
    return space


def trial_driver(
    config: dict, base: dict, trials_root: str, progress=None, wandb_mode: str = "disabled", credentials=None
) -> None:
    """One trial: the base config (passed once, by Tune's object store) with this trial's values (`config`, the
    swept dotted keys only), fitted by its own TorchTrainer, its checkpoints in <trials_root>/train-<trial id>. Its
    W&B run (id: the trial's, so a resumed sweep continues it) is one of the sweep's group; credentials:
    tracking.wandb_credentials() of the sweep's driver (which decided wandb_mode), through Tune's object store."""
    import ray
    import ray.tune
    from pydantic import ValidationError
    from ray.tune.integration.ray_train import TuneReportCallback

    from gram_ray.train.datasets import prepare_data
    from gram_ray.train.layout import RunLayout
    from gram_ray.train.trainer import build_trainer, train_env

    tree = copy.deepcopy(base)
    apply_overrides(tree, [f"{k}={v}" for k, v in config.items()])
    try:
        cfg = GramConfig.model_validate(tree)
    except ValidationError as e:  # a bad value fails this trial only, with one line that says what is wrong
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err['input']!r})" for err in e.errors()
        )
        raise ConfigError(f"invalid trial config: {problems}") from None
    # Tune's trial folder is a staging folder on the driver's node (under /tmp/ray/session_*), copied to the
    # sweep's storage when Tune syncs: checkpoints written there would be stored twice, and those not yet synced
    # would be lost with the driver. Ray Train writes them straight to the sweep's storage instead, where a
    # resumed trial's run (same name, same storage) finds them.
    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    cfg.run.storage_path = trials_root
    trial_id = ray.tune.get_context().get_trial_id()
    cfg.run.name = f"train-{trial_id}"
    layout = RunLayout.of(cfg, trial_dir)
    data = prepare_data(cfg, layout, log=lambda *_: None)  # cache hits: decoded once before the sweep
    on = wandb_mode != "disabled"
    ref = ray.put(credentials) if on else None  # to the trial's rank 0 by reference, as a training run's
    tracking = {"wandb_mode": wandb_mode, "run_id": trial_id if on else None, "credentials": ref}
    trainer = build_trainer(
        cfg,
        data,
        layout,
        callbacks=[TuneReportCallback()],
        progress=progress,
        source=f"trial {trial_id}",
        tracking=tracking | {"sync_to": layout.run_root},  # the trial's folder in the sweep's storage
    )
    with train_env(cfg):
        trainer.fit()


def sweep_root(cfg: GramConfig) -> str:
    """<run.storage_path>/<run.name>-sweep: the sweep's Tune state, caches and trial checkpoints on shared storage."""
    return storage.join(cfg.run.storage_path, f"{cfg.run.name}-sweep")


# Where each trial's driver (its TorchTrainer's owner) runs: on the head, beside the sweep's own driver, with no CPU
# of its own (it only drives). On a worker node it would die with that node (a spot node's reclaim), and with it the
# trial's Ray Train controller, leaving the trial's placement group held. Ray Train pins its own state actor so.
_TRIAL_DRIVER = {"cpu": 0, "node:__internal_head__": 0.001}


def _max_concurrent(cfg: GramConfig) -> int:
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    workers = cfg.scaling.max_workers  # an elastic trial may grow to its max
    per_trial_gpu = workers if cfg.scaling.use_gpu else 0
    per_trial_cpu = workers + 1  # the workers, and room for their Ray Data work (driver and controller take none)
    fits = resources.get("CPU", 1) // per_trial_cpu
    if per_trial_gpu:
        fits = min(fits, resources.get("GPU", 0) // per_trial_gpu)
    return max(1, int(fits))


def run_sweep(cfg: GramConfig, out: str | Path, resume: bool = False, log=print):
    """Decode the data once, run (or resume) the sweep, write the outputs; returns the ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from gram_ray.tracking import wandb_credentials, wandb_mode
    from gram_ray.train.console import Console, ProgressQueue, run_with_progress
    from gram_ray.train.datasets import decode_caches
    from gram_ray.train.events import RunEvents
    from gram_ray.train.layout import RunLayout

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(deep=True)
    root = sweep_root(cfg) if cfg.run.storage_path else str(out)
    cfg.data.cache_dir = cfg.data.cache_dir or storage.join(root, "cache")
    for key in ("train_annotations", "val_annotations", "video_dir", "audio_dir", "cache_dir"):
        value = getattr(cfg.data, key)
        if value:  # trials run in their own working directories
            setattr(cfg.data, key, storage.absolute(value))
    metric = cfg.tune.metric or main_metric_name(cfg)
    evaluations = math.ceil(cfg.train.epochs / cfg.train.eval_every_epochs)
    tune_storage = storage.join(root, "ray")
    # The base config goes through with_parameters, not the search space: Tune prints and stores each trial's
    # config, which should be the swept values only.
    progress = ProgressQueue()
    # Every trial a W&B run of one group; W&B's key goes to the trials by reference (tracking.py).
    cfg.wandb.group = cfg.wandb.group or f"sweep-{out.name}"
    credentials = wandb_credentials()
    mode = wandb_mode(cfg, credentials)
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver,
            base=cfg.model_dump(mode="json"),
            trials_root=storage.join(root, "trials"),
            progress=progress,
            wandb_mode=mode,
            credentials=credentials if mode != "disabled" else None,  # with_parameters: by the object store
        ),
        _TRIAL_DRIVER,
    )

    if resume:
        path = storage.join(tune_storage, SWEEP_NAME)
        where = storage.run_storage(path)  # Tune's state through the storage settings' filesystem
        inside, fs = where["storage_path"], where.get("storage_filesystem")
        if not tune.Tuner.can_restore(inside, storage_filesystem=fs):
            raise ConfigError(f"no sweep to resume at {path}; run without --resume first")
        log(f"resuming the sweep in {path}: finished trials are kept, unfinished ones run")
        tuner = tune.Tuner.restore(
            inside, trainable=trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=fs
        )
    else:
        log("decoding the data once for every trial ...")
        decode_caches(cfg, RunLayout.of(cfg, out), log=log)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=cfg.tune.mode,
                # Rungs in the run's own evaluations, not Tune's iterations: a trial resumed after an interruption
                # continues its training from its checkpoint while Tune counts its reports from 0 again.
                scheduler=ASHAScheduler(
                    time_attr=EVALUATIONS,
                    max_t=evaluations,
                    grace_period=cfg.tune.grace_period,
                    reduction_factor=cfg.tune.reduction_factor,
                ),
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=_max_concurrent(cfg),
            ),
            # gram-ray prints a line per trial step and evaluation; Tune's status table stays off the console.
            run_config=tune.RunConfig(name=SWEEP_NAME, **storage.run_storage(tune_storage), verbose=0),
        )
    results = run_with_progress(tuner.fit, progress, RunEvents(), Console(log, main_metric=metric))
    write_outputs(results, cfg, metric, evaluations, out, log)
    return results


def _evaluations(result) -> int:
    """The trial's evaluations: its training run's own count (which a resumed trial continues), else Tune's."""
    metrics = result.metrics or {}
    return int(metrics.get(EVALUATIONS, metrics.get("training_iteration", 0)))


def _status(result, evaluations: int) -> str:
    if result.error is not None:
        return "error"
    done = _evaluations(result)
    if done == 0:
        return "not_started"  # the sweep was interrupted first: --resume runs it
    return "completed" if done >= evaluations else "stopped_early"


def _error_line(error: BaseException) -> str:
    """The line of a trial's traceback that says what went wrong (Ray wraps it in its own text)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    own = [line for line in lines if line.startswith(("gram_ray.", "ConfigError", "ValueError", "RuntimeError"))]
    return (own or lines or [type(error).__name__])[-1][:300]


def write_outputs(results, cfg: GramConfig, metric: str, evaluations: int, out: Path, log=print) -> None:
    keys = list(cfg.tune.search_space)
    # A trial that never started (sweep interrupted) has no Result.config; its values are in Tune's trial list.
    analysis = getattr(results, "_experiment_analysis", None)
    planned = {str(t.path): t.config for t in getattr(analysis, "trials", [])}
    rows = []
    for result in results:
        swept = result.config or planned.get(str(result.path)) or {}
        history = result.metrics_dataframe
        values = history[metric] if history is not None and metric in history else None
        best = None if values is None else float(values.max() if cfg.tune.mode == "max" else values.min())
        rows.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
                **{k: swept.get(k) for k in keys},
                "best_metric": best,
                "evaluations": _evaluations(result),
                "status": _status(result, evaluations),
                "error": _error_line(result.error) if result.error else "",
            }
        )
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scored = [r for r in rows if r["best_metric"] is not None]
    if not scored:
        log(f"no trial reported {metric}; see {out / 'trials.csv'} for the errors")
        return
    best = (
        max(scored, key=lambda r: r["best_metric"])
        if cfg.tune.mode == "max"
        else min(scored, key=lambda r: r["best_metric"])
    )
    tree = cfg.model_dump(mode="json")
    apply_overrides(tree, [f"{k}={best[k]}" for k in keys])
    save_config(GramConfig.model_validate(tree), out / "best_config.yaml")
    _plot(scored, metric, out / "sweep.png")
    log(
        f"best trial {best['trial_id']}: {metric} = {best['best_metric']:.1f} with "
        + ", ".join(f"{k}={best[k]}" for k in keys)
    )
    if cfg.run.storage_path:  # also beside the sweep's state, which outlives the driver's folder
        for name in ("trials.csv", "best_config.yaml"):
            storage.write_text(storage.join(sweep_root(cfg), name), (out / name).read_text())
    log(f"wrote {out / 'trials.csv'}, {out / 'best_config.yaml'}, {out / 'sweep.png'}")


def _plot(rows: list[dict], metric: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    lr = [r.get("train.lr") for r in rows]
    temp = [r.get("model.temperature") for r in rows]
    if None in lr or None in temp:  # swept something else: metric per trial
        ax.bar(range(len(rows)), [r["best_metric"] for r in rows])
        ax.set(xlabel="trial", ylabel=metric)
    else:
        points = ax.scatter(lr, temp, c=[r["best_metric"] for r in rows], cmap="viridis", s=80)
        ax.set(xscale="log", yscale="log", xlabel="train.lr", ylabel="model.temperature (initial)")
        fig.colorbar(points, label=metric)
    ax.set_title("sweep")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
