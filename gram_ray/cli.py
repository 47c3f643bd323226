"""The `gram-ray` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gram-ray")
def main() -> None:
    """Train GRAM (Gramian multimodal alignment) models on Ray clusters."""


def training_failure(error: BaseException) -> str | None:
    """The one-line reason of a Ray Train run that failed because of a known condition on a worker (too many
    non-finite steps, a checkpoint that could not be written), or None for anything else."""
    from gram_ray.model.checkpoint import CheckpointWriteError
    from gram_ray.train.loop import NonFiniteTrainingError

    known = (NonFiniteTrainingError, CheckpointWriteError)
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = failure
        while cause is not None and not isinstance(cause, known):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            return f"training failed on worker {rank}: {cause}"
    return None


def _init_ray(verbose: bool = False) -> None:
    """Join the cluster RAY_ADDRESS names (a job submitted with `ray job submit` has it set; `RAY_ADDRESS=auto`
    joins the cluster `ray start` runs on this machine), else start a fresh local Ray in-process, with more
    logical CPUs than cores, so Ray Data decode tasks and Train workers never wait on each other. Without
    RAY_ADDRESS a job never lands on a cluster it was not sent to: ray.init() alone would join the latest
    `ray start` cluster of this machine (even a dead one), and refuse the CPU count.

    The variables that say where storage is (storage.FORWARDED_ENV) go to every worker of a job started here.
    Unless verbose, Ray's own INFO lines and the workers' output stay in Ray's session logs (the console says
    where); gram-ray prints its progress lines itself."""
    import logging
    import warnings

    import ray
    import ray.data

    from gram_ray import storage

    # Ray Data's progress bars are for terminals; elsewhere (logs, CI, `ray job` output) they stay off.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    if not ray.is_initialized():
        options = {"log_to_driver": verbose, "logging_level": level}
        # A submitted job's workers get the job's runtime environment already (Ray ignores another one here).
        if storage.forwarded_env() and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            options["runtime_env"] = {"env_vars": storage.forwarded_env()}
        if os.environ.get("RAY_ADDRESS"):
            info = ray.init(address=os.environ["RAY_ADDRESS"], **options)
            click.echo(f"joined the Ray cluster at {info.address_info['gcs_address']} (RAY_ADDRESS)")
        else:
            # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls every second:
            # without it the cleaner logs a warning each time, and the workers' placement group of every trial
            # Tune stops (ASHA, or its last report) is never released, so a sweep stalls once they fill the
            # node. Bound to this machine only.
            dashboard = _dashboard_available()
            if not dashboard:
                click.echo(
                    "Ray's dashboard dependencies (ray[default]) are not installed: starting Ray without it. Tune "
                    "sweeps need it to release the workers of stopped trials."
                )
            cpus = max(8, os.cpu_count() or 1)
            info = ray.init(
                address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **options
            )
            click.echo(
                f"started a local Ray ({cpus} logical CPUs); to run on a cluster, set RAY_ADDRESS (auto: the "
                "`ray start` cluster of this machine) or use `ray job submit`"
            )
        if not verbose:
            click.echo(f"Ray's full logs: {info.address_info['session_dir']}/logs (--verbose shows them here)")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if not verbose:  # off the terminal the bars are off on purpose: no need to say so
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _check_data(cfg) -> None:
    """The config's annotation files and media folders (local or in storage), checked before Ray starts: a
    missing file costs a second, not Ray's start-up."""
    from gram_ray.data.manifest import ManifestError, check_sources

    d = cfg.data
    try:
        check_sources([d.train_annotations, d.val_annotations], d.video_dir, d.audio_dir)
    except ManifestError as e:
        raise click.ClickException(str(e)) from None


