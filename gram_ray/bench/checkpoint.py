"""`gram-ray bench checkpoint`: how long a checkpoint pauses training, written and uploaded on the training thread
(train.checkpoint_in_background=false, what every checkpoint cost before) against copied to host memory and
stored in the background (the default), side by side in one run.

Each size is a model in host memory: the config's (random weights of its architectures, nothing downloaded), or
a stack of square linear layers of about N parameters (`--size 1e9`; it need not train). With --optimizer, AdamW's
two moments come with it (three times the bytes). Each checkpoint goes through the training loop's own code
(Training.checkpoint: the state gathered, taken, reported) into a storage folder (a local one by default, or
--storage URI) with the upload the workers use (manifest last). The background store runs on one thread, as
Ray Train's upload thread does. Per mode and size:
- pause: the training thread's time in Training.checkpoint (the host copy, and any wait for the last one);
- stored: from taking the checkpoint to the upload's end (what registration waits for).
Checkpoints are spaced so that none waits for another: the pause a run sees when its checkpoints are further
apart than one takes to store (otherwise the next one waits for the last: at most one in flight).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from gram_ray import storage
from gram_ray.config import GramConfig
from gram_ray.model.checkpoint import MANIFEST_FILE, manifest_problem, upload_checkpoint

__all__ = ["MODES", "bench_checkpoint", "checkpoint_table", "parse_size"]

MODES = {
    "synchronous": "written and uploaded on the training thread (train.checkpoint_in_background=false)",
    "background": "copied to host memory, written and uploaded in the background (the default)",
}
CONFIG_SIZE = "config"


def parse_size(text: str) -> str | int:
    """--size: "config" (the config's model) or a parameter count (1e9, 1000000000)."""
    if text == CONFIG_SIZE:
        return CONFIG_SIZE
    try:
        count = int(float(text))
    except ValueError:
        raise ValueError(f"--size {text!r}: give 'config' or a parameter count such as 1e9") from None
    if count < 1024:
        raise ValueError(f"--size {text!r}: a model of at least 1024 parameters")
    return count


def _named(size: str | int) -> str:
    return "the config's model" if size == CONFIG_SIZE else f"{size:,} parameters"


def _linear_stack(parameters: int) -> nn.Module:
    """About `parameters` parameters as square bias-free linear layers of width up to 8192 (uninitialised memory
    filled with a constant: what a checkpoint writes does not depend on the values)."""
    width = min(8192, int(parameters**0.5))
    layers = max(1, round(parameters / width**2))
    model = nn.Sequential(*(nn.Linear(width, width, bias=False, device="meta") for _ in range(layers)))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
    return model


def _model(cfg: GramConfig, size: str | int) -> nn.Module:
    if size == CONFIG_SIZE:
        from gram_ray.bench.common import bench_vocab
        from gram_ray.model.gram import build_model

        return build_model(cfg, bench_vocab(cfg))
    return _linear_stack(size)


def _optimization(cfg: GramConfig, model: nn.Module, optimizer: bool):
    """The loop's Optimization of `model`: AdamW with its moments allocated (one step on zero gradients), or none."""
    from gram_ray.train.step import Optimization
    from gram_ray.train.step_timer import StepTimer

    opt = sched = None
    if optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in model.parameters():
            p.grad = None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    timer = StepTimer(torch.device("cpu"), warmup=0, enabled=False)
    return Optimization(model, opt, sched, None, timer, torch.device("cpu"))


class _Storage:
    """The workers' report, without Ray: rank 0's checkpoint stored on this thread, or on one background thread
    (Ray Train's upload thread), into dest/checkpoint_N with the upload the workers use (manifest last)."""

    def __init__(self, dest: str, background: bool) -> None:
        self.dest, self.background = dest, background
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.folders: list[str] = []
        self.taken: list = []

    def _upload(self, folder: Path) -> None:
        target = storage.join(self.dest, f"checkpoint_{len(self.folders)}-{uuid.uuid4().hex[:6]}")
        fs, path = storage.resolve(target)
        upload_checkpoint(folder, fs, path, target=target)
        self.folders.append(target)

    def report(self, metrics: dict, checkpoint) -> bool:
        if checkpoint is None:
            return False
        self.taken.append(checkpoint)
        if self.pool is None:
            checkpoint.store(self._upload)
            return False
        self.pool.submit(checkpoint.store, self._upload)
        return True


def _state_bytes(opt) -> int:
    tensors = list(opt.model.state_dict().values())
    if opt.optimizer is not None:
        tensors += [v for s in opt.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(cfg: GramConfig, opt, dest: str, background: bool, checkpoints: int, progress) -> dict:
    from gram_ray.train.loop import Training
    from gram_ray.train.state import TrainState

    c = cfg.model_copy(deep=True)
    c.train.checkpoint_in_background = background
    sink = _Storage(dest, background)
    run = Training(c, opt, None, sink.report, lambda metrics: None, None)
    pauses, stored = [], []
    for i in range(checkpoints):
        state = TrainState(step=i + 1)
        with torch.no_grad():  # the step between checkpoints: every weight changes (a copy must not see it)
            for p in opt.model.parameters():
                p.add_(1e-6)
        started = time.perf_counter()
        run.checkpoint({"step": state.step}, state, mid_epoch=False)
        pauses.append(time.perf_counter() - started)
        stored.append(sink.taken[-1].stored.result())  # waited for here: the next checkpoint finds none in flight
        progress(f"  checkpoint {i + 1}/{checkpoints}: pause {pauses[-1]:.3f} s, stored {stored[-1]:.2f} s")
    whole = all(manifest_problem(folder) is None for folder in sink.folders)
    for folder in sink.folders:  # a bench leaves no checkpoints behind
        fs, path = storage.resolve(folder)
        fs.delete_dir(path)
    return {
        "pause_s": statistics.median(pauses),
        "stored_s": statistics.median(stored),
        "pauses_s": pauses,
        "stored_all_s": stored,
        "whole": whole and len(sink.folders) == checkpoints,
    }


def bench_checkpoint(
    cfg: GramConfig, *, sizes: list, optimizer: bool, checkpoints: int, dest: str | None, progress=print
) -> dict:
    """For each size, each mode's median pause and time to stored over `checkpoints` checkpoints."""
    result: dict = {"checkpoints": checkpoints, "optimizer": optimizer, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-checkpoint-") as tmp:
        where = dest or tmp
        for size in sizes:
            progress(f"{_named(size)}: building the model{' and AdamW moments' if optimizer else ''} ...")
            opt = _optimization(cfg, _model(cfg, size), optimizer)
            row = {
                "size": size,
                "parameters": sum(p.numel() for p in opt.model.parameters()),
                "state_bytes": _state_bytes(opt),
            }
            for mode in MODES:
                progress(f"{_named(size)}, {mode}: {checkpoints} checkpoints to {where} ...")
                row[mode] = _measure(cfg, opt, where, mode == "background", checkpoints, progress)
            result["sizes"].append(row)
            del opt
    result["storage"] = dest or "a temporary local folder"
    result["manifest"] = MANIFEST_FILE
    return result


def checkpoint_table(result: dict) -> str:
    mb = 2**20
    lines = [f"{'model':<22} {'state':>9} {'mode':<12} {'pause s':>9} {'stored s':>9}  pause vs synchronous"]
    for row in result["sizes"]:
        sync = row["synchronous"]["pause_s"]
        name = f"{row['parameters'] / 1e6:,.1f} M parameters" + (" (config)" if row["size"] == CONFIG_SIZE else "")
        for mode in MODES:
            r = row[mode]
            ratio = f"{r['pause_s'] / sync:.3f}x" if sync > 0 else "-"
            whole = "" if r["whole"] else "  NOT WHOLE"
            lines.append(
                f"{name:<22} {row['state_bytes'] / mb:>7,.0f}MB {mode:<12} {r['pause_s']:>9.3f} "
                f"{r['stored_s']:>9.2f}  {ratio}{whole}"
            )
    lines.append(
        f"(median of {result['checkpoints']} checkpoints each; state: weights"
        f"{' and AdamW moments' if result['optimizer'] else ' only'}; stored into {result['storage']}; pause: the "
        "training thread's time in the checkpoint; stored: from taking it to the upload's end)"
    )
    return "\n".join(lines)
