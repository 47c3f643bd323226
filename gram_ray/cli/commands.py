"""The training and data commands: synth, preprocess, train, tune, evaluate, index, search, evaluate-embeddings,
demo, import-checkpoint, storage uploads. Registered on the `gram-ray` group by gram_ray/cli/__init__.py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gram_ray.cli.common import (
    CONFIG_OPTION,
    SET_OPTION,
    VERBOSE_OPTION,
    check_then_start_ray,
    config_from_options,
    init_ray,
    training_errors,
)


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for videos/, audios/, *.json")
@click.option("--n", "n", default=200, show_default=True, type=click.IntRange(min=16), help="number of clips")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=16), help="frame side in pixels")
@click.option("--seconds", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--val-share",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="share of clips in the val split (groups of 4)",
)
def synth(out, n, seed, size, seconds, val_share) -> None:
    """Generate the synthetic tri-modal dataset (captions that need the audio)."""
    from gram_ray.data.synthetic import generate

    with click.progressbar(length=n, label=f"writing {n} clips to {out}") as bar:
        paths = generate(
            out, n=n, seed=seed, size=size, seconds=seconds, val_share=val_share, progress=lambda i, t: bar.update(1)
        )
    click.echo(json.dumps(paths, indent=2))


@click.command()
@click.option(
    "--split",
    type=click.Choice(["train", "val"]),
    help="decode the config's split into the cache its training run reads (<run.storage_path>/<run.name>/cache/"
    "<split>, or data.cache_dir/<split>): the inputs, settings and mode come from the config, and training then "
    "decodes nothing",
)
@click.option(
    "--annotations",
    "--input",
    "annotations",
    help="without --split: what --source reads, an annotation file or manifest, or shards (a brace pattern such as "
    "s3://b/{00000..00099}.tar, one file, or a folder); a path or storage URI",
)
@click.option(
    "--source",
    type=click.Choice(["gram", "manifest", "webdataset", "parquet"]),
    help="data.source.kind (default: the config's, gram): gram (GRAM's annotation files and media folders), manifest "
    "(rows whose fields data.source.fields maps), webdataset (tar shards, e.g. video2dataset's) or parquet "
    "(video2dataset's Parquet, media bytes in a column)",
)
@click.option("--video-dir", help="folder of the videos (or images): a path or storage URI; none for audio-only sets")
@click.option("--audio-dir", help="folder of separate audio files (a path or URI); else: the videos' tracks")
@click.option("--out", help="cache folder or storage URI (shards/ + report.json); with --split, default its run's")
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--mode",
    type=click.Choice(["eval", "train"]),
    help="without --split: eval (the default): middle frame of each segment; train: random ones (train_draws)",
)
@click.option("--force", is_flag=True, help="decode again even if the cache matches")
@VERBOSE_OPTION
def preprocess(
    split, annotations, source, video_dir, audio_dir, out, config_path, overrides, mode, force, verbose
) -> None:
    """Decode clips with Ray Data into a Parquet cache that every epoch and Tune trial reuses."""
    from gram_ray.cluster.preflight import Need
    from gram_ray.data.manifest import ManifestError
    from gram_ray.data.packed import PACKED
    from gram_ray.data.preprocess import PreprocessError
    from gram_ray.data.preprocess import preprocess as run

    cfg = config_from_options(config_path, [*([f"data.source.kind={source}"] if source else []), *overrides])
    if split:
        if annotations or video_dir or audio_dir or mode:
            raise click.UsageError(
                "--split takes the annotations, media folders and mode from the config (data.*), so that training "
                "finds the cache it would decode: set them there, not with --annotations/--video-dir/--audio-dir/--mode"
            )
        annotations, data, mode = _split_inputs(cfg, split)
        video_dir, audio_dir = cfg.data.video_dir, cfg.data.audio_dir
        out = out or _split_cache(cfg, split)
    else:
        if not annotations or not out:
            raise click.UsageError("give --annotations and --out, or --config with --split")
        data, mode = cfg.data, mode or "eval"
    subtitles = "subtitle" in cfg.model.modalities if data.source.kind in PACKED else None
    key = f"data.{split}_annotations" if split else "--annotations"
    needs = [Need(key, annotations, "inputs", data.source.kind)]
    needs += [Need("data.video_dir" if split else "--video-dir", video_dir, "dir")] if video_dir else []
    needs += [Need("data.audio_dir" if split else "--audio-dir", audio_dir, "dir")] if audio_dir else []
    check_then_start_ray([*needs, Need("--out", out, "writable")], data, verbose)
    try:
        if split:  # through training's own decode of the split: the same inputs, settings and options
            from gram_ray.train.datasets import decode_split

            decode_split(cfg, split, out, log=click.echo, force=force)
        else:
            run(annotations, video_dir, out, data, audio_dir=audio_dir, mode=mode, force=force, log=click.echo,
                subtitles=subtitles)  # fmt: skip
    except (ManifestError, PreprocessError) as e:
        raise click.ClickException(str(e)) from None


def _split_inputs(cfg, split: str):
    from gram_ray.train.datasets import split_inputs

    annotations, data, mode = split_inputs(cfg, split)
    if not annotations:
        raise click.UsageError(f"--split {split}: the config names no data.{split}_annotations")
    return annotations, data, mode


def _split_cache(cfg, split: str) -> str:
    """Where a training run of cfg reads the split's cache (its RunLayout): knowable here only when shared."""
    from gram_ray.train.layout import RunLayout

    if not (cfg.data.cache_dir or cfg.run.storage_path):
        raise click.UsageError(
            "--split: set run.storage_path (the run's caches go beside its checkpoints) or data.cache_dir, where "
            "training will read the cache, or give --out"
        )
    return RunLayout.of(cfg, Path.cwd()).cache(split)


