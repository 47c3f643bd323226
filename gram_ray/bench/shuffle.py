"""`gram-ray bench shuffle`: seconds per epoch of each train.shuffle mode over a cache, through Ray Data as
training reads it."""

from __future__ import annotations

import statistics
import time

__all__ = ["bench_shuffle", "run_bench_shuffle", "shuffle_table"]


def _drain_shard(shard, cfg, epoch: int, rank: int) -> None:
    """One worker's epoch over its shard, batched and locally shuffled as training does, without collating
    (tokenising is the same work whatever the shuffle)."""
    from gram_ray.train.datasets import train_iter_options

    options = train_iter_options(cfg, None, epoch, rank)
    del options["collate_fn"]
    for _ in shard.iter_batches(batch_format="numpy", **options):
        pass


def bench_shuffle(cfg, shards: str, *, epochs: int = 3, workers: int = 2, progress=print) -> dict:
    """Seconds per epoch for the train split's order, side by side: no shuffle, block order plus a local buffer,
    and a full random_shuffle; through the same pieces training uses (the cache kept in memory when it fits,
    Ray Train's equal streaming split, each worker's iter_torch_batches), without the model. The first epoch
    of each mode is warm-up and left out of the median."""
    import threading

    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.train.datasets import keep_in_memory, shuffled

    ds = keep_in_memory(read_cache(shards), cfg)
    rows = ds.count()
    progress(f"  {rows} rows in {ds.num_blocks()} blocks of {cfg.worker_batch} kept in Ray's object store")
    result = {"rows": rows, "workers": workers, "epochs": epochs, "seconds_per_epoch": {}}
    for mode in ("none", "blocks", "full"):
        c = cfg.model_copy(deep=True)
        c.train.shuffle = mode
        split = shuffled(ds, c, start_epoch=0).streaming_split(workers, equal=True)
        times = []
        for epoch in range(epochs):
            start = time.perf_counter()
            threads = [
                threading.Thread(target=_drain_shard, args=(split[rank], c, epoch, rank)) for rank in range(workers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            times.append(time.perf_counter() - start)
        progress(f"  shuffle={mode}: " + ", ".join(f"{t:.2f}" for t in times) + " s per epoch")
        result["seconds_per_epoch"][mode] = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return result


def run_bench_shuffle(cfg, *, rows: int, cache: str | None, epochs: int, start_ray, progress=print) -> dict:
    """`gram-ray bench shuffle` whole: over the cache given, or a synthetic one of `rows` clips of the config's shapes
    (in a temporary folder), with the config's number of workers."""
    import tempfile

    from gram_ray.bench.common import cache_shards, hardware_name, write_synthetic_cache

    shards = cache_shards(cache) if cache else None  # before Ray starts: a wrong folder costs a second
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        if shards is None:
            progress(f"writing a synthetic cache of {rows} clips with {cfg.data.video} {cfg.data.audio} ...")
            shards = write_synthetic_cache(tmp, rows, cfg.data)
        hardware = hardware_name("cpu")
        progress(f"bench shuffle on {hardware}, {cfg.scaling.max_workers} workers")
        result = bench_shuffle(cfg, shards, epochs=epochs, workers=cfg.scaling.max_workers, progress=progress)
    return result | {"hardware": hardware}


def shuffle_table(result: dict) -> str:
    none = result["seconds_per_epoch"]["none"]
    lines = [f"{'shuffle':<8} {'s/epoch':>8} {'extra s/epoch':>14}"]
    lines += [f"{mode:<8} {s:>8.2f} {s - none:>14.2f}" for mode, s in result["seconds_per_epoch"].items()]
    return "\n".join(lines)
