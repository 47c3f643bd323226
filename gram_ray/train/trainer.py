"""TorchTrainer assembly: data caches -> Ray Datasets -> TorchTrainer(train_loop_per_worker) -> Result.

The driver prepares everything that must be decided once (the Parquet caches, the word vocabulary of a
randomly initialised text encoder, steps per epoch, the shuffle) and hands it to the workers in
train_loop_config; each worker runs the Ray-free loop (loop.py) over its shard of the train split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from gram_ray import storage
from gram_ray.config import GramConfig, save_config
from gram_ray.config.world import WorldPlan, plan_for_world
from gram_ray.data.collate import Collate
from gram_ray.data.manifest import read_annotations, resolve_media
from gram_ray.data.packed import PACKED
from gram_ray.data.parquet_layout import read_cache
from gram_ray.data.preprocess import REPORT, SHARDS, build_dataset, preprocess
from gram_ray.data.schema import CAPTIONS, ID
from gram_ray.data.text import build_word_vocab
from gram_ray.model.checkpoint import load_checkpoint, upload_checkpoint
from gram_ray.storage.uploads import abort_orphans_of_a_dead_run, now
from gram_ray.tracking import wandb_run_id
from gram_ray.train.console import (
    NOTE,
    RESTARTED,
    Console,
    ProgressQueue,
    progress_callback,
    put_record,
    resize_callback,
    run_with_progress,
    step_record,
)
from gram_ray.train.layout import RunLayout
from gram_ray.train.loop import main_metric_name, run_training
from gram_ray.train.resume import latest_checkpoint, latest_registered, position

__all__ = [
    "TrainingData",
    "RayCollate",
    "SPLITS",
    "split_inputs",
    "decode_split",
    "decode_caches",
    "prepare_data",
    "keep_in_memory",
    "shuffled",
    "rest_of_epoch",
    "train_iter_options",
    "train_loop_per_worker",
    "build_trainer",
    "train_env",
    "tracking_options",
    "fit",
]

REST = "train_rest"  # the rest of the epoch a mid-epoch checkpoint was taken in


@dataclass
class TrainingData:
    train: object  # ray.data.Dataset
    val: object | None
    train_rows: int
    vocab: list[str] | None
    # The train cache's shards when the split streams from storage every epoch (not kept in the object store):
    # each epoch's order is then a shuffle of the files at read time, which streams, where a shuffle of the block
    # order would first read the whole split into the object store (and spill it, for a cache larger than it).
    train_shards: str | None = None


class RayCollate(Collate, NumpyBatchCollateFn):
    """Collate in the class form Ray Data (>= 2.47) expects for iter_torch_batches(collate_fn=...)."""


def _require(value: str | None, key: str) -> str:
    if not value:
        raise ValueError(f"{key} is not set: give it in the config or with --set {key}=...")
    return value


SPLITS = ("train", "val")


def split_inputs(cfg: GramConfig, split: str) -> tuple[str | None, object, str]:
    """(annotations, the data settings, the decode mode) a split is decoded with: what training decodes into its
    cache, and what `gram-ray preprocess --config C --split S` decodes into the same cache (same inputs and
    settings, so training finds it complete and decodes nothing)."""
    d = cfg.data
    if split == "train":
        return d.train_annotations, d, "train"
    val = d.model_copy(deep=True)
    val.video.num_frames = d.video.eval_num_frames or d.video.num_frames
    val.source = d.val_source or d.source
    return d.val_annotations, val, "eval"


def decode_split(cfg: GramConfig, split: str, out: str, log=print, force: bool = False) -> dict:
    """Decode (or reuse) one split's Parquet cache at `out`; returns its report. Training and `gram-ray preprocess
    --split` both decode through here, so each finds the other's cache."""
    annotations, data, mode = split_inputs(cfg, split)
    annotations = _require(annotations, f"data.{split}_annotations")
    options = _split_options(cfg, data.source, log)
    return preprocess(annotations, cfg.data.video_dir, out, data, mode=mode, force=force, **options)


def decode_caches(cfg: GramConfig, layout: RunLayout, log=print) -> int | None:
    """Decode (or reuse) the Parquet caches of the train and val splits; returns the train rows written
    (None when the train split is decoded on the fly instead)."""
    d = cfg.data
    train_rows = None
    if not d.decode_on_the_fly:
        train_rows = decode_split(cfg, "train", layout.cache("train"), log)["rows_written"]
    if d.val_annotations:
        decode_split(cfg, "val", layout.cache("val"), log)
    return train_rows


def _split_options(cfg: GramConfig, source, log) -> dict:
    # A packed source's samples are read only by the decode tasks: whether to keep subtitles is the model's call.
    subtitles = "subtitle" in cfg.model.modalities if source.kind in PACKED else None
    return {"audio_dir": cfg.data.audio_dir, "log": log, "subtitles": subtitles}


def _train_captions(cfg: GramConfig, layout: RunLayout) -> list[str]:
    """Every caption of the train split, for a word vocabulary: from the manifest, or from the cache of a packed
    source (whose captions only the decode tasks read)."""
    d = cfg.data
    if d.source.kind not in PACKED:
        rows = read_annotations(d.train_annotations, d.source.fields, d.max_failure_share)
        return [c for r in rows for c in r.captions]
    table = storage.read_table(storage.join(layout.cache("train"), SHARDS), columns=[CAPTIONS])
    return [c for captions in table.column(CAPTIONS).to_pylist() for c in captions]


def prepare_data(cfg: GramConfig, layout: RunLayout, log=print) -> TrainingData:
    """The caches (decoded or reused), opened as Ray Datasets; the vocabulary if the text encoder needs one."""
    d = cfg.data
    train_ann = _require(d.train_annotations, "data.train_annotations")
    train_rows = decode_caches(cfg, layout, log)
    train_shards = None
    if train_rows is None:
        rows = read_annotations(train_ann, d.source.fields, d.max_failure_share)
        resolve_media(rows, d.video_dir, d.audio_dir, d.video.format)
        train = build_dataset(rows, d, mode="train")  # re-decoded, with new random frames, every epoch
        train_rows = len(rows)
    else:
        shards = storage.join(layout.cache("train"), SHARDS)
        train, kept = _maybe_materialize(read_cache(shards), shards, cfg, log)
        train_shards = None if kept else shards
    val = None
    if d.val_annotations:
        shards = storage.join(layout.cache("val"), SHARDS)
        val, _ = _maybe_materialize(read_cache(shards), shards, cfg, log)
    vocab = None
    if not (cfg.model.tokenizer or cfg.model.text.pretrained):
        vocab = build_word_vocab(_train_captions(cfg, layout))
    return TrainingData(train, val, train_rows, vocab, train_shards)


def _maybe_materialize(ds, shards: str, cfg: GramConfig, log):
    """Re-reading Parquet through Ray Data costs seconds of fixed overhead per epoch (measured: 5.5-8 s for 848
    clips on 2 cores, against 0.1-0.3 s for a materialized dataset), so small caches are kept in memory. Returns
    (dataset, kept in memory)."""
    import ray

    mode = cfg.data.materialize
    size = storage.total_bytes(shards, ".parquet")
    budget = ray.cluster_resources().get("object_store_memory", 0) / 4
    if mode == "always" or (mode == "auto" and size < budget):
        log(f"keeping {shards} ({size / 2**20:.0f} MiB) in Ray's object store for every epoch")
        return keep_in_memory(ds, cfg), True
    log(f"streaming {shards} ({size / 2**20:.0f} MiB) from storage every epoch")
    return ds, False


def keep_in_memory(ds, cfg: GramConfig):
    """The dataset materialized in the object store, in blocks of one batch: randomising the block order then
    mixes the split (a 32 MB Parquet file would otherwise be one block of hundreds of small clips)."""
    return ds.repartition(target_num_rows_per_block=cfg.worker_batch).materialize()


def _seed(*parts: int) -> int:
    return zlib.crc32(json.dumps(parts).encode())


def shuffled(ds, cfg: GramConfig, start_epoch: int):
    """The train split with a new order every epoch. Ray Data reseeds these operators on every execution (one
    per epoch) from a base seed; the base includes the epoch a run starts at, so a resumed run does not replay
    the orders of the epochs it already did."""
    from ray.data import RandomSeedConfig

    seed = RandomSeedConfig(seed=_seed(cfg.train.seed, start_epoch), reseed_after_execution=True)
    if cfg.train.shuffle == "full":
        return ds.random_shuffle(seed=seed)
    if cfg.train.shuffle == "blocks":
        return ds.randomize_block_order(seed=seed)
    return ds


def streamed(shards: str, cfg: GramConfig, start_epoch: int, consumed_ids: list[str] | None = None):
    """The train split read from its files every epoch (a cache larger than the object store), the clips of
    consumed_ids left out. shuffle: blocks shuffles the files' order at read time, anew every epoch (seeded as
    shuffled() is), and each worker's local buffer mixes within them: both stream, where randomising the block
    order would read the whole split into the object store first. full: Ray Data's random_shuffle, which moves
    the whole split through the object store (spilling what does not fit) every epoch."""
    blocks = cfg.train.shuffle == "blocks"
    ds = read_cache(shards, shuffle_seed=_seed(cfg.train.seed, start_epoch) if blocks else None, block_per_file=True)
    if consumed_ids:
        ds = rest_of_epoch(ds, consumed_ids)
    return shuffled(ds, cfg, start_epoch) if cfg.train.shuffle == "full" else ds


def _drop_ids(batch: pa.Table, ids: list[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch[ID], value_set=pa.array(ids, pa.string()))))


def rest_of_epoch(ds, consumed_ids: list[str]):
    """The train split without the clips a mid-epoch checkpoint says were already trained on."""
    return ds.map_batches(_drop_ids, fn_kwargs={"ids": consumed_ids}, batch_format="pyarrow", zero_copy_batch=True)


class EpochSplits:
    """The train split's datasets for a worker group, built when Ray Train (re)starts it: "train" (every epoch
    from the one training goes on with, each in a new order) and REST (the rest of an epoch a mid-epoch checkpoint
    was taken in; empty otherwise). Ray Train V2 calls dataset callables at every worker-group start, so a group
    restarted after a worker failure (scaling.max_failures) gets the datasets of the checkpoint it resumes from:
    the run's latest registered checkpoint if this fit registered it, else where the fit started (start: the
    position of --resume's checkpoint, or None). No clip of that epoch is trained on twice or left out."""

    def __init__(
        self, base, cfg: GramConfig, run_root: str, start: dict | None, restored: str | None, shards: str | None = None
    ) -> None:
        self.base, self.cfg, self.run_root, self.start, self.restored = base, cfg, run_root, start, restored
        self.shards = shards  # the split streams from these files every epoch (TrainingData.train_shards)

    def position(self) -> dict | None:
        latest = latest_registered(self.run_root)
        if latest is not None and (self.restored is None or Path(latest).name != Path(self.restored).name):
            return position(latest)  # registered by this fit: a restart after a failure
        return self.start

    def train(self):
        p = self.position()
        first = 0 if p is None else p["epoch"] + 1  # a mid-epoch start's own epoch comes from rest()
        if self.shards is not None:
            return streamed(self.shards, self.cfg, first)
        return shuffled(self.base, self.cfg, first)

    def rest(self):
        p = self.position()
        if p is None or p.get("epoch_complete", True):
            return self.base.limit(0)
        if self.shards is not None:
            return streamed(self.shards, self.cfg, p["epoch"], p["consumed_ids"])
        return shuffled(rest_of_epoch(self.base, p["consumed_ids"]), self.cfg, p["epoch"])


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every ray.train.report at INFO with all its metrics (here: ~100 keys and the evaluation
    JSON), which buries the job's own output; its logger is named by file path."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module logs differently: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_iter_options(
    cfg: GramConfig, vocab: list[str] | None, epoch: int, rank: int, batch_size: int | None = None
) -> dict:
    """iter_torch_batches arguments of a worker's train shard in an epoch (batch_size: the world plan's
    micro-batch, default train.batch_size)."""
    shuffle = cfg.train.shuffle == "blocks"
    return {
        "batch_size": batch_size or cfg.worker_batch,
        "collate_fn": RayCollate(cfg, vocab, train=True, epoch=epoch),
        "drop_last": True,  # equal steps on every rank, so the gathers in the loss always pair up
        "prefetch_batches": cfg.train.prefetch_batches,
        "local_shuffle_buffer_size": cfg.train.shuffle_buffer if shuffle else None,
        "local_shuffle_seed": _seed(cfg.train.seed, epoch, rank) if shuffle else None,
    }


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


def _upload_checkpoint(checkpoint, dir_name: str):
    """Ray Train's checkpoint_upload_fn: the checkpoint folder into the run's storage, file by file with the storage
    settings' retries (an outage shorter than storage.outage_s delays the run, no more) and its manifest last, in
    place of Ray's one copy_files with pyarrow's attempts alone. Ray Train registers it once this returns."""
    import ray.train

    context = ray.train.get_context().get_storage()
    fs, dest = context.storage_filesystem, context.build_checkpoint_path_from_name(dir_name)
    inner = storage.unwrapped(fs)
    target = f"{inner.type_name}://{dest}" if inner.type_name != "local" else dest  # for messages: s3://bucket/...
    upload_checkpoint(Path(checkpoint.path), inner, dest, target=target)
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: config = {"cfg": GramConfig as a dict, "vocab": [...] | None, "train_rows": int
    (clips of the train split), "output_dir": str, "caches": {split: its cache folder or URI}, "progress": a
    ray.util.queue.Queue or None, "source": a label for progress lines, "resume_from": a checkpoint folder or URI
    to start from, or None, "restored": the run's latest checkpoint when the fit started (Train V2 hands it to the
    first workers), or None, "tracking": tracking_options() or None}."""
    import ray.data
    import ray.train
    import ray.train.torch

    cfg = GramConfig.model_validate(config["cfg"])
    # This worker's own reads and writes (a node's environment may differ).
    storage.configure(storage.StorageSettings.of(cfg.storage))
    vocab = config.get("vocab")
    ray.data.DataContext.get_current().enable_progress_bars = False  # workers write to logs, not terminals
    _quiet_ray_train_reports()
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # The step's clips are the same at every world size an elastic group runs at: a smaller group accumulates.
    plan = plan_of(cfg, world)
    train_shard = ray.train.get_dataset_shard("train")
    rest_shard = _optional_shard(REST)
    val_data = _optional_shard("val")

    # A restart of the worker group (FailureConfig) gets this run's latest checkpoint from Ray Train; otherwise a
    # run may start from a checkpoint the user named (--resume), which Train V2 leaves to the train function.
    # Train V2 also hands a fresh fit the latest checkpoint registered under this run's name ("restored"): then the
    # checkpoint the driver chose (--resume PATH or auto) wins, since the datasets were built for it.
    resume = None
    checkpoint = ray.train.get_checkpoint()
    restored = config.get("restored")
    own = checkpoint is not None and not (restored and Path(checkpoint.path).name == Path(restored).name)
    if own or (checkpoint is not None and not config.get("resume_from")):
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(d)
        if rank == 0 and own:  # after a failure (scaling.max_failures), or an elastic group's resize
            note = _restart_note(resume, world)
            print(note, flush=True)
            if config.get("progress") is not None:
                record = {"kind": NOTE, "event": RESTARTED, "step": resume["step"], "text": note}
                put_record(config["progress"], record | {"source": config.get("source", "")})
    elif config.get("resume_from"):
        resume = load_checkpoint(config["resume_from"])
    resume_epoch = resume["epoch"] if resume is not None and not resume.get("epoch_complete", True) else None

    def train_batches(epoch: int, skip_ids: frozenset):
        shard = train_shard
        if skip_ids:
            if rest_shard is not None and epoch == resume_epoch:
                shard = rest_shard  # the driver already left out the clips trained on before the checkpoint
            else:
                logging.getLogger("gram_ray").warning(
                    "epoch %d restarts from its beginning: this restart has no rest-of-epoch dataset", epoch
                )
        batches = shard.iter_torch_batches(**train_iter_options(cfg, vocab, epoch, rank, plan.micro_batch))
        return storage_failures_named(batches, "train", config.get("caches", {}).get("train", "train"))

    val_cache: list[dict] = []

    def val_batches():
        # The val split is not sharded (sharding drops rows to equalise shards); each rank embeds every
        # world-th batch, and the embeddings are gathered exactly. A rank keeps its collated share in memory
        # after the first pass: re-reading through Ray Data every evaluation costs seconds of fixed overhead.
        if not val_cache:
            collate = Collate(cfg, vocab, train=False)
            batches = val_data.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="numpy")
            batches = storage_failures_named(batches, "val", config.get("caches", {}).get("val", "val"))
            val_cache.extend(collate(b) for i, b in enumerate(batches) if i % world == rank)
        return val_cache

    tracker = _tracker(cfg, config, rank, resumed=resume is not None)
    progress = config.get("progress")

    def log(metrics: dict) -> None:
        tracker.log(metrics)
        if progress is not None and "train/loss" in metrics and "val_eval" not in metrics:
            record = step_record(metrics, cfg.train.epochs) | {"workers": world, "source": config.get("source", "")}
            put_record(progress, record)

    # Where each rank runs, in every report (and so in result.json): a run's world over time, node by node.
    where = {"world/size": world, "world/nodes": ",".join(_worker_nodes(world))}

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(dict(metrics) | where, checkpoint=ckpt, checkpoint_upload_fn=_upload_checkpoint)
        if checkpoint_dir is not None:  # rank 0: the logs so far join the checkpoint on the run's storage
            tracker.sync()

    try:
        run_training(
            cfg,
            train_batches=train_batches,
            val_batches=val_batches if val_data is not None else None,
            steps_per_epoch=config["train_rows"] // (plan.micro_batch * world),
            grad_accum=plan.grad_accum,
            report=report,
            vocab=vocab,
            resume=resume,
            device=device,
            prepare_model=_preparer(cfg, device),
            log=log,
        )
    finally:
        tracker.finish()


def _tracker(cfg: GramConfig, config: dict, rank: int, resumed: bool):
    """This worker's Tracker (recording on rank 0 only) from the driver's tracking_options."""
    import ray

    from gram_ray.tracking import Tracker

    tracking = config.get("tracking") or {}
    credentials = None
    if rank == 0 and tracking.get("credentials") is not None:
        credentials = ray.get(tracking["credentials"])  # W&B's key, by reference: never in this config's values
    return Tracker(
        cfg,
        Path(config["output_dir"]),
        enabled=rank == 0,
        resume=resumed,
        run_id=tracking.get("run_id"),
        credentials=credentials,
        sync_to=tracking.get("sync_to"),
        mode=tracking.get("wandb_mode"),
    )


def _preparer(cfg: GramConfig, device):
    """How a worker wraps its model: DDP through Ray Train, or FSDP2 over the worker group (train/sharding.py)."""
    import ray.train.torch

    if cfg.scaling.strategy == "fsdp":
        from gram_ray.train.sharding import shard_model

        return lambda model: shard_model(model, cfg, device)
    return ray.train.torch.prepare_model


def build_trainer(
    cfg: GramConfig,
    data: TrainingData,
    layout: RunLayout,
    resume_from: str | None = None,
    callbacks: list | None = None,
    restored: str | None = None,
    progress=None,
    source: str = "",
    tracking: dict | None = None,
):
    """tracking: {"run_id": the W&B run id, "credentials": an ObjectRef of tracking.wandb_credentials(), "sync_to":
    where rank 0 copies its logs} (tracking_options)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    per_step = cfg.step_clips
    if data.train_rows < per_step:
        raise ValueError(
            f"{data.train_rows} training clips cannot fill one step of {cfg.worker_batch} per worker x "
            f"{s.max_workers} workers x {cfg.train.grad_accum} accumulated; lower train.batch_size, "
            "train.grad_accum or scaling.num_workers"
        )
    start = None
    if resume_from:
        resume_from = storage.absolute(resume_from)  # a folder or a URI every worker can read
        start = position(resume_from)
    splits = EpochSplits(data.train, cfg, layout.run_root, start, restored, data.train_shards)
    datasets = {"train": splits.train, REST: splits.rest}  # called at every worker-group (re)start
    if data.val is not None:
        datasets["val"] = data.val
    if progress is not None:
        callbacks = [*(callbacks or []), progress_callback(progress, main_metric_name(cfg), cfg.train.epochs, source)]
        if s.elastic:
            callbacks.append(resize_callback(progress, source))
    return TorchTrainer(
        train_loop_per_worker,
        datasets=datasets,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "vocab": data.vocab,
            "train_rows": data.train_rows,
            "output_dir": str(layout.output_dir),
            "caches": {split: layout.cache(split) for split in ("train", "val")},
            "progress": progress,
            "source": source,
            "resume_from": resume_from,
            "restored": restored,
            "tracking": tracking,
        },
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


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train hands it from the driver to its controller
ELASTIC_START_TIMEOUT_S = 15.0


@contextlib.contextmanager
def train_env(cfg: GramConfig):
    """The environment Ray Train's controller reads, around a fit: the worker group's start timeout
    (scaling.start_timeout_s), unless the user set the variable. Restored afterwards (Tune runs several fits in
    one process)."""
    s = cfg.scaling
    timeout = s.start_timeout_s or (ELASTIC_START_TIMEOUT_S if s.elastic else None)
    if timeout is None or START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = str(timeout)
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


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


def fit(
    cfg: GramConfig, output_dir: str | Path, resume_from: str | None = None, log=print, console: Console | None = None
):
    """Prepare data, train with TorchTrainer, write <output>/result.json; returns (Ray Train Result, summary).
    With a console, progress lines are printed while it trains."""
    started = now()
    layout = RunLayout.of(cfg, output_dir)
    layout.output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, layout.output_dir / "config.yaml")
    existing = latest_checkpoint(layout.run_root, log=log)  # Train V2 continues a run of the same name
    if resume_from == "auto":
        if existing is None:
            log(f"--resume auto: no checkpoint of run {cfg.run.name!r} in {layout.run_root} yet: starting afresh")
        else:
            log(f"--resume auto: continuing from {existing}")
        resume_from = existing
    elif resume_from is None and existing is not None:
        raise ValueError(
            f"{layout.run_root} already holds checkpoints of a run named {cfg.run.name!r} (latest: {existing}). "
            "--resume auto continues it; to start afresh, give another --out or run.name, or delete that folder."
        )
    if resume_from is not None:  # the run it continues died: what it was uploading will never complete
        abort_orphans_of_a_dead_run(layout.run_root, started, log=log)
    data = prepare_data(cfg, layout, log=log)
    s, epochs = cfg.scaling, cfg.train.epochs
    if s.elastic:
        sizes = "; ".join(plan_of(cfg, w).describe() for w in range(s.max_workers, s.min_workers - 1, -1))
        workers = f"{s.min_workers} to {s.max_workers} workers (elastic: {sizes})"
    else:
        workers = f"{s.num_workers} workers"
    log(f"training on {data.train_rows} clips with {workers} for {epochs:g} epochs ...")
    progress = ProgressQueue() if console is not None else None
    tracking = tracking_options(cfg, layout, run_id=lambda: wandb_run_id(layout.run_root, resume_from is not None))
    trainer = build_trainer(cfg, data, layout, resume_from, progress=progress, restored=existing, tracking=tracking)
    with train_env(cfg):
        result = run_with_progress(trainer.fit, progress, console) if console is not None else trainer.fit()
    metric = main_metric_name(cfg)
    # best_checkpoints holds the kept checkpoints in the order they were reported, not by score.
    kept = result.best_checkpoints or [(result.checkpoint, result.metrics)]
    best = max(kept, key=lambda pair: pair[1].get(metric, float("-inf")))
    summary = {
        # Ray gives a checkpoint's path inside its filesystem (bucket/key, no scheme): the run's URI is what
        # evaluate, --resume and model.init_from take.
        "checkpoint": storage.join(layout.run_root, posixpath.basename(best[0].path)) if best[0] else None,
        "best_metrics": {k: v for k, v in best[1].items() if k != "val_eval"},
        "best_eval": json.loads(best[1]["val_eval"]) if "val_eval" in best[1] else None,
        "last_metrics": {k: v for k, v in (result.metrics or {}).items() if k != "val_eval"},
        "train_cache_report": storage.join(layout.cache("train"), REPORT),
        # Each restart of the worker group (a worker or its node lost): steps lost and time to recover.
        "recoveries": console.recoveries if console is not None else [],
        # The worker group's size over the run: from which step (and second of the run) it trained at each size.
        "world_sizes": console.world_sizes.get("", []) if console is not None else [],
    }
    layout.write_result("result.json", json.dumps(summary, indent=2))
    _fetch_metrics(layout)
    if layout.shared:
        layout.write_result("config.yaml", (layout.output_dir / "config.yaml").read_text())
    return result, summary
