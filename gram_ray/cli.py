"""The `gram-ray` command."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gram-ray")
def main() -> None:
    """Train GRAM (Gramian multimodal alignment) models on Ray clusters."""


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
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench_volume_cmd(device, k, b1, b2, dim, dtype, reps, json_path) -> None:
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
    results = bench_volume(device=device, k=k, b1=b1, b2=b2, dim=dim, dtype=dtype, reps=reps, progress=click.echo)
    by_name = {r.variant: r for r in results}
    ours = by_name["gram_volume"]
    click.echo(f"\n{'variant':<12} {'fwd+bwd ms':>11} {'peak MiB':>9}  what")
    for r in results:
        click.echo(f"{r.variant:<12} {r.seconds * 1e3:>11.2f} {r.peak_bytes / 2**20:>9.1f}  {r.description}")
    speedup = by_name["paper"].seconds / ours.seconds
    floor_ratio = ours.seconds / by_name["cosine"].seconds
    memory_ratio = ours.peak_bytes / max(by_name["paper"].peak_bytes, 1)
    click.echo(
        f"\ngram_volume is {speedup:.1f}x faster than the paper's construction, {floor_ratio:.2f}x the cosine floor, "
        f"and peaks at {memory_ratio:.2f}x the paper's memory."
    )
    if json_path:
        payload = {
            "hardware": hardware,
            "shape": {"k": k, "b1": b1, "b2": b2, "dim": dim, "dtype": dtype},
            "results": [r.__dict__ for r in results],
            "speedup_vs_paper": speedup,
            "ratio_to_cosine_floor": floor_ratio,
            "memory_ratio_vs_paper": memory_ratio,
        }
        json_path.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
