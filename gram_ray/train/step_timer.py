"""Where a training step's time goes: waiting for data, forward, backward, optimizer.

GPU kernels run asynchronously, so a phase is timed to a device synchronize at its end. Those syncs cost a
little throughput (the CPU can no longer queue the next phase while the GPU works), so the training loop times
phases only when asked (`train.time_steps`: benchmarks and profiling runs); every path a benchmark compares is
timed the same way.
"""

from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["PHASES", "StepTimer"]

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    """Accumulates each phase's seconds per optimizer step; summary() averages the steps after `warmup` (the
    first steps pay for compilation, allocator growth and the data pipeline's start)."""

    def __init__(self, device: torch.device | None, warmup: int = 2, enabled: bool = True) -> None:
        self.device, self.warmup, self.enabled = device, warmup, enabled
        self.steps: list[tuple[dict[str, float], int]] = []  # (seconds per phase, samples) of each step
        self._current = dict.fromkeys(PHASES, 0.0)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._current[name] += time.perf_counter() - start

    def step_done(self, samples: int) -> None:
        """Close an optimizer step that trained on `samples` clips on this worker."""
        if self.enabled:
            self.steps.append((self._current, samples))
            self._current = dict.fromkeys(PHASES, 0.0)

    def summary(self) -> dict[str, float]:
        """time/<phase>_ms and time/step_ms (means over the timed steps), time/samples_per_s (this worker's
        clips over the timed steps' total time), time/timed_steps, and time/peak_gpu_mib on CUDA."""
        if not self.enabled or not self.steps:
            return {}
        timed = self.steps[self.warmup :] or self.steps
        n = len(timed)
        out = {f"time/{p}_ms": 1000 * sum(s[p] for s, _ in timed) / n for p in PHASES}
        total = sum(sum(s.values()) for s, _ in timed)
        out["time/step_ms"] = 1000 * total / n
        out["time/samples_per_s"] = sum(k for _, k in timed) / total if total > 0 else 0.0
        out["time/timed_steps"] = n
        if self.device is not None and self.device.type == "cuda":
            out["time/peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out
