"""`gram-ray bench ...`: every benchmark's options. Each command runs its module in gram_ray/bench/ and prints the
table that module builds; --json writes the whole result. Side-by-side measurements in one run, never timed tests."""

from __future__ import annotations

import os
from pathlib import Path

import click

from gram_ray.cli.common import CONFIG_OPTION, SET_OPTION, VERBOSE_OPTION, config_from_options, init_ray
from gram_ray.demo import DEMO_CONFIG

JSON_OPTION = click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")


def _report(table: str, result, json_path: Path | None) -> None:
    from gram_ray.bench.common import write_json

    click.echo("\n" + table)
    write_json(result, json_path)


def _usage_errors(fn, *args, **kwargs):
    """A benchmark's ValueError (an option it cannot run with) as a usage error."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _bench_config(config_path, overrides):
    """The benchmarked config: --config, else the demo's model."""
    return config_from_options(config_path or DEMO_CONFIG, overrides)


@click.group()
def bench() -> None:
    """Built-in benchmarks: side-by-side measurements in one run."""


@bench.command("volume")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option(
    "--k", "k", default=3, show_default=True, type=click.IntRange(min=2), help="modalities per sample (anchor included)"
)
@click.option("--b1", default=256, show_default=True, type=click.IntRange(min=1), help="anchors (rows)")
@click.option("--b2", default=1024, show_default=True, type=click.IntRange(min=1), help="samples (columns)")
@click.option("--dim", default=512, show_default=True, type=click.IntRange(min=1), help="embedding dimension")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option(
    "--reps", default=5, show_default=True, type=click.IntRange(min=1), help="timed repetitions (median reported)"
)
@click.option("--compile", "compile_", is_flag=True, help="also time the volume and the floor under torch.compile")
@JSON_OPTION
def bench_volume_cmd(device, k, b1, b2, dim, dtype, reps, compile_, json_path) -> None:
    """Forward+backward time and peak memory: the paper's det construction, gram_volume, the cosine floor."""
    from gram_ray.bench.common import hardware_name, require_device
    from gram_ray.bench.volume import bench_volume, volume_json, volume_table

    _usage_errors(require_device, device)
    hardware = hardware_name(device)
    click.echo(f"bench volume on {hardware}")
    results = bench_volume(
        device=device, k=k, b1=b1, b2=b2, dim=dim, dtype=dtype, reps=reps, compile=compile_, progress=click.echo
    )
    shape = {"k": k, "b1": b1, "b2": b2, "dim": dim, "dtype": dtype}
    _report(volume_table(results), volume_json(results, hardware, shape), json_path)


@bench.command("search")
@click.option(
    "--clips", default=1_000_000, show_default=True, type=click.IntRange(min=1), help="clips in the synthetic index"
)
@click.option(
    "--k",
    "modalities",
    default=3,
    show_default=True,
    type=click.IntRange(min=2),
    help="modalities a clip has, the query included",
)
@click.option("--dim", default=512, show_default=True, type=click.IntRange(min=1), help="embedding dimension")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float16", "float32"]), help="default: both")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--queries",
    "batch_queries",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="the batch of queries timed",
)
@click.option(
    "--reps", default=3, show_default=True, type=click.IntRange(min=1), help="timed repetitions (median reported)"
)
@JSON_OPTION
def bench_search_cmd(clips, modalities, dim, dtypes, device, top_k, batch_queries, reps, json_path) -> None:
    """Exact search by volume over a synthetic index: 1 query and a batch, bytes a clip, peak memory."""
    from gram_ray.bench.common import hardware_name, require_device
    from gram_ray.bench.search import as_json, bench_search, search_table

    _usage_errors(require_device, device)
    results = bench_search(
        clips, modalities, dim, dtypes or ("float16", "float32"), device, top_k, batch_queries, reps, log=click.echo
    )
    hardware = hardware_name(device)
    _report(search_table(results, hardware), as_json(results, hardware), json_path)