@click.command()
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--out", type=click.Path(path_type=Path), help="run folder: metrics, result.json, W&B [default: runs/<run.name>]"
)
@click.option(
    "--resume",
    help="a checkpoint folder or storage URI to continue from, or `auto`: the newest whole checkpoint of this run "
    "(--out and run.name), e.g. after the driver was killed; a fresh start if it has none",
)
@VERBOSE_OPTION
def train(config_path, overrides, out, resume, verbose) -> None:
    """Train GRAM with Ray Train (TorchTrainer) on the data the config names."""
    from gram_ray.cluster.preflight import needs_of_config
    from gram_ray.train.console import Console
    from gram_ray.train.loop import main_metric_name
    from gram_ray.train.trainer import fit

    cfg = config_from_options(config_path, overrides)
    out = out or Path("runs") / cfg.run.name
    check_then_start_ray(needs_of_config(cfg), cfg.data, verbose)
    console = Console(click.echo, main_metric=main_metric_name(cfg))
    with training_errors():
        _, summary = fit(cfg, out, resume_from=resume, log=click.echo, console=console)
    click.echo(json.dumps(summary["best_metrics"], indent=2))
    click.echo(f"best checkpoint: {summary['checkpoint']}")


@click.command()
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="sweep folder: trials.csv, best_config.yaml, sweep.png [default: runs/<run.name>-sweep]",
)
@click.option("--resume", is_flag=True, help="continue an interrupted sweep in --out; finished trials are kept")
@VERBOSE_OPTION
def tune(config_path, overrides, out, resume, verbose) -> None:
    """Sweep learning rate, temperature (any config key) with Ray Tune and ASHA, one TorchTrainer per trial."""
    from gram_ray.cluster.preflight import needs_of_config
    from gram_ray.config import ConfigError
    from gram_ray.tune import run_sweep

    cfg = config_from_options(config_path, overrides)
    out = out or Path("runs") / f"{cfg.run.name}-sweep"
    check_then_start_ray(needs_of_config(cfg), cfg.data, verbose)
    try:
        run_sweep(cfg, out, resume=resume, log=click.echo)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@click.command()
