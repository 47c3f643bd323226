"""What every worker of a training run's group does (Ray Train's train_loop_per_worker): set itself up from the
WorkerArgs the driver handed it, find the checkpoint it continues from (the run's ResumePlan decides), and run
the Ray-free loop (loop.py) over its shard of the train split, reporting through ray.train.report.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from gram_ray import storage
from gram_ray.config import GramConfig
from gram_ray.config.world import WorldPlan, plan_for_world
from gram_ray.data.collate import Collate
from gram_ray.model.checkpoint import load_checkpoint, upload_checkpoint
from gram_ray.train.checkpointing import TakenCheckpoint, remove_orphans
from gram_ray.train.console import put_record, step_record
from gram_ray.train.datasets import REST, train_iter_options
from gram_ray.train.events import NOTE, RESTARTED
from gram_ray.train.guards import preemption_notices, step_watchdog
from gram_ray.train.loop import run_training
from gram_ray.train.resume import ResumePlan

__all__ = ["WorkerArgs", "plan_of", "storage_failures_named", "train_loop_per_worker"]


@dataclass(frozen=True)
class WorkerArgs:
    """What build_trainer hands every worker of the group. Ray Train passes a dict (train_loop_config): the
    driver gives as_config(), the worker reads from_config(), and nothing in between reads keys."""

    cfg: dict  # the GramConfig, as JSON (model_dump)
    vocab: list[str] | None  # the word vocabulary of a randomly initialised text encoder, else None
    train_rows: int  # clips of the train split
    file_rows: dict[str, int] | None  # the train cache's {file: rows}, the epoch's progress is kept by (None: ids)
    output_dir: str  # the run's local output folder (metrics.jsonl, W&B's files)
    caches: dict[str, str]  # {split: its cache folder or URI}, named when a read of it fails
    resume: ResumePlan  # where each (re)started group continues from
    progress: object = None  # a ray.util.queue.Queue of progress records for the driver, or None
    source: str = ""  # a label for progress lines (a sweep's trial)
    tracking: dict | None = None  # tracking_options(): W&B's mode, run id and credentials, where to sync logs
    beacon: object = None  # a guards.StepBeacon: every rank's phase, for the step watchdogs; None: off
    test_hang: str | None = None  # tests only (GRAM_RAY_TEST_HANG="step:rank"): that rank hangs after that step

    def as_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: handles and refs stay as they are

    @classmethod
    def from_config(cls, config: dict) -> WorkerArgs:
        return cls(**config)

    def gram_config(self) -> GramConfig:
        return GramConfig.model_validate(self.cfg)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: config is WorkerArgs.as_config()."""
    import ray.data
    import ray.train
    import ray.train.torch

    args = WorkerArgs.from_config(config)
    cfg = args.gram_config()
    remove_orphans()  # checkpoint folders that workers killed on this node mid-upload left behind
    storage.configure(
        storage.StorageSettings.of(cfg.storage)
    )  # this worker's own reads and writes (a node's environment may differ)
    ray.data.DataContext.get_current().enable_progress_bars = False  # workers write to logs, not terminals
    _quiet_ray_train_reports()
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # The step's clips are the same at every world size an elastic group runs at: a smaller group accumulates.
    plan = plan_of(cfg, world)
    resume = _starting_state(args, rank, world)
    val = _optional_shard("val")
    tracker = _tracker(cfg, args, rank, resumed=resume is not None)
    reports = _Reports(args, cfg, tracker, world)
    watchdog = step_watchdog(args, cfg, rank, tracker)
    notices = preemption_notices(args, cfg, tracker, watchdog, rank, fresh=resume is None)
    try:
        run_training(
            cfg,
            train_batches=_train_batches(args, cfg, rank, plan, resume),
            val_batches=_val_batches(args, cfg, val, rank, world) if val is not None else None,
            steps_per_epoch=args.train_rows // (plan.micro_batch * world),
            grad_accum=plan.grad_accum,
            report=reports.report,
            vocab=args.vocab,
            resume=resume,
            device=device,
            prepare_model=_preparer(cfg, device),
            log=reports.log,
            notices=notices,
            watchdog=watchdog,
            file_rows=args.file_rows,
        )
    finally:
        if watchdog is not None:
            watchdog.stop()
        tracker.finish()