@bench.command("decode")
@click.option("--videos", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--num-frames", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=224, show_default=True, type=click.IntRange(min=16))
@click.option(
    "--reps", default=3, show_default=True, type=click.IntRange(min=1), help="passes over the folder (median reported)"
)
@JSON_OPTION
def bench_decode_cmd(videos, num_frames, size, reps, json_path) -> None:
    """Clips/s on one core: our decode vs a per-frame seek-and-read loop, and reading the Parquet cache."""
    from gram_ray.bench.decode import bench_decode, decode_table

    result = _usage_errors(bench_decode, videos, num_frames=num_frames, size=size, reps=reps, progress=click.echo)
    _report(decode_table(result), result, json_path)


@bench.command("shuffle")
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--rows",
    default=10000,
    show_default=True,
    type=click.IntRange(min=1),
    help="clips in a synthetic cache of the config's shapes",
)
@click.option("--cache", help="an existing cache (a preprocess --out folder) instead of a synthetic one")
@click.option(
    "--epochs", default=3, show_default=True, type=click.IntRange(min=2), help="epochs per mode (the first is warm-up)"
)
@JSON_OPTION
def bench_shuffle_cmd(config_path, overrides, rows, cache, epochs, json_path) -> None:
    """Seconds per epoch of each train.shuffle mode over a cache, through Ray Data as training reads it."""
    from gram_ray.bench.shuffle import run_bench_shuffle, shuffle_table

    cfg = _bench_config(config_path, overrides)
    result = _usage_errors(
        run_bench_shuffle, cfg, rows=rows, cache=cache, epochs=epochs, start_ray=init_ray, progress=click.echo
    )
    _report(shuffle_table(result), result, json_path)


@bench.command("data")
@CONFIG_OPTION
@SET_OPTION
@click.option("--cache", help="an existing cache (a preprocess --out folder, a path or URI) instead of synthetic ones")
@click.option(
    "--storage",
    "storage_uri",
    help="where to write the synthetic caches (a folder or a URI, e.g. s3://bucket/prefix); default: /tmp",
)
@click.option(
    "--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: where batches go and augment runs"
)
@click.option(
    "--batches", default=8, show_default=True, type=click.IntRange(min=1), help="batches of train.batch_size a pass"
)
@click.option(
    "--reps",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="timed passes (median reported) after one warm-up pass",
)
@click.option(
    "--train-json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a `bench train --json` result of this config on the GPU: its measured clips/s per GPU",
)
@click.option(
    "--gpu",
    "gpu_name",
    help="without --train-json: the GPU whose bf16 peak to use [default: this one with --device cuda, else A10G]",
)
@click.option(
    "--mfu",
    default=0.4,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="without --train-json: the model FLOPs utilisation assumed",
)
@JSON_OPTION
def bench_data_cmd(
    config_path, overrides, cache, storage_uri, device, batches, reps, train_json, gpu_name, mfu, json_path
):
    """The training input pipeline alone: storage read, frame decode (raw or JPEG, CPU or GPU), collate, host to
    device and augmentation, in clips/s per CPU core, and the CPU cores one GPU of the config's model needs."""
    from gram_ray.bench.data import data_table, run_bench_data

    cfg = _bench_config(config_path, overrides)
    click.echo(f"bench data of {config_path or DEMO_CONFIG}")
    result = _usage_errors(
        run_bench_data,
        cfg,
        cache=cache,
        storage_uri=storage_uri,
        device=device,
        batches=batches,
        reps=reps,
        train_json=train_json,
        gpu_name=gpu_name,
        mfu=mfu,
        start_ray=init_ray,
        progress=click.echo,
    )
    _report(data_table(result), result, json_path)


