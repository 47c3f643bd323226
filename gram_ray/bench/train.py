"""`gram-ray bench train`: end-to-end training throughput of a config's model, three ways side by side.

(a) plain: a minimal PyTorch loop (forward, backward, clip, AdamW) over batches already on the device: the
    ceiling, with no data loading and no framework around the step;
(b) loop:  gram-ray's training loop (`run_training`) fed from the Parquet cache by a plain synchronous reader,
    no Ray: what the loop itself and reading the cache cost;
(c) ray:   TorchTrainer with Ray Data streaming the same cache to the workers: what users run.

All three train the same model (random weights of the config's architectures, so nothing is downloaded) on
the same synthetic cache of the config's shapes, and time every step's phases the same way (StepTimer: a
device sync after each phase). FLOPs of one step come from torch.utils.flop_counter; MFU is against the card's
dense bf16 peak.
"""

from __future__ import annotations

import gc
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from gram_ray.bench.common import (
    bench_config,
    bench_vocab,
    cache_batches,
    hardware_name,
    peak_bf16_tflops,
    write_synthetic_cache,
)
from gram_ray.config import GramConfig
from gram_ray.data.collate import Collate
from gram_ray.data.text import SPECIAL_TOKENS

# The loop's own device transfer and autocast, so every path runs the precision the config asks for (fp16 too).
from gram_ray.model.device import autocast, to_device

__all__ = [
    "PATHS",
    "parquet_batches",
    "step_flops",
    "bench_train",
    "train_table",
]

PATHS = {
    "plain": "(a) plain PyTorch loop, batches already on the device",
    "loop": "(b) run_training fed from the Parquet cache, no Ray",
    "ray": "(c) TorchTrainer + Ray Data streaming the cache",
}


def parquet_batches(shards: str, batch_size: int, collate: Collate) -> Iterator[dict]:
    """Model batches read from a cache's Parquet files in file order, synchronously, without Ray."""
    return (collate(batch) for batch in cache_batches(shards, batch_size))


def step_flops(cfg: GramConfig, vocab, batch: dict, device: torch.device) -> int:
    """FLOPs of one training step's forward and backward on `batch` (matmuls, convolutions, attention), counted
    by torch.utils.flop_counter on an eager copy of the model."""
    from torch.utils.flop_counter import FlopCounterMode

    from gram_ray.model.gram import build_model

    eager = cfg.model_copy(deep=True)
    eager.model.compile = False
    model = build_model(eager, vocab).to(device)
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, cfg):
        model(batch).loss.backward()
    del model
    return counter.get_total_flops()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _plain(cfg: GramConfig, vocab, batches: list[dict], steps: int, warmup: int, device: torch.device) -> dict:
    from gram_ray.model.gram import build_model
    from gram_ray.train.loop import build_optimizer
    from gram_ray.train.step_timer import StepTimer

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab).to(device)
    optimizer, _ = build_optimizer(model, cfg, warmup + steps)  # the same parameter groups as the loop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device, warmup=warmup)
    for i in range(warmup + steps):
        with timer.phase("data"):
            batch = batches[i % len(batches)]
        with autocast(device, cfg):
            with timer.phase("forward"):
                loss = model(batch).loss
            with timer.phase("backward"):
                loss.backward()
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timer.step_done(cfg.worker_batch)
    del model, optimizer
    return timer.summary()


def _loop(cfg: GramConfig, vocab, shards: str, steps_per_epoch: int, device: torch.device) -> dict:
    from gram_ray.train.loop import run_training

    collate = Collate(cfg, vocab, train=True)
    metrics = run_training(
        cfg,
        train_batches=lambda epoch, skip_ids: parquet_batches(shards, cfg.worker_batch, collate),
        val_batches=None,
        steps_per_epoch=steps_per_epoch,
        report=lambda metrics, checkpoint_dir: None,
        vocab=vocab,
        device=device,
    )
    return {k: v for k, v in metrics.items() if k.startswith("time/")}


def _ray(cfg: GramConfig, vocab, shards: str, rows: int, out: Path) -> dict:
    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.train.datasets import TrainingData
    from gram_ray.train.layout import RunLayout
    from gram_ray.train.trainer import build_trainer

    data = TrainingData(train=read_cache(shards), val=None, train_rows=rows, vocab=vocab)
    result = build_trainer(cfg, data, RunLayout.of(cfg, out)).fit()
    return {k: v for k, v in (result.metrics or {}).items() if k.startswith("time/")}


