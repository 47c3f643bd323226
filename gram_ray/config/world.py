"""How a step's global batch is laid out over the workers there are: the arithmetic of elastic training.

With `scaling.num_workers: [min, max]` Ray Train runs the worker group at any size in that range, and restarts it
at another size when a node is lost or comes back. The run's optimizer step must stay the same whatever the size:
the same number of clips averaged into every update, and the same number of updates in an epoch, so that the
learning-rate schedule, the checkpoints' step numbers and the planned total steps do not move.

gram-ray keeps the step's clips constant with gradient accumulation: each worker's micro-batch (what it holds in
memory at once) never grows past the configured per-worker batch, and a smaller group runs more micro-batches per
step. Growing the per-worker batch instead would keep the contrastive loss's gathered batch whole, but would ask a
worker for up to max/min times the activation memory the config was sized for, exactly when the run is already
recovering from a lost node. The price, stated in the README: under accumulation the volume loss's negatives are
those of one micro-batch gathered over the group (micro_batch x workers clips), so a shrunk group sees fewer
negatives per loss term, as GRAM's own gradient accumulation does.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["WorldPlan", "WorldSizeError", "plan_for_world", "plans_for_range", "derive_seed"]


class WorldSizeError(ValueError):
    """The global batch cannot be laid out over some world size the config allows."""


@dataclass(frozen=True)
class WorldPlan:
    workers: int
    micro_batch: int  # clips a worker holds per forward/backward
    grad_accum: int  # micro-batches a worker runs per optimizer step

    @property
    def step_clips(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum

    def describe(self) -> str:
        accum = f" x {self.grad_accum} micro-batches" if self.grad_accum > 1 else ""
        workers = f"{self.workers} worker" + ("s" if self.workers > 1 else "")
        return f"{workers} x {self.micro_batch} clips{accum} = {self.step_clips} clips a step"


def plan_for_world(step_clips: int, max_micro_batch: int, workers: int) -> WorldPlan:
    """The layout of a step of step_clips clips over `workers` workers: each worker's share (step_clips / workers)
    in the fewest micro-batches of at most max_micro_batch clips that divide it exactly."""
    if step_clips % workers:
        raise WorldSizeError(
            f"a step of {step_clips} clips does not divide over {workers} workers: every worker must train on the "
            "same number of clips"
        )
    share = step_clips // workers
    micro = max(b for b in range(1, min(share, max_micro_batch) + 1) if share % b == 0)
    if micro * workers < 2:
        raise WorldSizeError(
            f"at {workers} worker(s) a micro-batch would hold {micro} clip: the contrastive loss needs at least 2"
        )
    return WorldPlan(workers, micro, share // micro)


def plans_for_range(step_clips: int, max_micro_batch: int, min_workers: int, max_workers: int) -> list[WorldPlan]:
    """The plan of every world size from min_workers to max_workers, or a WorldSizeError naming the first size that
    cannot keep the step (checked when the config is read, so a run never meets it after a lost node)."""
    return [plan_for_world(step_clips, max_micro_batch, w) for w in range(min_workers, max_workers + 1)]


def derive_seed(seed: int, step: int, rank: int) -> int:
    """The torch RNG seed of `rank` when training resumes at `step` on a group of another size than the one that
    saved the RNG states: a function of (seed, step, rank) alone, so every restart at that point draws the same."""
    return zlib.crc32(f"{seed}/{step}/{rank}".encode())