@bench.command("preprocess")
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--clips",
    default=10000,
    show_default=True,
    type=click.IntRange(min=10),
    help="synthetic clips to generate and decode",
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    help="where the clips and caches go (the clips are kept and reused); default: a temporary folder",
)
@click.option("--no-cluster", is_flag=True, help="leave out the run on a 2-node Ray cluster on this machine")
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Choice(["files", "webdataset"]),
    help="instead: the clips in a local S3 bucket as files and/or as tar shards, preprocessed from there "
    "(clips/s, requests a clip, memory a decode worker); repeat for both",
)
@click.option(
    "--clips-per-shard", default=100, show_default=True, type=click.IntRange(min=1), help="--source webdataset"
)
@JSON_OPTION
def bench_preprocess_cmd(config_path, overrides, clips, work, no_cluster, sources, clips_per_shard, json_path) -> None:
    """Preprocessing a large collection: clips/s and each decode worker's peak memory with 1 and 2 decode
    workers, at a tenth and all of the clips, and on a 2-node Ray cluster on this machine. With --source: the
    same clips from a local S3 bucket, as files and as WebDataset shards. Starts its own Rays."""
    import tempfile

    from gram_ray.bench.common import cpu_model
    from gram_ray.bench.preprocess import bench_preprocess, bench_sources, preprocess_table, sources_table

    if sources:
        cfg = _bench_config(config_path, overrides)
        with tempfile.TemporaryDirectory(prefix="gram-ray-bench-preprocess-") as tmp:
            where = work or Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            result = _usage_errors(
                bench_sources, cfg.data, clips, where, tuple(sources), clips_per_shard, progress=click.echo
            )
        result["hardware"] = cpu_model()
        _report(sources_table(result), result, json_path)
        return

    # Every node of the 2-node cluster is this machine's 127.0.0.1, and so is the address this process joins it
    # by (else Ray rewrites it into the machine's network address). Ray reads this when it is first imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg = _bench_config(config_path, overrides)
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-preprocess-") as tmp:
        where = work or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        result = _usage_errors(bench_preprocess, cfg.data, clips, where, cluster=not no_cluster, progress=click.echo)
    result["hardware"] = cpu_model()
    _report(preprocess_table(result), result, json_path)


@bench.command("fsdp")
@CONFIG_OPTION
@SET_OPTION
@click.option("--device", default="cpu", show_default=True, help="cpu (gloo) or cuda (NCCL, one GPU a worker)")
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(min=1), help="processes (ranks) on this machine"
)
@click.option(
    "--steps", default=3, show_default=True, type=click.IntRange(min=1), help="timed optimizer steps per strategy"
)
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="untimed steps first")
@JSON_OPTION
def bench_fsdp_cmd(config_path, overrides, device, workers, steps, warmup, json_path) -> None:
    """DDP against FSDP (scaling.strategy) on one machine, without Ray: weights, gradients and AdamW state held per
    rank, peak memory per rank, step time, and how far FSDP's weights end from DDP's after the same steps on the
    same batches. Random weights of the config's architectures (no download)."""
    from gram_ray.bench.common import hardware_name
    from gram_ray.bench.fsdp import bench_fsdp, fsdp_table

    cfg = _bench_config(config_path, overrides)
    click.echo(f"bench fsdp of {config_path or DEMO_CONFIG} on {hardware_name(device)}")
    result = _usage_errors(
        bench_fsdp, cfg, workers=workers, steps=steps, warmup=warmup, device=device, progress=click.echo
    )
    _report(fsdp_table(result), result | {"hardware": hardware_name(device)}, json_path)


@bench.command("checkpoint")
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--size",
    "sizes",
    multiple=True,
    default=("config",),
    show_default=True,
    help="'config' (the config's model) or a parameter count such as 1e9 (linear layers); repeat for several",
)
@click.option("--optimizer/--no-optimizer", default=True, show_default=True, help="AdamW's two moments too")
@click.option(
    "--checkpoints", default=3, show_default=True, type=click.IntRange(min=1), help="timed checkpoints per mode"
)
@click.option("--storage", "dest", help="a folder or URI to store them in (default: a temporary local folder)")
@JSON_OPTION
def bench_checkpoint_cmd(config_path, overrides, sizes, optimizer, checkpoints, dest, json_path) -> None:
    """The pause a checkpoint costs training: written and uploaded on the training thread, against copied to host
    memory and stored in the background (train.checkpoint_in_background), side by side; on CPU, without Ray."""
    from gram_ray.bench.checkpoint import bench_checkpoint, checkpoint_table, parse_size
    from gram_ray.bench.common import hardware_name

    cfg = _bench_config(config_path, overrides)
    parsed = [_usage_errors(parse_size, s) for s in sizes]
    click.echo(f"bench checkpoint of {config_path or DEMO_CONFIG} on {hardware_name('cpu')}")
    result = bench_checkpoint(
        cfg, sizes=parsed, optimizer=optimizer, checkpoints=checkpoints, dest=dest, progress=click.echo
    )
    _report(checkpoint_table(result), result | {"hardware": hardware_name("cpu")}, json_path)