def _starting_state(args: WorkerArgs, rank: int, world: int) -> dict | None:
    """The checkpoint state this group continues from, or None (afresh): the one Ray Train handed it when that is a
    restart of this fit (a failure, scaling.max_failures, or an elastic resize), else the plan's start."""
    import ray.train

    handed = ray.train.get_checkpoint()
    folder, restart = args.resume.continues_from(handed.path if handed is not None else None)
    if folder is None:
        return None
    if not restart:
        return load_checkpoint(folder)
    with handed.as_directory() as d:
        state = load_checkpoint(d)
    if rank == 0:
        note = _restart_note(state, world)
        print(note, flush=True)
        if args.progress is not None:
            record = {"kind": NOTE, "event": RESTARTED, "step": state["step"], "text": note, "source": args.source}
            put_record(args.progress, record)
    return state


def _train_batches(args: WorkerArgs, cfg: GramConfig, rank: int, plan: WorldPlan, resume: dict | None):
    """run_training's train_batches: this worker's shard of an epoch; for the epoch a mid-epoch checkpoint was
    taken in, its shard of the rest of that epoch (the driver already left out the clips trained on before).
    Nothing is read before the model is built: a first batch fetched meanwhile, on a thread of its own, raced the
    model's first imports of transformers with the collate's tokenizer ("cannot import name 'AutoTokenizer'" in
    make test-cluster), for little gain on 2 cores."""
    import ray.train

    train, rest = ray.train.get_dataset_shard("train"), _optional_shard(REST)
    resumed_epoch = resume["epoch"] if resume is not None and not resume.get("epoch_complete", True) else None

    def batches(epoch: int, skip_ids: frozenset):
        shard = train
        if skip_ids:
            if rest is not None and epoch == resumed_epoch:
                shard = rest
            else:
                logging.getLogger("gram_ray").warning(
                    "epoch %d restarts from its beginning: this restart has no rest-of-epoch dataset", epoch
                )
        batches = shard.iter_torch_batches(**train_iter_options(cfg, args.vocab, epoch, rank, plan.micro_batch))
        return storage_failures_named(batches, "train", args.caches.get("train", "train"))

    return batches


def _val_batches(args: WorkerArgs, cfg: GramConfig, val, rank: int, world: int):
    """run_training's val_batches. The val split is not sharded (sharding drops rows to equalise shards); each
    rank embeds every world-th batch, and the embeddings are gathered exactly. A rank keeps its collated share in
    memory after the first pass: re-reading through Ray Data every evaluation costs seconds of fixed overhead."""
    kept: list[dict] = []

    def batches():
        if not kept:
            collate = Collate(cfg, args.vocab, train=False)
            read = val.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="numpy")
            read = storage_failures_named(read, "val", args.caches.get("val", "val"))
            kept.extend(collate(b) for i, b in enumerate(read) if i % world == rank)
        return kept

    return batches


class _Reports:
    """run_training's log and report on a worker: step metrics to the tracker (rank 0) and the driver's progress
    queue; every report to Ray Train with where each rank runs (so result.json has the run's world over time)."""

    def __init__(self, args: WorkerArgs, cfg: GramConfig, tracker, world: int) -> None:
        self.args, self.epochs, self.tracker, self.world = args, cfg.train.epochs, tracker, world
        self.background = cfg.train.checkpoint_in_background
        self.where = {"world/size": world, "world/nodes": ",".join(_worker_nodes(world))}

    def log(self, metrics: dict) -> None:
        self.tracker.log(metrics)
        if self.args.progress is not None and "train/loss" in metrics and "val_eval" not in metrics:
            record = step_record(metrics, self.epochs) | {"workers": self.world, "source": self.args.source}
            put_record(self.args.progress, record)

    def report(self, metrics: dict, checkpoint: TakenCheckpoint | None) -> bool:
        """run_training's report: every rank reports; rank 0's checkpoint is written and uploaded by Ray Train's
        upload thread (train.checkpoint_in_background; True: the loop waits for it before the next one), else
        on this thread. Ray Train registers it once the upload returns: whole, its manifest last."""
        import ray.train

        metrics = dict(metrics) | self.where
        if checkpoint is None:
            ray.train.report(metrics)
            return False
        background, modes = self.background, ray.train.CheckpointUploadMode
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint.folder)),
            checkpoint_upload_mode=modes.ASYNC if background else modes.SYNC,
            delete_local_checkpoint_after_upload=False,  # store() removes its folder itself, once uploaded or failed
            checkpoint_upload_fn=lambda _, dir_name: checkpoint.store(functools.partial(_upload_checkpoint, dir_name)),
        )
        self.tracker.sync()  # the logs so far join the checkpoint on the run's storage
        return background


