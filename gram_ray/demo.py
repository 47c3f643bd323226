"""`gram-ray demo`: the main job end to end on data generated here.

synth -> preprocess (Ray Data) -> train (TorchTrainer, 2 workers, tiny encoders) -> evaluate the best
checkpoint (Ray Data batch inference) -> summary.json, plots, and a results table. With
--modalities text,video the same experiment gives the paper's T-V row: the captions need the audio.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gram_ray import storage
from gram_ray.config import GramConfig, load_config
from gram_ray.retrieval.metrics import results_table

__all__ = ["DEMO_CONFIG", "run_demo", "check_demo_data", "demo_config", "plot_curves", "plot_retrieval"]

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_CLIPS, DEMO_VAL_SHARE = 1000, 0.15  # 848 train clips, 152 val clips in 38 groups of 4


def check_demo_data(data_dir: Path) -> dict:
    """The paths of a dataset `gram-ray synth` wrote, or a FileNotFoundError naming what is missing."""
    from gram_ray.data.synthetic import dataset_paths

    paths = dataset_paths(data_dir)
    missing = [p for p in paths.values() if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"--data {data_dir} is not a generated dataset: {', '.join(missing)} missing. Write one with "
            "`gram-ray synth --out DIR`."
        )
    return paths


def _demo_data(out: Path, log, data_dir: Path | None = None) -> dict:
    from gram_ray.data.synthetic import generate

    if data_dir is not None:  # generated earlier (gram-ray synth): e.g. on a machine without PyAV to write video
        paths = check_demo_data(data_dir)
        log(f"synthetic data: using {data_dir}")
        return paths
    data = out / "data"
    marker = data / "done.json"
    if marker.is_file():
        log(f"synthetic data: reusing {data}")
        return json.loads(marker.read_text())
    log(f"synthetic data: writing {DEMO_CLIPS} clips to {data} ...")
    paths = generate(data, n=DEMO_CLIPS, seed=0, val_share=DEMO_VAL_SHARE)
    marker.write_text(json.dumps(paths))
    return paths


def demo_config(out: Path, modalities: list[str], config_path=None, overrides=()) -> GramConfig:
    cfg = load_config(config_path or DEMO_CONFIG, overrides)
    cfg.model.modalities = modalities
    cfg.run.name = "demo-" + "-".join(modalities)
    return cfg


def plot_curves(metrics_path: Path, png: Path, main_metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in metrics_path.read_text().splitlines() if line]
    if lines:  # the last line may have been cut off by a kill mid-append: every other line is whole
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    rows = [json.loads(line) for line in lines]
    train = [r for r in rows if "train/loss" in r and main_metric not in r]
    val = [r for r in rows if main_metric in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["train/temperature"] for r in train], label="temperature")
    axes[1].plot([r["step"] for r in train], [r["train/positive_volume"] for r in train], label="positive volume")
    axes[1].set(title="temperature and mean positive volume", xlabel="step")
    axes[1].legend()
    axes[2].plot([r["step"] for r in val], [r[main_metric] for r in val], marker="o")
    axes[2].set(title=f"val {main_metric.removeprefix('val/')}", xlabel="step", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_retrieval(evaluation: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, t2v, v2t = [], [], []
    for kind, by_name in evaluation.items():
        for name, d in by_name.items():
            names.append(f"{kind}\n{name}")
            t2v.append(d["t2v"]["R@1"])
            v2t.append(d["v2t"]["R@1"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], t2v, width=0.4, label="text-to-video R@1")
    ax.bar([i + 0.2 for i in x], v2t, width=0.4, label="video-to-text R@1")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set(ylim=(0, 100), ylabel="R@1 (%)", title="val retrieval (volume: lower is better; cosine: higher)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _search_demo(checkpoint: str, val_cache: str, run_dir: Path, log) -> Path:
    """What a trained model is for: the val clips indexed, searched by volume, and shown as a gallery page."""
    from gram_ray.retrieval.gallery import write_gallery
    from gram_ray.retrieval.index import build_index
    from gram_ray.retrieval.query import Searcher

    index = run_dir / "index"
    if index.exists():  # another run's checkpoint: its embeddings are not comparable with this one's
        storage.delete_dir(str(index))
    log("indexing the val clips for search (gram-ray index) ...")
    build_index(checkpoint, val_cache, str(index), log=log)
    searcher = Searcher(str(index), device="cpu")
    # Captions of three val clips as the queries: each names one clip; by text and video alone, four would fit.
    captions = searcher.index.captions
    queries = list(dict.fromkeys(captions[i][0] for i in (0, len(captions) // 3, 2 * len(captions) // 3)))
    page = write_gallery(searcher.search(queries, k=5), run_dir / "gallery.html", "gram-ray demo: search by volume")
    log(
        f'search gallery: {page}  (more: gram-ray search --index {index} "a yellow circle moves right ..." --html PAGE)'
    )
    return page


def run_demo(
    out: str | Path, modalities: list[str], config_path=None, overrides=(), log=print, data_dir: Path | None = None
) -> dict:
    from gram_ray.retrieval.inference import evaluate_checkpoint
    from gram_ray.train.console import Console
    from gram_ray.train.layout import RunLayout
    from gram_ray.train.loop import main_metric_name
    from gram_ray.train.trainer import fit

    start = time.perf_counter()
    out = Path(out).resolve()
    run_dir = out / "-".join(modalities)
    paths = _demo_data(out, log, data_dir)
    cfg = demo_config(out, modalities, config_path, overrides)
    cfg.data.train_annotations, cfg.data.val_annotations = paths["train"], paths["val"]
    cfg.data.video_dir, cfg.data.audio_dir = paths["videos"], paths["audios"]
    cfg.data.cache_dir = str(out / "cache")
    layout = RunLayout.of(cfg, run_dir)
    if storage.exists(layout.run_root):  # the demo starts afresh: its previous run's checkpoints go
        storage.delete_dir(layout.run_root)
    result, summary = fit(cfg, run_dir, log=log, console=Console(log, main_metric=main_metric_name(cfg)))
    log("evaluating the best checkpoint on the val split (Ray Data batch inference) ...")
    final_eval = evaluate_checkpoint(summary["checkpoint"], layout.cache("val"))
    plot_curves(layout.metrics, run_dir / "training_curves.png", main_metric_name(cfg))
    plot_retrieval(final_eval, run_dir / "retrieval.png")
    gallery = _search_demo(summary["checkpoint"], layout.cache("val"), run_dir, log)
    report = {
        "modalities": modalities,
        "final_eval": final_eval,
        "main_metric": {main_metric_name(cfg): final_eval["volume"]["-".join(modalities)]["t2v"]["R@1"]},
        "wall_seconds": round(time.perf_counter() - start, 1),
        "paths": {
            "run": str(run_dir),
            "checkpoint": summary["checkpoint"],
            "metrics": str(layout.metrics),
            "training_curves": str(run_dir / "training_curves.png"),
            "retrieval_chart": str(run_dir / "retrieval.png"),
            "index": str(run_dir / "index"),
            "gallery": str(gallery),
            "wandb": str(run_dir / "wandb"),
            "data": str(Path(paths["videos"]).parent),
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2))
    log("\n" + results_table(final_eval))
    log(f"\ndemo {'-'.join(modalities)} finished in {report['wall_seconds']} s; summary: {run_dir / 'summary.json'}")
    return report