@click.option(
    "--checkpoint",
    required=True,
    help="a checkpoint folder or storage URI, or a training run's folder (<run.storage_path>/<run.name>): its best",
)
@click.option("--data", required=True, help="a preprocess --out folder (or storage URI)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the metrics JSON here")
@VERBOSE_OPTION
def evaluate(checkpoint, data, json_path, verbose) -> None:
    """Retrieval metrics of a checkpoint on a Parquet cache (Ray Data batch inference)."""
    from gram_ray.cluster.preflight import Need
    from gram_ray.model.checkpoint import CheckpointError
    from gram_ray.retrieval.inference import check_inputs, evaluate_checkpoint, run_checkpoint
    from gram_ray.retrieval.metrics import results_table, write_metrics

    checkpoint = run_checkpoint(checkpoint)
    needs = [Need("--checkpoint", checkpoint, "checkpoint"), Need("--data", data, "cache")]
    check_then_start_ray(needs, _default_data(), verbose)
    try:
        check_inputs(checkpoint, data)  # and the checkpoint read once here: one that would run code is refused
    except (FileNotFoundError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    metrics = evaluate_checkpoint(checkpoint, data)
    click.echo(results_table(metrics))
    if json_path:
        write_metrics(metrics, json_path)


@click.command()
@click.option(
    "--checkpoint",
    required=True,
    help="the model that embeds: a checkpoint folder or storage URI, or a training run's folder (its best)",
)
@click.option("--data", help="a preprocess --out folder (or storage URI) of the clips to index")
@click.option("--annotations", help="instead of --data: an annotation file, preprocessed first (with --video-dir)")
@click.option("--video-dir", help="with --annotations: the videos' (or images') folder, a path or storage URI")
@click.option("--audio-dir", help="with --annotations: separate audio files, else the videos' tracks")
@click.option("--out", required=True, help="the index folder or storage URI (created, continued or added to)")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="embedding actors (one GPU each when there are GPUs)",
)
@VERBOSE_OPTION
def index(checkpoint, data, annotations, video_dir, audio_dir, out, dtype, workers, verbose) -> None:
    """Embed a collection of clips into a search index: per clip its embeddings, its span's basis for search by
    volume, a thumbnail and where its media are. Rerun to continue; another --data adds its clips."""
    from gram_ray import storage
    from gram_ray.cluster.preflight import Need
    from gram_ray.data.manifest import ManifestError
    from gram_ray.data.preprocess import PreprocessError
    from gram_ray.data.preprocess import preprocess as decode
    from gram_ray.model.checkpoint import CheckpointError, checkpoint_config
    from gram_ray.retrieval.index import SearchIndexError, build_index
    from gram_ray.retrieval.inference import check_inputs, run_checkpoint

    if (data is None) == (annotations is None):
        raise click.UsageError("give either --data (a preprocessed cache) or --annotations with --video-dir")
    checkpoint = run_checkpoint(checkpoint)
    needs = [Need("--checkpoint", checkpoint, "checkpoint")]
    if data:
        needs.append(Need("--data", data, "cache"))
    else:
        needs.append(Need("--annotations", annotations, "inputs"))
        needs += [Need("--video-dir", video_dir, "dir")] if video_dir else []
        needs += [Need("--audio-dir", audio_dir, "dir")] if audio_dir else []
    check_then_start_ray([*needs, Need("--out", out, "writable")], _default_data(), verbose)
    try:
        check_inputs(checkpoint, data or annotations)  # and the checkpoint read once here: refused if it would run code
    except (FileNotFoundError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    try:
        if annotations:
            data = storage.join(out, "caches", Path(str(annotations)).stem)
            click.echo(f"preprocessing {annotations} into {data} with the checkpoint's data settings ...")
            settings = checkpoint_config(checkpoint).data
            decode(annotations, video_dir, data, settings, audio_dir=audio_dir, log=click.echo)
        build_index(checkpoint, data, out, dtype=dtype, workers=workers, log=click.echo)
    except (SearchIndexError, ManifestError, PreprocessError) as e:
        raise click.ClickException(str(e)) from None


@click.command()
@click.argument("query", nargs=-1)
@click.option("--index", "index_dir", required=True, help="an index folder or storage URI (gram-ray index --out)")
@click.option("--queries", "queries_file", type=click.File(), help="a file of queries, one a line")
@click.option("--clip", "clip_id", help="instead of captions: the captions closest to this clip of the index")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(min=1), help="results a query")
@click.option("--score", type=click.Choice(["volume", "cosine"]), default="volume", show_default=True)
@click.option("--rerank", is_flag=True, help="rescore the top eval.rerank_k with the match head (eval.rerank_score)")
@click.option(
    "--rerank-k", type=click.IntRange(min=1), help="how many to rerank (default: the checkpoint's eval.rerank_k)"
)
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


