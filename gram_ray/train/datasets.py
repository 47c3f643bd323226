"""The data a training run reads: its splits decoded (or found) in their Parquet caches, opened as Ray Datasets,
with a new order every epoch, and, for a run that continues mid-epoch, the rest of that epoch.

The driver decides all of it once (the caches, the word vocabulary of a randomly initialised text encoder, the
shuffle); the workers read their shards of what it built (worker.py).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import pyarrow as pa
from ray.data.collate_fn import NumpyBatchCollateFn

from gram_ray import storage
from gram_ray.config import GramConfig
from gram_ray.data.clip_ids import id_array
from gram_ray.data.collate import Collate
from gram_ray.data.epoch_progress import EpochProgress, rest_of_epoch_filter
from gram_ray.data.manifest import read_annotations, resolve_media
from gram_ray.data.manifest_stream import read_in_pieces
from gram_ray.data.packed import PACKED
from gram_ray.data.parquet_layout import read_cache
from gram_ray.data.preprocess import SHARDS, build_dataset, preprocess
from gram_ray.data.schema import CAPTIONS
from gram_ray.data.text import build_word_vocab
from gram_ray.train.layout import RunLayout
from gram_ray.train.resume import ResumePlan, latest_registered, position
from gram_ray.train.state import resumed_progress

__all__ = [
    "REST",
    "TrainingData",
    "RayCollate",
    "SPLITS",
    "split_inputs",
    "decode_split",
    "decode_caches",
    "prepare_data",
    "keep_in_memory",
    "shuffled",
    "streamed",
    "rest_of_epoch",
    "shuffled_rest",
    "EpochSplits",
    "train_iter_options",
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
    # The train cache's {file: rows} (its report's file_rows): a mid-epoch checkpoint records the files trained on
    # whole by them (data/epoch_progress.py). None when decoded on the fly, or for a cache from before they were kept.
    file_rows: dict[str, int] | None = None


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


def decode_caches(cfg: GramConfig, layout: RunLayout, log=print) -> dict | None:
    """Decode (or reuse) the Parquet caches of the train and val splits; returns the train cache's report
    (None when the train split is decoded on the fly instead)."""
    d = cfg.data
    train = None
    if not d.decode_on_the_fly:
        train = decode_split(cfg, "train", layout.cache("train"), log)
    if d.val_annotations:
        decode_split(cfg, "val", layout.cache("val"), log)
    return train


def _split_options(cfg: GramConfig, source, log) -> dict:
    # A packed source's samples are read only by the decode tasks: whether to keep subtitles is the model's call.
    subtitles = "subtitle" in cfg.model.modalities if source.kind in PACKED else None
    return {"audio_dir": cfg.data.audio_dir, "log": log, "subtitles": subtitles}


def _train_captions(cfg: GramConfig, layout: RunLayout) -> list[str]:
    """Every caption of the train split, for a word vocabulary: from the manifest, or from the cache of a packed
    source or a large manifest (whose captions only the decode tasks read)."""
    d = cfg.data
    if d.source.kind not in PACKED and not read_in_pieces(d.train_annotations):
        rows = read_annotations(d.train_annotations, d.source.fields, d.max_failure_share)
        return [c for r in rows for c in r.captions]
    table = storage.read_table(storage.join(layout.cache("train"), SHARDS), columns=[CAPTIONS])
    return [c for captions in table.column(CAPTIONS).to_pylist() for c in captions]


def prepare_data(cfg: GramConfig, layout: RunLayout, log=print) -> TrainingData:
    """The caches (decoded or reused), opened as Ray Datasets; the vocabulary if the text encoder needs one."""
    d = cfg.data
    train_ann = _require(d.train_annotations, "data.train_annotations")
    train_report = decode_caches(cfg, layout, log)
    train_rows, train_shards, file_rows = None, None, None
    if train_report is None:
        rows = read_annotations(train_ann, d.source.fields, d.max_failure_share)
        resolve_media(rows, d.video_dir, d.audio_dir, d.video.format)
        train = build_dataset(rows, d, mode="train")  # re-decoded, with new random frames, every epoch
        train_rows = len(rows)
    else:
        shards = storage.join(layout.cache("train"), SHARDS)
        train, kept = _maybe_materialize(read_cache(shards, with_files=True), shards, cfg, log)
        train_shards = None if kept else shards
        train_rows, file_rows = train_report["rows_written"], train_report.get("file_rows")
    val = None
    if d.val_annotations:
        shards = storage.join(layout.cache("val"), SHARDS)
        val, _ = _maybe_materialize(read_cache(shards), shards, cfg, log)
    vocab = None
    if not (cfg.model.tokenizer or cfg.model.text.pretrained):
        vocab = build_word_vocab(_train_captions(cfg, layout))
    return TrainingData(train, val, train_rows, vocab, train_shards, file_rows)


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


def streamed(shards: str, cfg: GramConfig, start_epoch: int, rest: EpochProgress | None = None):
    """The train split read from its files every epoch (a cache larger than the object store); `rest`: only the
    clips of a mid-epoch checkpoint's epoch not yet trained on (the files trained on whole are not even read).
    shuffle: blocks shuffles the files' order at read time, anew every epoch (seeded as shuffled() is), and each
    worker's local buffer mixes within them: both stream, where randomising the block order would read the whole
    split into the object store first. full: Ray Data's random_shuffle, which moves the whole split through the
    object store (spilling what does not fit) every epoch."""
    blocks = cfg.train.shuffle == "blocks"
    seed = _seed(cfg.train.seed, start_epoch) if blocks else None
    files = None
    if rest is not None and rest.done and rest.file_rows is not None:
        files = sorted(name for name in rest.file_rows if name not in rest.done)
    ds = read_cache(shards, shuffle_seed=seed, block_per_file=True, with_files=True, files=files or None)
    if files == []:  # every file trained on whole: nothing is left of the epoch
        return ds.limit(0)
    if rest:
        ds = rest_of_epoch(ds, rest)
    return shuffled(ds, cfg, start_epoch) if cfg.train.shuffle == "full" else ds


def rest_of_epoch(ds, rest: EpochProgress):
    """The train split without the clips a mid-epoch checkpoint says were already trained on (the files trained on
    whole, the ids of the others), block by block (data/epoch_progress.py: a function whose module a cold task
    worker imports in a fraction of a second)."""
    done = pa.array(sorted(rest.done), pa.string())
    kwargs = {"done": done, "ids": id_array(rest.ids())}
    return ds.map_batches(rest_of_epoch_filter, fn_kwargs=kwargs, batch_format="pyarrow", zero_copy_batch=True)


def shuffled_rest(ds, cfg: GramConfig, epoch: int, rest: EpochProgress):
    """The rest of an epoch of a split kept in memory, in that epoch's new order. The block order is drawn first
    and the clips already trained on are left out behind it: behind the filter, the block shuffle (all-to-all)
    would hold the first batch until every block was filtered, and after a restart the filter's tasks run one or
    two at a time beside the training worker. A full shuffle takes only the clips left."""
    if cfg.train.shuffle == "full":
        return shuffled(rest_of_epoch(ds, rest), cfg, epoch)
    return rest_of_epoch(shuffled(ds, cfg, epoch), rest)


class EpochSplits:
    """The train split's datasets for a worker group, built when Ray Train (re)starts it: "train" (every epoch
    from the one training goes on with, each in a new order) and REST (the rest of an epoch a mid-epoch checkpoint
    was taken in; empty otherwise). Ray Train V2 calls dataset callables at every worker-group start, so a group
    restarted after a worker failure (scaling.max_failures) gets the datasets of the checkpoint it resumes from,
    the one the run's ResumePlan names, as the workers' weights do. No clip of that epoch is trained on twice or
    left out."""

    def __init__(
        self, base, cfg: GramConfig, plan: ResumePlan, shards: str | None = None, file_rows: dict | None = None
    ) -> None:
        self.base, self.cfg, self.plan = base, cfg, plan
        self.shards = shards  # the split streams from these files every epoch (TrainingData.train_shards)
        self.file_rows = file_rows  # TrainingData.file_rows

    def position(self) -> dict | None:
        folder, _ = self.plan.continues_from(latest_registered(self.plan.run_root))
        return position(folder) if folder is not None else None

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
        progress = resumed_progress(p, self.file_rows)
        if self.shards is not None:
            return streamed(self.shards, self.cfg, p["epoch"], progress)
        return shuffled_rest(self.base, self.cfg, p["epoch"], progress)


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