def bench_train(
    cfg: GramConfig,
    *,
    steps: int = 20,
    warmup: int = 3,
    workers: int = 1,
    device: str = "cpu",
    random: bool = True,
    peak_tflops: float | None = None,
    paths: tuple[str, ...] = tuple(PATHS),
    progress: Callable[[str], None] = print,
) -> dict:
    """Samples/s per worker, step-time breakdown, peak GPU memory and MFU of each path; needs a running Ray for
    the synthetic cache and path (c). Returns a JSON-able dict (train_table formats it)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown paths {sorted(unknown)}; known: {list(PATHS)}")
    dev = torch.device(device)
    c = bench_config(cfg, steps=steps, warmup=warmup, workers=workers, device=device, random=random)
    vocab = bench_vocab(c)
    per_worker = warmup + steps
    rows = per_worker * c.worker_batch * workers
    # (a) and (b) run here with the CPU threads each Ray Train worker of (c) gets, so the paths compare alike.
    threads = torch.get_num_threads()
    torch.set_num_threads(c.train.threads_per_worker or 1)
    hardware = hardware_name(device)
    peak = peak_tflops or peak_bf16_tflops(hardware)
    result: dict = {
        "hardware": hardware,
        "device": device,
        "batch_size": c.worker_batch,
        "workers": workers,
        "steps": steps,
        "warmup": warmup,
        "bf16": dev.type == "cuda" and c.train.bf16,
        "compile": c.model.compile,
        "random_weights": random,
        "peak_bf16_tflops": peak,
        "paths": {},
    }
    try:
        _run_paths(c, vocab, result, paths, rows, per_worker, dev, progress)
    finally:
        torch.set_num_threads(threads)
    base = result["paths"].get("plain")
    if base:
        result["ratios"] = {
            f"{name}/plain": entry["samples_per_s"] / base["samples_per_s"]
            for name, entry in result["paths"].items()
            if name != "plain"
        }
    return result


def _run_paths(c: GramConfig, vocab, result: dict, paths, rows: int, per_worker: int, dev, progress) -> None:
    from gram_ray.model.gram import build_model

    steps, warmup, peak = result["steps"], result["warmup"], result["peak_bf16_tflops"]
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-train-") as tmp:
        v, a = c.data.video, c.data.audio
        progress(
            f"  writing a synthetic cache of {rows} clips (frames {v.num_frames}x3x{v.size}x{v.size} uint8, audio "
            f"{a.windows}x{a.window_frames}x{a.mel_bins} float32) ..."
        )
        shards = write_synthetic_cache(tmp, rows, c.data, words=len(vocab) - len(SPECIAL_TOKENS) if vocab else 1000)
        collate = Collate(c, vocab, train=True)
        # (a) cycles through a few real batches held on the device: the right shapes, no loading.
        first = itertools.islice(parquet_batches(shards, c.worker_batch, collate), min(4, per_worker))
        on_device = [to_device(b, dev) for b in first]
        progress("  counting the FLOPs of one step (torch.utils.flop_counter) ...")
        flops = step_flops(c, vocab, on_device[0], dev)
        _free(dev)
        result["model_parameters"] = sum(p.numel() for p in build_model(c.model_copy(deep=True), vocab).parameters())
        result["flops_per_step"] = flops
        for name in paths:
            progress(f"  {PATHS[name]}: {warmup} warm-up + {steps} timed steps of {c.worker_batch} clips ...")
            start = time.perf_counter()
            if name == "plain":
                timing = _plain(c, vocab, on_device, steps, warmup, dev)
            elif name == "loop":
                timing = _loop(c, vocab, shards, per_worker, dev)
            else:
                _free(dev)
                timing = _ray(c, vocab, shards, rows, Path(tmp) / "ray")
            _free(dev)
            if not timing:
                raise RuntimeError(f"path {name} reported no step timings")
            entry = {k.removeprefix("time/"): v for k, v in timing.items()}
            achieved = flops * entry["samples_per_s"] / c.worker_batch
            entry["tflops"] = achieved / 1e12
            entry["mfu"] = achieved / (peak * 1e12) if peak else None
            entry["wall_s"] = time.perf_counter() - start
            result["paths"][name] = entry
            progress(f"    {entry['samples_per_s']:.1f} samples/s per worker, {entry['step_ms']:.1f} ms a step")


def train_table(result: dict) -> str:
    """The bench train result as a text table."""
    lines = [
        f"bench train on {result['hardware']}: {result['model_parameters'] / 1e6:.1f} M parameters, batch "
        f"{result['batch_size']} per worker x {result['workers']} worker(s), {result['steps']} timed steps, "
        f"bf16 {'on' if result['bf16'] else 'off'}, compile {'on' if result['compile'] else 'off'}",
        f"{'path':<52} {'samples/s':>9} {'step ms':>8} {'data':>7} {'fwd':>7} {'bwd':>7} {'optim':>7} "
        f"{'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6}",
    ]
    for name, e in result["paths"].items():
        peak = f"{e['peak_gpu_mib']:>9.0f}" if "peak_gpu_mib" in e else f"{'-':>9}"
        mfu = f"{100 * e['mfu']:>5.1f}%" if e.get("mfu") is not None else f"{'-':>6}"
        lines.append(
            f"{PATHS[name]:<52} {e['samples_per_s']:>9.1f} {e['step_ms']:>8.1f} {e['data_ms']:>7.1f} "
            f"{e['forward_ms']:>7.1f} {e['backward_ms']:>7.1f} {e['optimizer_ms']:>7.1f} {peak} "
            f"{e['tflops']:>8.2f} {mfu}"
        )
    ratios = result.get("ratios", {})
    if ratios:
        lines.append("ratios to (a): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    flops = result["flops_per_step"]
    peak = result["peak_bf16_tflops"]
    lines.append(
        f"FLOPs per step per worker: {flops / 1e12:.3f} T; MFU against "
        + (f"{peak:.0f} TFLOP/s dense bf16" if peak else "no known peak for this device (pass --peak-tflops)")
    )
    return "\n".join(lines)