@bench.command("train")
@CONFIG_OPTION
@SET_OPTION
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (path c uses the workers' GPUs)")
@click.option(
    "--steps", default=20, show_default=True, type=click.IntRange(min=1), help="timed optimizer steps per path"
)
@click.option(
    "--warmup",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="untimed steps first (compilation, allocator, pipeline)",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Ray Train workers of path (c), on this node",
)
@click.option(
    "--paths", default="plain,loop,ray", show_default=True, help="which of plain (a), loop (b), ray (c) to run"
)
@click.option("--pretrained-weights", is_flag=True, help="load the config's pretrained encoders instead of random ones")
@click.option(
    "--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (NVIDIA data-center cards: known)"
)
@JSON_OPTION
@click.option(
    "--dry-run", is_flag=True, help="only estimate the GPU memory a step needs per GPU (no GPU, no Ray, no download)"
)
@click.option(
    "--gpu-gib",
    default=80.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="--dry-run: the GPU memory to fit in",
)
@VERBOSE_OPTION
def bench_train_cmd(
    config_path,
    overrides,
    device,
    steps,
    warmup,
    workers,
    paths,
    pretrained_weights,
    peak_tflops,
    json_path,
    dry_run,
    gpu_gib,
    verbose,
) -> None:
    """Training samples/s per worker of a config's model: (a) a plain PyTorch loop, (b) gram-ray's loop fed from
    the Parquet cache without Ray, (c) TorchTrainer + Ray Data; step-time breakdown, peak GPU memory, MFU.
    Encoders get random weights of the config's architectures unless --pretrained-weights (no download).
    --dry-run estimates instead the memory per GPU of the ways to train the config's model."""
    from gram_ray.bench.common import require_device
    from gram_ray.bench.train import bench_train, train_table

    cfg = _bench_config(config_path, overrides)
    if dry_run:
        from gram_ray.train.memory import estimate_memory, memory_json, memory_table

        click.echo(f"estimating the memory of a training step of {config_path or DEMO_CONFIG} (meta device) ...")
        estimates = estimate_memory(cfg)
        _report(memory_table(estimates, gpu_gib), memory_json(estimates), json_path)
        return
    _usage_errors(require_device, device)
    init_ray(verbose)
    result = _usage_errors(
        bench_train,
        cfg,
        steps=steps,
        warmup=warmup,
        workers=workers,
        device=device,
        random=not pretrained_weights,
        peak_tflops=peak_tflops,
        paths=tuple(p.strip() for p in paths.split(",") if p.strip()),
        progress=click.echo,
    )
    _report(train_table(result), result, json_path)


@bench.command("scale")
@click.option(
    "--clips",
    "sizes",
    multiple=True,
    type=click.IntRange(min=1000),
    help="manifest sizes to run, each on local disk with a kill and a resume (repeat; default 1 M, 4 M, 27 M)",
)
@click.option(
    "--s3-clips",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="a run of this size with its cache in a bucket of a local S3 server, its requests counted (0: none)",
)
@click.option(
    "--work",
    default=Path("bench-scale"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="where the manifests (kept and reused: 27 M rows are 4 GB) and the caches go",
)
@JSON_OPTION
def bench_scale_cmd(sizes, s3_clips, work, json_path) -> None:
    """gram-ray's own bookkeeping at a user's size, by simulation: the planner, preprocess killed and resumed, the
    cache listing, Ray Data's read planning, a mid-epoch checkpoint's data state and an index's ids, each phase's
    driver peak memory and time. THE DECODE IS A STAND-IN (a tiny synthetic row a clip): bookkeeping, not
    decoding. Starts its own Ray (and the S3 server)."""
    from gram_ray.bench.common import cpu_model
    from gram_ray.bench.scale import as_json, bench_scale, scale_table

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    results = bench_scale(tuple(sizes) or (1_000_000, 4_000_000, 27_000_000), work, s3_clips or None, click.echo)
    _report(scale_table(results, cpu_model()), as_json(results, cpu_model()), json_path)
