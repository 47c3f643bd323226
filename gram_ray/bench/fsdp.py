"""`gram-ray bench fsdp`: DDP and FSDP side by side on one machine, without Ray: memory per rank, step time, and how
far FSDP's weights end from DDP's after the same steps.

W processes (gloo on CPU, NCCL with one GPU each) train a config's model (random weights of its architectures:
nothing is downloaded) for the same steps on the same synthetic batches, once under each strategy, each strategy
in fresh processes so that their peaks do not mix. Each rank reports:
- state bytes: what it holds of the weights, gradients and AdamW moments (its shards under FSDP);
- peak memory: on a GPU torch's peak allocation; on CPU the process's peak RSS (which includes the Python,
  torch and model-building overhead common to both strategies);
- the median step time after the warm-up steps (forward, backward, clipping, AdamW: train.grad_accum
  micro-batches a step, synced as the training loop syncs them).
At the end rank 0 gathers the weights (as a checkpoint does) and the parent compares them with DDP's.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gram_ray.config import GramConfig

__all__ = ["bench_fsdp", "fsdp_table"]

STRATEGIES = ("ddp", "fsdp")


def _synthetic_batches(cfg: GramConfig, vocab, rank: int, count: int) -> list[dict]:
    """`count` micro-batches of this rank, of the config's shapes, seeded by rank (the same for both strategies)."""
    import numpy as np

    from gram_ray.data.collate import Collate
    from gram_ray.data.schema import object_column

    d, n = cfg.data, cfg.worker_batch
    rng = np.random.default_rng([cfg.train.seed, rank])
    words = [w for w in (vocab or []) if not w.startswith("[")] or [f"w{i}" for i in range(1000)]
    collate = Collate(cfg, vocab, train=True)
    batches = []
    for i in range(count):
        rows = {
            "id": np.array([f"r{rank}-{i}-{j}" for j in range(n)], dtype=object),
            "captions": object_column([[" ".join(rng.choice(words, 12))] for _ in range(n)]),
            "frames": rng.integers(0, 256, (n, d.video.num_frames, 3, d.video.size, d.video.size), dtype=np.uint8),
            "audio_fbank": rng.standard_normal((n, d.audio.windows, d.audio.window_frames, d.audio.mel_bins)).astype(
                np.float32
            ),
            "has_audio": np.ones(n, dtype=bool),
        }
        batches.append(collate(rows))
    return batches


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, world: int, strategy: str, cfg: GramConfig, vocab, steps: int, warmup: int, out: str) -> None:
    """One rank of one strategy's run: writes its figures (and, on rank 0, the final weights) under out."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gram_ray.model.device import autocast, to_device
    from gram_ray.model.gram import build_model
    from gram_ray.train.loop import build_optimizer
    from gram_ray.train.sharding import as_local, gathered_state, shard_model
    from gram_ray.train.step import accumulate_gradients

    cuda = torch.cuda.is_available() and cfg.scaling.use_gpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{out}/store-{strategy}", rank=rank,
                            world_size=world)  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab).to(device)
    if strategy == "fsdp":
        model = shard_model(model, cfg, device)
    else:
        model = DistributedDataParallel(model, **({"device_ids": [device]} if cuda else {}))
    plain = model.module if hasattr(model, "module") else model
    optimizer, _ = build_optimizer(plain, cfg, warmup + steps)
    accum = cfg.train.grad_accum
    batches = [to_device(b, device) for b in _synthetic_batches(cfg, vocab, rank, accum)]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    every = cfg.scaling.fsdp_sync == "every_micro_batch"
    times, losses = [], []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            with autocast(device, cfg):
                out_ = accumulate_gradients(model, batch, accum, i == accum - 1, sync_every_micro_batch=every)
        as_local(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
        held = _local_bytes(p for p in model.parameters()) + _local_bytes(
            p.grad for p in model.parameters()
        ) + _local_bytes(v for s in optimizer.state.values() for v in s.values())  # fmt: skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(out_.loss.item())
        print(f"  {strategy} rank {rank}: step {step + 1}/{warmup + steps} {times[-1]:.2f} s", flush=True)
    peak = (
        torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    weights, _ = gathered_state(model, None)
    figures = {
        "state_bytes": held,  # the last step's, before its update: weights, gradients and both moments
        "peak_bytes": peak,
        "step_s": statistics.median(times[warmup:]),
        "losses": losses,
    }
    torch.save(figures, f"{out}/{strategy}-{rank}.pt")
    if rank == 0:
        torch.save(weights, f"{out}/{strategy}-weights.pt")
    dist.barrier()
    dist.destroy_process_group()


def bench_fsdp(cfg: GramConfig, *, workers: int, steps: int, warmup: int, device: str, progress=print) -> dict:
    """DDP then FSDP over `workers` processes; figures per strategy (the worst rank) and FSDP's distance from DDP."""
    import torch.multiprocessing as mp

    from gram_ray.bench.common import bench_config, bench_vocab

    cuda = device.startswith("cuda")
    if cuda and torch.cuda.device_count() < workers:
        raise ValueError(f"--workers {workers} needs {workers} GPUs (NCCL takes one a rank); this machine has "
                         f"{torch.cuda.device_count()}")  # fmt: skip
    c = bench_config(cfg, steps=steps, warmup=warmup, workers=workers, device=device, random=True)
    c.scaling.use_gpu = cuda
    c.train.grad_accum = cfg.train.grad_accum  # accumulation is part of what the strategies do differently
    vocab = bench_vocab(c)
    result: dict = {"workers": workers, "steps": steps, "warmup": warmup, "grad_accum": c.train.grad_accum,
                    "micro_batch": c.worker_batch, "fsdp_sync": c.scaling.fsdp_sync}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-fsdp-") as out:
        for strategy in STRATEGIES:
            progress(f"{strategy}: {workers} processes, {warmup} + {steps} steps ...")
            mp.spawn(_rank, args=(workers, strategy, c, vocab, steps, warmup, out), nprocs=workers, join=True)
            ranks = [torch.load(Path(out) / f"{strategy}-{r}.pt") for r in range(workers)]
            result[strategy] = {
                "state_bytes": max(r["state_bytes"] for r in ranks),
                "peak_bytes": max(r["peak_bytes"] for r in ranks),
                "step_s": max(r["step_s"] for r in ranks),
                "losses": ranks[0]["losses"],
            }
        ddp = torch.load(Path(out) / "ddp-weights.pt")
        fsdp = torch.load(Path(out) / "fsdp-weights.pt")
    result["parameters"] = sum(v.numel() for k, v in ddp.items() if v.is_floating_point())
    result["max_weight_diff"] = max((ddp[k].float() - fsdp[k].float()).abs().max().item() for k in ddp)
    result["max_loss_diff"] = max(
        abs(a - b) for a, b in zip(result["ddp"]["losses"], result["fsdp"]["losses"], strict=True)
    )
    result["peak_measure"] = "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process"
    return result