def _tracker(cfg: GramConfig, args: WorkerArgs, rank: int, resumed: bool):
    """This worker's Tracker (recording on rank 0 only) from the driver's tracking_options."""
    import ray

    from gram_ray.tracking import Tracker

    tracking = args.tracking or {}
    credentials = None
    if rank == 0 and tracking.get("credentials") is not None:
        credentials = ray.get(tracking["credentials"])  # W&B's key, by reference: never in this config's values
    return Tracker(
        cfg,
        Path(args.output_dir),
        enabled=rank == 0,
        resume=resumed,
        run_id=tracking.get("run_id"),
        credentials=credentials,
        sync_to=tracking.get("sync_to"),
        mode=tracking.get("wandb_mode"),
    )


def plan_of(cfg: GramConfig, workers: int) -> WorldPlan:
    """The config's step laid out over `workers` workers (the configured layout itself at the full size)."""
    return plan_for_world(cfg.step_clips, cfg.worker_batch, workers)


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (collective: every rank calls it)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _optional_shard(name: str):
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:  # not passed to this run's trainer
        return None


def _restart_note(resume: dict, world: int) -> str:
    where = "mid-epoch, with the rest of its clips" if not resume.get("epoch_complete", True) else "its end"
    was = resume.get("world_size")
    size = f" with {world} worker" + ("s" if world > 1 else "") + (f" (was {was})" if was and was != world else "")
    return (
        f"the worker group restarted{size} from the checkpoint of step {resume['step']} (epoch "
        f"{resume['epoch'] + 1}, {where}): the steps after it are trained again"
    )


def _upload_checkpoint(dir_name: str, folder: Path):
    """A checkpoint folder into the run's storage as Ray Train's checkpoint `dir_name`, file by file with the storage
    settings' retries (an outage shorter than storage.outage_s delays it, no more) and its manifest last, in place
    of Ray's one copy_files with pyarrow's attempts alone. Ray Train registers what this returns."""
    import ray.train

    context = ray.train.get_context().get_storage()
    fs, dest = context.storage_filesystem, context.build_checkpoint_path_from_name(dir_name)
    inner = storage.unwrapped(fs)
    target = f"{inner.type_name}://{dest}" if inner.type_name != "local" else dest  # for messages: s3://bucket/...
    upload_checkpoint(folder, inner, dest, target=target)
    return ray.train.Checkpoint(filesystem=fs, path=dest)  # Ray Train's own filesystem: a checkpoint it manages


def storage_failures_named(batches: Iterable, split: str, cache: str) -> Iterator:
    """batches of a Ray Dataset over a cache, with a storage failure in its reads (past Ray Data's own retries)
    raised as the StorageError that names the object, not Ray's wrapped traceback."""
    try:
        yield from batches
    except Exception as e:
        failure = storage.failure_in(e, f"reading the {split} cache", cache)
        if failure is None:
            raise
        raise failure from e


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every ray.train.report at INFO with all its metrics (here: ~100 keys and the evaluation
    JSON), which buries the job's own output; its logger is named by file path."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module logs differently: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _preparer(cfg: GramConfig, device):
    """How a worker wraps its model: DDP through Ray Train, or FSDP2 over the worker group (train/sharding.py)."""
    import ray.train.torch

    if cfg.scaling.strategy == "fsdp":
        from gram_ray.train.sharding import shard_model

        return lambda model: shard_model(model, cfg, device)
    return ray.train.torch.prepare_model