def _dashboard_available() -> bool:
    """Whether Ray can start its dashboard here: Ray decides by importing this module (a slim Ray, like the one
    carried to a bare GPU machine, lacks aiohttp_cors, opencensus and the like)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def run_job(command: str) -> None:
    """The body of jobs/<command>.py: `gram-ray <command>` with the job's arguments, for `ray job submit`. Exits
    non-zero on failure, so the job is marked FAILED."""
    main([command, *sys.argv[1:]], prog_name=f"jobs/{command}.py")


_CONFIG = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_SET = click.option("--set", "overrides", multiple=True, help="override a config key, e.g. --set train.lr=2e-5")
_VERBOSE = click.option("--verbose", "-v", is_flag=True, help="also show Ray's INFO logs and the workers' output")


def _config(config_path, overrides):
    from gram_ray.config import ConfigError, load_config

    try:
        return load_config(config_path, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for videos/, audios/, *.json")
@click.option("--n", "n", default=200, show_default=True, help="number of clips")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=64, show_default=True, help="frame side in pixels")
@click.option("--seconds", default=2.0, show_default=True)
@click.option("--val-share", default=0.25, show_default=True, help="share of clips in the val split (groups of 4)")
def synth(out, n, seed, size, seconds, val_share) -> None:
    """Generate the synthetic tri-modal dataset (captions that need the audio)."""
    from gram_ray.data.synthetic import generate

    with click.progressbar(length=n, label=f"writing {n} clips to {out}") as bar:
        paths = generate(
            out, n=n, seed=seed, size=size, seconds=seconds, val_share=val_share, progress=lambda i, t: bar.update(1)
        )
    click.echo(json.dumps(paths, indent=2))


@main.command()
@click.option("--annotations", required=True, help="annotation file: a path or storage URI (s3://...)")
@click.option("--video-dir", help="folder of the videos (or images): a path or storage URI; none for audio-only sets")
@click.option("--audio-dir", help="folder of separate audio files (a path or URI); else: the videos' tracks")
@click.option("--out", required=True, help="cache folder or storage URI (shards/ + report.json)")
@_CONFIG
@_SET
@click.option(
    "--mode",
    type=click.Choice(["eval", "train"]),
    default="eval",
    show_default=True,
    help="eval: middle frame of each segment; train: a random one",
)
@click.option("--force", is_flag=True, help="decode again even if the cache matches")
@_VERBOSE
def preprocess(annotations, video_dir, audio_dir, out, config_path, overrides, mode, force, verbose) -> None:
    """Decode clips with Ray Data into a Parquet cache that every epoch and Tune trial reuses."""
    from gram_ray.data.manifest import ManifestError, check_sources
    from gram_ray.data.preprocess import PreprocessError
    from gram_ray.data.preprocess import preprocess as run

    cfg = _config(config_path, overrides)
    try:
        check_sources([annotations], video_dir, audio_dir)
        _init_ray(verbose)
        run(annotations, video_dir, out, cfg.data, audio_dir=audio_dir, mode=mode, force=force, log=click.echo)
    except (ManifestError, PreprocessError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@_CONFIG
@_SET
@click.option(
    "--out", type=click.Path(path_type=Path), help="run folder: metrics, result.json, W&B [default: runs/<run.name>]"
)
@click.option(
    "--resume",
    help="a checkpoint folder or storage URI to continue from, or `auto`: the newest whole checkpoint of this run "
    "(--out and run.name), e.g. after the driver was killed; a fresh start if it has none",
)
@_VERBOSE
def train(config_path, overrides, out, resume, verbose) -> None:
    """Train GRAM with Ray Train (TorchTrainer) on the data the config names."""
    from gram_ray.data.preprocess import PreprocessError
    from gram_ray.train.console import Console
    from gram_ray.train.loop import main_metric_name
    from gram_ray.train.trainer import fit

    cfg = _config(config_path, overrides)
    out = out or Path("runs") / cfg.run.name
    _check_data(cfg)
    _init_ray(verbose)
    console = Console(click.echo, main_metric=main_metric_name(cfg))
    try:
        _, summary = fit(cfg, out, resume_from=resume, log=click.echo, console=console)
    except (ValueError, FileNotFoundError, PreprocessError) as e:  # bad config or data: the message says which
        raise click.ClickException(str(e)) from None
    except Exception as e:
        reason = training_failure(e)
        if reason is None:
            raise
        raise click.ClickException(reason) from None
    click.echo(json.dumps(summary["best_metrics"], indent=2))
    click.echo(f"best checkpoint: {summary['checkpoint']}")


@main.command()
@_CONFIG
@_SET
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="sweep folder: trials.csv, best_config.yaml, sweep.png [default: runs/<run.name>-sweep]",
)
@click.option("--resume", is_flag=True, help="continue an interrupted sweep in --out; finished trials are kept")
@_VERBOSE
def tune(config_path, overrides, out, resume, verbose) -> None:
    """Sweep learning rate, temperature (any config key) with Ray Tune and ASHA, one TorchTrainer per trial."""
    from gram_ray.config import ConfigError
    from gram_ray.tune import run_sweep

    cfg = _config(config_path, overrides)
    out = out or Path("runs") / f"{cfg.run.name}-sweep"
    _check_data(cfg)
    _init_ray(verbose)
    try:
        run_sweep(cfg, out, resume=resume, log=click.echo)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.option("--checkpoint", required=True, help="a checkpoint folder or storage URI")
@click.option("--data", required=True, help="a preprocess --out folder (or storage URI)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the metrics JSON here")
@_VERBOSE
def evaluate(checkpoint, data, json_path, verbose) -> None:
    """Retrieval metrics of a checkpoint on a Parquet cache (Ray Data batch inference)."""
    from gram_ray.demo import results_table
    from gram_ray.model.checkpoint import CheckpointError
    from gram_ray.retrieval.metrics import write_metrics
    from gram_ray.train.inference import check_inputs, evaluate_checkpoint

    try:
        check_inputs(checkpoint, data)
    except (FileNotFoundError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    _init_ray(verbose)
    metrics = evaluate_checkpoint(checkpoint, data)
    click.echo(results_table(metrics))
    if json_path:
        write_metrics(metrics, json_path)


@main.command()
@click.option("--checkpoint", required=True, help="a checkpoint folder or storage URI: the model that embeds")
@click.option("--data", help="a preprocess --out folder (or storage URI) of the clips to index")
@click.option("--annotations", help="instead of --data: an annotation file, preprocessed first (with --video-dir)")
@click.option("--video-dir", help="with --annotations: the videos' (or images') folder, a path or storage URI")
@click.option("--audio-dir", help="with --annotations: separate audio files, else the videos' tracks")
@click.option("--out", required=True, help="the index folder or storage URI (created, continued or added to)")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--workers", default=1, show_default=True, help="embedding actors (one GPU each when there are GPUs)")
@_VERBOSE
def index(checkpoint, data, annotations, video_dir, audio_dir, out, dtype, workers, verbose) -> None:
    """Embed a collection of clips into a search index: per clip its embeddings, its span's basis for search by
    volume, a thumbnail and where its media are. Rerun to continue; another --data adds its clips."""
    from gram_ray import storage
    from gram_ray.model.checkpoint import CheckpointError, checkpoint_config
    from gram_ray.retrieval.index import SearchIndexError, build_index
    from gram_ray.train.inference import check_inputs

    if (data is None) == (annotations is None):
        raise click.UsageError("give either --data (a preprocessed cache) or --annotations with --video-dir")
    try:
        if data:
            check_inputs(checkpoint, data)
        else:
            check_inputs(checkpoint, annotations)
    except (FileNotFoundError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    from gram_ray.data.manifest import ManifestError
    from gram_ray.data.preprocess import PreprocessError
    from gram_ray.data.preprocess import preprocess as decode

    _init_ray(verbose)
    try:
        if annotations:
            data = storage.join(out, "caches", Path(str(annotations)).stem)
            click.echo(f"preprocessing {annotations} into {data} with the checkpoint's data settings ...")
            settings = checkpoint_config(checkpoint).data
            decode(annotations, video_dir, data, settings, audio_dir=audio_dir, log=click.echo)
        build_index(checkpoint, data, out, dtype=dtype, workers=workers, log=click.echo)
    except (SearchIndexError, ManifestError, PreprocessError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("query", nargs=-1)
@click.option("--index", "index_dir", required=True, help="an index folder or storage URI (gram-ray index --out)")
@click.option("--queries", "queries_file", type=click.File(), help="a file of queries, one a line")
@click.option("--clip", "clip_id", help="instead of captions: the captions closest to this clip of the index")
@click.option("-k", "k", default=5, show_default=True, help="results a query")
@click.option("--score", type=click.Choice(["volume", "cosine"]), default="volume", show_default=True)
@click.option("--rerank", is_flag=True, help="rescore the top eval.rerank_k with the match head (eval.rerank_score)")
@click.option("--rerank-k", type=int, help="how many to rerank (default: the checkpoint's eval.rerank_k)")
@click.option("--checkpoint", help="the model (default: the one the index was built with)")
@click.option("--device", help="cpu or cuda (default: cuda when there is a GPU)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the results as JSON here")
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="write a gallery page here")
def search(
    query, index_dir, queries_file, clip_id, k, score, rerank, rerank_k, checkpoint, device, json_path, html_path
):
    """Search an index: the clips closest to each caption by volume (e.g. gram-ray search --index I "a dog barks")."""
    import dataclasses

    from gram_ray.model.checkpoint import CheckpointError
    from gram_ray.retrieval.gallery import write_gallery
    from gram_ray.retrieval.index import SearchIndexError
    from gram_ray.retrieval.query import Searcher

    texts = list(query) + ([line.strip() for line in queries_file if line.strip()] if queries_file else [])
    if not texts and not clip_id:
        raise click.UsageError('give a query ("a dog barks"), --queries FILE, or --clip ID')
    try:
        click.echo(f"loading the index {index_dir} and its checkpoint ...")
        searcher = Searcher(index_dir, checkpoint, device)
        if texts:
            click.echo(f"searching {len(texts)} quer{'y' if len(texts) == 1 else 'ies'} over "
                       f"{len(searcher.index.ids):,} clips on {searcher.device} ...")  # fmt: skip
        results = searcher.search(texts, k, score, rerank, rerank_k) if texts else []
        if clip_id:
            results.append(searcher.similar_captions(clip_id, k))
    except (SearchIndexError, FileNotFoundError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    for result in results:
        click.echo(f"\n{result.query}  (by {result.score})")
        for hit in result.hits:
            extra = f"  match {hit.match_probability:.2f}" if hit.match_probability is not None else ""
            click.echo(
                f"  {hit.rank:>3}  {hit.score:>9.4f}{extra}  {hit.id:<24} {hit.captions[0] if hit.captions else ''}"
            )
    if json_path:
        rows = [
            {"query": r.query, "score": r.score, "hits": [dataclasses.asdict(h) | {"thumbnail": None} for h in r.hits]}
            for r in results
        ]
        json_path.write_text(json.dumps(rows, indent=2))
        click.echo(f"\nresults: {json_path}")
    if html_path:
        click.echo(f"gallery: {write_gallery(results, html_path, f'gram-ray search: {index_dir}')}")


@main.command("evaluate-embeddings")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the metrics JSON here")
def evaluate_embeddings_cmd(directory, json_path) -> None:
    """Metrics of precomputed <modality>.npy embeddings (optional text_to_video.npy)."""
    from gram_ray.demo import results_table
    from gram_ray.retrieval.metrics import evaluate_embeddings, load_embedding_dir, write_metrics

    try:
        metrics = evaluate_embeddings(*load_embedding_dir(directory))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(results_table(metrics))
    if json_path:
        write_metrics(metrics, json_path)


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path))
@click.option("--modalities", default="text,video,audio", show_default=True, help="text plus one or more others")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="a dataset written earlier by `gram-ray synth` instead of generating the demo's 1000 clips",
)
@_CONFIG
@_SET
@_VERBOSE
def demo(out, modalities, data_dir, config_path, overrides, verbose) -> None:
    """The main job on generated data: synth, preprocess, train (2 workers), evaluate, summarise."""
    from gram_ray.demo import run_demo

    mods = [m.strip() for m in modalities.split(",") if m.strip()]
    if "text" not in mods or len(mods) < 2 or not set(mods) <= {"text", "video", "audio"}:
        raise click.BadParameter(
            "text and at least one of video, audio (e.g. text,video,audio)", param_hint="--modalities"
        )
    _init_ray(verbose)
    try:
        run_demo(out, mods, config_path, overrides, log=click.echo, data_dir=data_dir)
    except FileNotFoundError as e:
        raise click.UsageError(str(e)) from None


@main.command("import-checkpoint")
@click.argument("source")
@click.option("--out", required=True, help="the gram-ray checkpoint folder (or storage URI) to write")
@_CONFIG
@_SET
@click.option("--allow-partial", is_flag=True, help="write it even if keys are missing, unexpected or mis-shaped")
def import_checkpoint(source, out, config_path, overrides, allow_partial) -> None:
    """A gram-ray checkpoint from one of GRAM's released checkpoints (e.g. its MSR-VTT or pretrained model), for
    the model --config describes (default configs/msrvtt.yaml: GRAM's encoders). Then train with
    --set model.init_from=OUT."""
    from gram_ray.model.checkpoint import CheckpointError
    from gram_ray.model.gram_checkpoint import import_gram_checkpoint

    default = Path(__file__).resolve().parent.parent / "configs" / "msrvtt.yaml"
    cfg = _config(config_path or default, overrides)
    try:
        import_gram_checkpoint(source, cfg, out, allow_partial=allow_partial, log=click.echo)
    except (CheckpointError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


@main.group()
def cluster() -> None:
    """Clusters: check a job against a cluster YAML before paying for it."""


@cluster.command("check")
@click.option("--yaml", "yaml_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_CONFIG
@_SET
@click.option("--gpu-gb", type=float, help="GPU memory per GPU, where the YAML names no instance type gram-ray knows")
def cluster_check_cmd(yaml_path, config_path, overrides, gpu_gb) -> None:
    """Which node types host the trainer workers and the decode tasks, how many nodes the job needs, whether every
    request fits a node type (a request none can hold would stay pending for ever) and whether the training step
    fits the GPUs' memory. Exits non-zero when the job cannot run as configured."""
    from gram_ray.cluster.check import CheckError, check_cluster

    cfg = _config(config_path, overrides)
    try:
        result = check_cluster(cfg, yaml_path, gpu_gb=gpu_gb)
    except CheckError as e:
        raise click.ClickException(str(e)) from None
    for line in result.lines:
        click.echo(line)
    if result.fits_memory is False:
        raise click.ClickException(
            f"the training step does not fit the GPUs of {result.trainer_type.name}: use a node type with more GPU "
            "memory, lower train.batch_size, or turn on model.gradient_checkpointing / freeze the vision tower"
        )


@cluster.command("local")
@click.argument("yaml_path", metavar="YAML", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--node-cpus", default=4, show_default=True, help="logical CPUs of each local node (at most)")
@click.option("--idle-timeout-minutes", type=float, help="shorter than the YAML's, to see nodes go sooner")
@click.option(
    "--job",
    "jobs",
    multiple=True,
    help="a job's command (e.g. 'python jobs/train.py --config ...'), submitted from this folder once the head is "
    "up, one after the other; without --job the cluster runs until Ctrl+C",
)
@click.option(
    "--settle-s",
    default=120.0,
    show_default=True,
    help="after the jobs: how long to wait, beyond the idle timeout, for the nodes to go back to each type's minimum",
)
def cluster_local_cmd(yaml_path, node_cpus, idle_timeout_minutes, jobs, settle_s) -> None:
    """Try a cluster YAML (AWS, GCP launcher, or a KubeRay RayCluster/RayJob) on this machine: Ray's autoscaler
    launches and removes local "nodes" shaped like its node types, and the console says which came and went."""
    import time

    from gram_ray.cluster.check import CheckError
    from gram_ray.cluster.local import LocalCluster

    try:
        local = LocalCluster(yaml_path, node_cpus=node_cpus, idle_timeout_minutes=idle_timeout_minutes)
    except CheckError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"a local autoscaling cluster shaped like {yaml_path}:")
    for line in local.mapping():
        click.echo("  " + line)
    failed = []
    with local:
        click.echo(f"head up: dashboard and job server {local.dashboard}, GCS {local.gcs_address} (token auth on)")
        if not jobs:
            click.echo(
                f"submit with: RAY_ADDRESS={local.dashboard} RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<its token> ray job "
                "submit --working-dir . -- python jobs/train.py ...; Ctrl+C stops the cluster"
            )
            try:
                while True:
                    local.watch()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        for job in jobs:
            status, logs = local.submit(job)
            if status != "SUCCEEDED":
                failed.append(job)
                click.echo(logs)
        if jobs:
            wait = local.idle_timeout_minutes * 60 + settle_s
            click.echo(f"jobs done; waiting up to {wait:.0f} s for idle nodes to go (idle timeout)")
            if not local.wait_for_minimum(wait):
                click.echo("nodes were still up when the wait ended")
    click.echo("node timeline:")
    for line in local.timeline.in_words():
        click.echo("  " + line)
    if failed:
        raise click.ClickException(f"{len(failed)} job(s) failed: {failed}")


def _report(table: str, result, json_path: Path | None) -> None:
    """A benchmark's table on the console, and its whole result as JSON where asked."""
    click.echo("\n" + table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


@main.group()
def bench() -> None:
    """Built-in benchmarks: side-by-side measurements in one run."""


@bench.command("volume")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--k", "k", default=3, show_default=True, help="modalities per sample (anchor included)")
@click.option("--b1", default=256, show_default=True, help="anchors (rows)")
@click.option("--b2", default=1024, show_default=True, help="samples (columns)")
@click.option("--dim", default=512, show_default=True, help="embedding dimension")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--reps", default=5, show_default=True, help="timed repetitions (median reported)")
@click.option("--compile", "compile_", is_flag=True, help="also time the volume and the floor under torch.compile")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_volume_cmd(device, k, b1, b2, dim, dtype, reps, compile_, json_path) -> None:
    """Forward+backward time and peak memory: the paper's det construction, gram_volume, the cosine floor."""
    from gram_ray.bench import bench_volume, hardware_name

    if k < 2:
        raise click.BadParameter("a volume needs k >= 2 modalities", param_hint="--k")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    hardware = hardware_name(device)
    click.echo(f"bench volume on {hardware}")
    results = bench_volume(
        device=device, k=k, b1=b1, b2=b2, dim=dim, dtype=dtype, reps=reps, compile=compile_, progress=click.echo
    )
    by_name = {r.variant: r for r in results}
    ours = by_name["gram_volume"]
    click.echo(f"\n{'variant':<20} {'fwd+bwd ms':>11} {'peak MiB':>9}  what")
    for r in results:
        peak = f"{r.peak_bytes / 2**20:>9.1f}" if r.peak_bytes else f"{'-':>9}"
        click.echo(f"{r.variant:<20} {r.seconds * 1e3:>11.2f} {peak}  {r.description}")
    speedup = by_name["paper"].seconds / ours.seconds
    floor_ratio = ours.seconds / by_name["cosine"].seconds
    memory_ratio = ours.peak_bytes / max(by_name["paper"].peak_bytes, 1)
    click.echo(
        f"\ngram_volume is {speedup:.1f}x faster than the paper's construction, {floor_ratio:.2f}x the cosine floor, "
        f"and peaks at {memory_ratio:.2f}x the paper's memory."
    )
    compiled_ratios = {}
    if compile_:
        compiled, floor = by_name["gram_volume+compile"], by_name["cosine+compile"]
        compiled_ratios = {
            "compiled_speedup_vs_paper": by_name["paper"].seconds / compiled.seconds,
            "compiled_ratio_to_compiled_floor": compiled.seconds / floor.seconds,
        }
        click.echo(
            f"compiled: {compiled_ratios['compiled_speedup_vs_paper']:.1f}x faster than the paper's construction, "
            f"{compiled_ratios['compiled_ratio_to_compiled_floor']:.2f}x the compiled cosine floor."
        )
    if json_path:
        payload = {
            "hardware": hardware,
            "shape": {"k": k, "b1": b1, "b2": b2, "dim": dim, "dtype": dtype},
            "results": [r.__dict__ for r in results],
            "speedup_vs_paper": speedup,
            "ratio_to_cosine_floor": floor_ratio,
            "memory_ratio_vs_paper": memory_ratio,
        } | compiled_ratios
        json_path.write_text(json.dumps(payload, indent=2))


@bench.command("search")
@click.option("--clips", default=1_000_000, show_default=True, help="clips in the synthetic index")
@click.option("--k", "modalities", default=3, show_default=True, help="modalities a clip has, the query included")
@click.option("--dim", default=512, show_default=True, help="embedding dimension")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float16", "float32"]), help="default: both")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--top-k", default=10, show_default=True)
@click.option("--queries", "batch_queries", default=1000, show_default=True, help="the batch of queries timed")
@click.option("--reps", default=3, show_default=True, help="timed repetitions (median reported)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_search_cmd(clips, modalities, dim, dtypes, device, top_k, batch_queries, reps, json_path) -> None:
    """Exact search by volume over a synthetic index: 1 query and a batch, bytes a clip, peak memory."""
    from gram_ray.bench import hardware_name
    from gram_ray.bench_search import as_json, bench_search, search_table

    results = bench_search(
        clips, modalities, dim, dtypes or ("float16", "float32"), device, top_k, batch_queries, reps, log=click.echo
    )
    hardware = hardware_name(device)
    _report(search_table(results, hardware), as_json(results, hardware), json_path)


@bench.command("decode")
@click.option("--videos", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--num-frames", default=8, show_default=True)
@click.option("--size", default=224, show_default=True)
@click.option("--reps", default=3, show_default=True, help="passes over the folder (median reported)")
def bench_decode_cmd(videos, num_frames, size, reps) -> None:
    """Clips/s on one core: our decode vs a per-frame seek-and-read loop, and reading the Parquet cache."""
    from gram_ray.bench import bench_decode

    result = bench_decode(videos, num_frames=num_frames, size=size, reps=reps, progress=click.echo)
    click.echo(f"\n{'path':<28} {'clips/s/core':>13}")
    for name in ("naive_seek", "gram_ray_decode", "decord_batch", "parquet_cache"):
        click.echo(f"{name:<28} {result[name]:>13.2f}")
    click.echo(
        f"\ndecode is {result['gram_ray_decode'] / result['naive_seek']:.2f}x the per-frame seek loop; reading the "
        f"cache is {result['parquet_cache'] / result['gram_ray_decode']:.0f}x decoding ({result['clips']} clips)."
    )


@bench.command("shuffle")
@_CONFIG
@_SET
@click.option("--rows", default=10000, show_default=True, help="clips in a synthetic cache of the config's shapes")
@click.option("--cache", help="an existing cache (a preprocess --out folder) instead of a synthetic one")
@click.option("--epochs", default=3, show_default=True, help="epochs per mode (the first is warm-up)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_shuffle_cmd(config_path, overrides, rows, cache, epochs, json_path) -> None:
    """Seconds per epoch of each train.shuffle mode over a cache, through Ray Data as training reads it."""
    import tempfile

    from gram_ray import storage
    from gram_ray.bench import bench_shuffle, hardware_name, write_synthetic_cache
    from gram_ray.data.preprocess import SHARDS
    from gram_ray.demo import DEMO_CONFIG

    cfg = _config(config_path or DEMO_CONFIG, overrides)
    _init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        if cache:
            shards = storage.join(storage.absolute(cache), SHARDS)
        else:
            click.echo(f"writing a synthetic cache of {rows} clips with {cfg.data.video} {cfg.data.audio} ...")
            shards = write_synthetic_cache(tmp, rows, cfg.data)
        click.echo(f"bench shuffle on {hardware_name('cpu')}, {cfg.scaling.max_workers} workers")
        result = bench_shuffle(cfg, shards, epochs=epochs, workers=cfg.scaling.max_workers, progress=click.echo)
    none = result["seconds_per_epoch"]["none"]
    click.echo(f"\n{'shuffle':<8} {'s/epoch':>8} {'extra s/epoch':>14}")
    for mode, seconds in result["seconds_per_epoch"].items():
        click.echo(f"{mode:<8} {seconds:>8.2f} {seconds - none:>14.2f}")
    if json_path:
        json_path.write_text(json.dumps(result | {"hardware": hardware_name("cpu")}, indent=2))


@bench.command("data")
@_CONFIG
@_SET
@click.option("--cache", help="an existing cache (a preprocess --out folder, a path or URI) instead of synthetic ones")
@click.option(
    "--storage",
    "storage_uri",
    help="where to write the synthetic caches (a folder or a URI, e.g. s3://bucket/prefix); default: /tmp",
)
@click.option(
    "--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: where batches go and augment runs"
)
@click.option("--batches", default=8, show_default=True, help="batches of train.batch_size a pass")
@click.option("--reps", default=3, show_default=True, help="timed passes (median reported) after one warm-up pass")
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
@click.option("--mfu", default=0.4, show_default=True, help="without --train-json: the model FLOPs utilisation assumed")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_data_cmd(
    config_path, overrides, cache, storage_uri, device, batches, reps, train_json, gpu_name, mfu, json_path
):
    """The training input pipeline alone: storage read, frame decode (raw or JPEG, CPU or GPU), collate, host to
    device and augmentation, in clips/s per CPU core, and the CPU cores one GPU of the config's model needs."""
    import tempfile

    from gram_ray import storage
    from gram_ray.bench import cpu_model, hardware_name, write_synthetic_cache
    from gram_ray.bench_data import DEFAULT_GPU, bench_data, data_table, gpu_rate
    from gram_ray.bench_train import bench_vocab
    from gram_ray.data.preprocess import SHARDS
    from gram_ray.demo import DEMO_CONFIG
    from gram_ray.model.architectures import random_weights

    cfg = _config(config_path or DEMO_CONFIG, overrides)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        gpu_name = gpu_name or torch.cuda.get_device_name(torch.device(device))
    tokenizer = cfg.model.tokenizer or cfg.model.text.pretrained
    if tokenizer:  # measured as configured where it is at hand; never a download in the middle of a benchmark
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except OSError:
            click.echo(f"tokenizer {tokenizer} is not available here: captions go through a word vocabulary instead")
            cfg.model = random_weights(cfg.model)
    vocab = bench_vocab(cfg)
    try:
        rate = gpu_rate(cfg, train_json=train_json, gpu=gpu_name or DEFAULT_GPU, mfu=mfu)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-data-") as tmp:
        if cache:
            caches = {"cache": storage.join(storage.absolute(cache), SHARDS)}
            if not storage.list_files(caches["cache"], ".parquet"):
                raise click.UsageError(
                    f"no Parquet shards under {caches['cache']}: is {cache} a preprocess --out folder?"
                )
        else:
            _init_ray()
            rows = batches * cfg.train.batch_size
            v = cfg.data.video
            caches = {}
            for codec in ("raw", "jpeg"):
                click.echo(
                    f"writing a synthetic {codec} cache of {rows} clips ({v.train_draws} draws x {v.num_frames} frames "
                    f"of {v.size} px{f', quality {v.jpeg_quality}' if codec == 'jpeg' else ''}) ..."
                )
                c = cfg.model_copy(deep=True)
                c.data.video.cache_codec = codec
                base = storage.join(storage_uri, f"bench-data-{codec}") if storage_uri else f"{tmp}/{codec}"
                caches[codec] = write_synthetic_cache(base, rows, c.data)
        hardware = hardware_name(device) if device.startswith("cuda") else cpu_model()
        click.echo(f"bench data of {config_path or DEMO_CONFIG} on {hardware}")
        result = bench_data(
            cfg, caches, vocab=vocab, device=device, batches=batches, reps=reps, rate=rate, progress=click.echo
        )
        if storage_uri and not cache:
            for shards in caches.values():
                storage.delete_dir(shards)
    result["hardware"] = hardware
    _report(data_table(result), result, json_path)


@bench.command("preprocess")
@_CONFIG
@_SET
@click.option("--clips", default=10000, show_default=True, help="synthetic clips to generate and decode")
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    help="where the clips and caches go (the clips are kept and reused); default: a temporary folder",
)
@click.option("--no-cluster", is_flag=True, help="leave out the run on a 2-node Ray cluster on this machine")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_preprocess_cmd(config_path, overrides, clips, work, no_cluster, json_path) -> None:
    """Preprocessing a large collection: clips/s and each decode worker's peak memory with 1 and 2 decode
    workers, at a tenth and all of the clips, and on a 2-node Ray cluster on this machine. Starts its own Rays."""
    import tempfile

    from gram_ray.bench import cpu_model
    from gram_ray.bench_preprocess import bench_preprocess, preprocess_table
    from gram_ray.demo import DEMO_CONFIG

    # Every node of the 2-node cluster is this machine's 127.0.0.1, and so is the address this process joins it
    # by (else Ray rewrites it into the machine's network address). Ray reads this when it is first imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg = _config(config_path or DEMO_CONFIG, overrides)
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-preprocess-") as tmp:
        where = work or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        try:
            result = bench_preprocess(cfg.data, clips, where, cluster=not no_cluster, progress=click.echo)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    result["hardware"] = cpu_model()
    _report(preprocess_table(result), result, json_path)


@bench.command("fsdp")
@_CONFIG
@_SET
@click.option("--device", default="cpu", show_default=True, help="cpu (gloo) or cuda (NCCL, one GPU a worker)")
@click.option("--workers", default=2, show_default=True, help="processes (ranks) on this machine")
@click.option("--steps", default=3, show_default=True, help="timed optimizer steps per strategy")
@click.option("--warmup", default=1, show_default=True, help="untimed steps first")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_fsdp_cmd(config_path, overrides, device, workers, steps, warmup, json_path) -> None:
    """DDP against FSDP (scaling.strategy) on one machine, without Ray: weights, gradients and AdamW state held per
    rank, peak memory per rank, step time, and how far FSDP's weights end from DDP's after the same steps on the
    same batches. Random weights of the config's architectures (no download)."""
    from gram_ray.bench import hardware_name
    from gram_ray.bench_fsdp import bench_fsdp, fsdp_table
    from gram_ray.demo import DEMO_CONFIG

    cfg = _config(config_path or DEMO_CONFIG, overrides)
    click.echo(f"bench fsdp of {config_path or DEMO_CONFIG} on {hardware_name(device)}")
    try:
        result = bench_fsdp(cfg, workers=workers, steps=steps, warmup=warmup, device=device, progress=click.echo)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _report(fsdp_table(result), result | {"hardware": hardware_name(device)}, json_path)


@bench.command("train")
@_CONFIG
@_SET
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (path c uses the workers' GPUs)")
@click.option("--steps", default=20, show_default=True, help="timed optimizer steps per path")
@click.option("--warmup", default=3, show_default=True, help="untimed steps first (compilation, allocator, pipeline)")
@click.option("--workers", default=1, show_default=True, help="Ray Train workers of path (c), on this node")
@click.option(
    "--paths", default="plain,loop,ray", show_default=True, help="which of plain (a), loop (b), ray (c) to run"
)
@click.option("--pretrained-weights", is_flag=True, help="load the config's pretrained encoders instead of random ones")
@click.option(
    "--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (NVIDIA data-center cards: known)"
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
@click.option(
    "--dry-run", is_flag=True, help="only estimate the GPU memory a step needs per GPU (no GPU, no Ray, no download)"
)
@click.option("--gpu-gib", default=80.0, show_default=True, help="--dry-run: the GPU memory to fit in")
@_VERBOSE
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
    from gram_ray.bench_train import bench_train, train_table
    from gram_ray.demo import DEMO_CONFIG

    if dry_run:
        from gram_ray.memory import estimate_memory, memory_table

        cfg = _config(config_path or DEMO_CONFIG, overrides)
        click.echo(f"estimating the memory of a training step of {config_path or DEMO_CONFIG} (meta device) ...")
        estimates = estimate_memory(cfg)
        click.echo(memory_table(estimates, gpu_gib))
        if json_path:
            json_path.write_text(json.dumps([e.__dict__ | {"total_bytes": e.total_bytes} for e in estimates], indent=2))
        return
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    cfg = _config(config_path or DEMO_CONFIG, overrides)
    _init_ray(verbose)
    try:
        result = bench_train(
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
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _report(train_table(result), result, json_path)


if __name__ == "__main__":
    main()
