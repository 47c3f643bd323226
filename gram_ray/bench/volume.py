"""`gram-ray bench volume`: forward + backward of the volume loss's logits three ways side by side: the paper's
construction (a k x k Gram matrix and a determinant per pair), gram_volume's closed form, and the cosine InfoNCE of
the same shapes (the floor); with their peak memory."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gram_ray.volume import gram_volume

__all__ = ["paper_volume", "VOLUME_VARIANTS", "bench_volume", "VolumeBenchResult", "volume_table", "volume_json"]


def paper_volume(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The GRAM paper's construction, kept here only as the baseline: every pair's k x k Gram matrix is
    stacked into a [B1, B2, k, k] tensor, then torch.det and sqrt(|det|)."""
    b1, b2 = anchor.shape[0], others[0].shape[0]
    vectors = [anchor, *others]
    rows = []
    for i, u in enumerate(vectors):
        row = []
        for j, v in enumerate(vectors):
            if i == 0 and j == 0:
                entry = (u * u).sum(-1)[:, None].expand(b1, b2)
            elif i == 0:
                entry = u @ v.T
            elif j == 0:
                entry = v @ u.T
            else:
                entry = (u * v).sum(-1)[None, :].expand(b1, b2)
            row.append(entry)
        rows.append(torch.stack(row, -1))
    gram = torch.stack(rows, -2)  # [B1, B2, k, k]
    return torch.det(gram).abs().sqrt()


def _cosine_logits(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    return anchor @ others[0].T


def _volume_logits(fn: Callable) -> Callable:
    return lambda anchor, *others: -fn(anchor, *others)


# name -> (logits function, what it is). All three feed the same bidirectional cross-entropy.
VOLUME_VARIANTS: dict[str, tuple[Callable, str]] = {
    "paper": (_volume_logits(paper_volume), "stacked k x k Gram + torch.det (the paper's code)"),
    "gram_volume": (_volume_logits(gram_volume), "gram_ray.volume.gram_volume"),
    "cosine": (_cosine_logits, "cosine InfoNCE of the same shapes (the floor)"),
}


def _compiled_variants() -> dict[str, tuple[Callable, str]]:
    """The volume and the floor through torch.compile (fullgraph: a graph break is an error). The volume uses
    the static-shape refinement (COMPILED_REFINE pairs per row), as VolumeContrastiveLoss(compile=True) does."""
    from functools import partial

    from gram_ray.loss import COMPILED_REFINE

    volume = torch.compile(partial(gram_volume, refine=COMPILED_REFINE), fullgraph=True)
    return {
        "gram_volume+compile": (
            _volume_logits(volume),
            f"gram_volume, static refinement ({COMPILED_REFINE}/row), compiled",
        ),
        "cosine+compile": (torch.compile(_cosine_logits, fullgraph=True), "cosine floor, compiled"),
    }


def _loss(logits: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    b1, b2 = logits.shape
    logits = logits / temperature
    rows = torch.arange(b1, device=logits.device) % b2
    cols = torch.arange(b2, device=logits.device) % b1
    return 0.5 * (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, cols))


def _inputs(k: int, b1: int, b2: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    anchor = F.normalize(torch.randn(b1, dim, generator=g), dim=-1)
    others = [F.normalize(torch.randn(b2, dim, generator=g), dim=-1) for _ in range(k - 1)]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (anchor, *others)]


def _step(fn: Callable, inputs: list[torch.Tensor]) -> None:
    for t in inputs:
        t.grad = None
    _loss(fn(*inputs)).backward()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_memory(
    variant: str, k: int, b1: int, b2: int, dim: int, device: str, dtype: str, fn: Callable | None = None
) -> int:
    """Peak extra memory of one forward+backward step (inputs excluded)."""
    fn = fn or VOLUME_VARIANTS[variant][0]
    inputs = _inputs(k, b1, b2, dim, device, getattr(torch, dtype))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # The CPU allocator keeps no peak statistic: this runs in a fresh process, so the high-water mark of its
    # resident set during the first step, minus the resident set before it, is the step's peak.
    base = _rss_bytes()
    _step(fn, inputs)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)


def _peak_memory_in_child(args: tuple, threads: int) -> int:
    torch.set_num_threads(threads)
    return _peak_memory(*args)


@dataclass
class VolumeBenchResult:
    variant: str
    description: str
    seconds: float
    peak_bytes: int