@click.command("evaluate-embeddings")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the metrics JSON here")
def evaluate_embeddings_cmd(directory, json_path) -> None:
    """Metrics of precomputed <modality>.npy embeddings (optional text_to_video.npy)."""
    from gram_ray.retrieval.metrics import evaluate_embeddings, load_embedding_dir, results_table, write_metrics

    try:
        metrics = evaluate_embeddings(*load_embedding_dir(directory))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(results_table(metrics))
    if json_path:
        write_metrics(metrics, json_path)


@click.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path))
@click.option("--modalities", default="text,video,audio", show_default=True, help="text plus one or more others")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="a dataset written earlier by `gram-ray synth` instead of generating the demo's 1000 clips",
)
@CONFIG_OPTION
@SET_OPTION
@VERBOSE_OPTION
def demo(out, modalities, data_dir, config_path, overrides, verbose) -> None:
    """The main job on generated data: synth, preprocess, train (2 workers), evaluate, summarise."""
    from gram_ray.config import ConfigError
    from gram_ray.demo import check_demo_data, demo_config, run_demo

    mods = [m.strip() for m in modalities.split(",") if m.strip()]
    if "text" not in mods or len(mods) < 2 or not set(mods) <= {"text", "video", "audio"}:
        raise click.BadParameter(
            "text and at least one of video, audio (e.g. text,video,audio)", param_hint="--modalities"
        )
    try:  # the data and the config, before Ray starts
        if data_dir is not None:
            check_demo_data(data_dir)
        demo_config(out, mods, config_path, overrides)
    except (FileNotFoundError, ConfigError) as e:
        raise click.UsageError(str(e)) from None
    init_ray(verbose)
    with training_errors():
        run_demo(out, mods, config_path, overrides, log=click.echo, data_dir=data_dir)


@click.command("import-checkpoint")
@click.argument("source")
@click.option("--out", required=True, help="the gram-ray checkpoint folder (or storage URI) to write")
@CONFIG_OPTION
@SET_OPTION
@click.option("--allow-partial", is_flag=True, help="write it even if keys are missing, unexpected or mis-shaped")
def import_checkpoint(source, out, config_path, overrides, allow_partial) -> None:
    """A gram-ray checkpoint from one of GRAM's released checkpoints (e.g. its MSR-VTT or pretrained model), for
    the model --config describes (default configs/msrvtt.yaml: GRAM's encoders). Then train with
    --set model.init_from=OUT."""
    from gram_ray.model.checkpoint import CheckpointError
    from gram_ray.model.gram_checkpoint import import_gram_checkpoint

    default = Path(__file__).resolve().parents[2] / "configs" / "msrvtt.yaml"
    cfg = config_from_options(config_path or default, overrides)
    try:
        import_gram_checkpoint(source, cfg, out, allow_partial=allow_partial, log=click.echo)
    except (CheckpointError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


@click.group()
def storage() -> None:
    """Object storage housekeeping."""


@storage.command("uploads")
@click.argument("prefix")
@click.option("--abort", is_flag=True, help="abort them (their parts are deleted)")
@click.option(
    "--older-than",
    "older_than_h",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="only uploads begun this many hours ago or more (a live writer's upload is younger)",
)
def storage_uploads(prefix, abort, older_than_h) -> None:
    """The unfinished multipart uploads under an s3:// PREFIX (left by killed writers, billed until aborted)."""
    from datetime import timedelta

    from gram_ray.storage.uploads import abort_uploads, now, unfinished_uploads

    try:
        found = unfinished_uploads(prefix, begun_before=now() - timedelta(hours=older_than_h))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for upload in found:
        click.echo(
            f"{upload.initiated:%Y-%m-%d %H:%M:%S}  {upload.parts:5d} parts  {upload.bytes / 1e6:10.1f} MB  "
            + upload.uri
        )
    total = sum(u.bytes for u in found)
    click.echo(
        f"{len(found)} unfinished upload(s) under {prefix} begun over {older_than_h:g} h ago: "
        f"{total / 1e6:.1f} MB of parts"
    )
    if abort and found:
        freed = abort_uploads(found)
        click.echo(f"aborted {len(found)} upload(s): {freed / 1e6:.1f} MB freed")


COMMANDS = [
    storage,
    synth,
    preprocess,
    train,
    tune,
    evaluate,
    index,
    search,
    evaluate_embeddings_cmd,
    demo,
    import_checkpoint,
]


def _default_data():
    """The data settings a check of a command without a config reads its inputs with (GRAM's JSON + media)."""
    from gram_ray.config import DataConfig

    return DataConfig()