def fsdp_table(result: dict) -> str:
    mb = 2**20
    lines = [
        f"{'strategy':<9} {'state/rank':>11} {'peak/rank':>10} {'step s':>8}",
    ]
    for s in STRATEGIES:
        r = result[s]
        lines.append(f"{s:<9} {r['state_bytes'] / mb:>9.0f}MB {r['peak_bytes'] / mb:>8.0f}MB {r['step_s']:>8.3f}")
    d, f = result["ddp"], result["fsdp"]
    lines.append(
        f"FSDP/DDP: state {f['state_bytes'] / d['state_bytes']:.2f}x, peak {f['peak_bytes'] / d['peak_bytes']:.2f}x, "
        f"step time {f['step_s'] / d['step_s']:.2f}x; after {result['warmup'] + result['steps']} steps the weights "
        f"differ by at most {result['max_weight_diff']:.2e}, the losses by {result['max_loss_diff']:.2e}"
    )
    lines.append(
        f"({result['parameters'] / 1e6:.1f} M parameters, {result['workers']} ranks, micro-batch "
        f"{result['micro_batch']} x {result['grad_accum']} a step, fsdp_sync {result['fsdp_sync']}; peak: "
        f"{result['peak_measure']}; state: weights, gradients and AdamW moments a rank holds)"
    )
    return "\n".join(lines)