def bench_volume(
    *,
    device: str = "cpu",
    k: int = 3,
    b1: int = 256,
    b2: int = 1024,
    dim: int = 512,
    dtype: str = "float32",
    reps: int = 5,
    compile: bool = False,
    progress: Callable[[str], None] = print,
) -> list[VolumeBenchResult]:
    """Forward + backward of the bidirectional loss on each variant's logits.

    Timed repetitions are interleaved (paper, ours, floor, paper, ...) so that a noisy machine slows every
    variant alike and the ratios stay meaningful; the median of each is reported. compile adds the compiled
    volume and floor (their peak memory is measured on CUDA only: on CPU it would need a compile per process)."""
    variants = dict(VOLUME_VARIANTS)
    peaks = {name: 0 for name in variants}
    ctx = mp.get_context("spawn")
    for name in variants:
        progress(f"  {name}: peak memory of one step (k={k}, B1={b1}, B2={b2}, D={dim}, {dtype}, {device}) ...")
        args = (name, k, b1, b2, dim, device, dtype)
        if device.startswith("cuda"):
            peaks[name] = _peak_memory(*args)
        else:
            with ctx.Pool(1) as pool:
                peaks[name] = pool.apply(_peak_memory_in_child, (args, torch.get_num_threads()))
    if compile:  # after the CPU children: a parent that has loaded the compiler makes their baselines meaningless
        variants |= _compiled_variants()
        for name in set(variants) - set(peaks):
            peaks[name] = (
                _peak_memory(name, k, b1, b2, dim, device, dtype, fn=variants[name][0])
                if device.startswith("cuda")
                else 0
            )
    names = list(variants)

    inputs = _inputs(k, b1, b2, dim, device, getattr(torch, dtype))
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: compilation, first-call allocations and kernel selection are not timed
        if name not in VOLUME_VARIANTS:
            progress(f"  {name}: compiling ...")
        _step(variants[name][0], inputs)
    progress(f"  timing {reps} interleaved repetitions of each ...")
    for _ in range(reps):
        for name in names:
            _sync(device)
            start = time.perf_counter()
            _step(variants[name][0], inputs)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return [VolumeBenchResult(name, variants[name][1], statistics.median(times[name]), peaks[name]) for name in names]


def _ratios(results: list[VolumeBenchResult]) -> dict[str, float]:
    by_name = {r.variant: r for r in results}
    ours, paper = by_name["gram_volume"], by_name["paper"]
    ratios = {
        "speedup_vs_paper": paper.seconds / ours.seconds,
        "ratio_to_cosine_floor": ours.seconds / by_name["cosine"].seconds,
        "memory_ratio_vs_paper": ours.peak_bytes / max(paper.peak_bytes, 1),
    }
    if "gram_volume+compile" in by_name:
        compiled, floor = by_name["gram_volume+compile"], by_name["cosine+compile"]
        ratios["compiled_speedup_vs_paper"] = paper.seconds / compiled.seconds
        ratios["compiled_ratio_to_compiled_floor"] = compiled.seconds / floor.seconds
    return ratios


def volume_table(results: list[VolumeBenchResult]) -> str:
    lines = [f"{'variant':<20} {'fwd+bwd ms':>11} {'peak MiB':>9}  what"]
    for r in results:
        peak = f"{r.peak_bytes / 2**20:>9.1f}" if r.peak_bytes else f"{'-':>9}"
        lines.append(f"{r.variant:<20} {r.seconds * 1e3:>11.2f} {peak}  {r.description}")
    ratios = _ratios(results)
    lines.append(
        f"\ngram_volume is {ratios['speedup_vs_paper']:.1f}x faster than the paper's construction, "
        f"{ratios['ratio_to_cosine_floor']:.2f}x the cosine floor, and peaks at {ratios['memory_ratio_vs_paper']:.2f}x "
        "the paper's memory."
    )
    if "compiled_speedup_vs_paper" in ratios:
        lines.append(
            f"compiled: {ratios['compiled_speedup_vs_paper']:.1f}x faster than the paper's construction, "
            f"{ratios['compiled_ratio_to_compiled_floor']:.2f}x the compiled cosine floor."
        )
    return "\n".join(lines)


def volume_json(results: list[VolumeBenchResult], hardware: str, shape: dict) -> dict:
    return {"hardware": hardware, "shape": shape, "results": [r.__dict__ for r in results]} | _ratios(results)
