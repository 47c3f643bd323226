"""Where a training run is, as a checkpoint records it and a resumed run starts from it.

A checkpoint taken at an epoch's end resumes at the next epoch's start. One taken mid-epoch (train.evals_per_run,
train.checkpoint_every_steps) records the clips every rank had trained on in that epoch and every rank's RNG
state: the resumed run trains on the rest of that epoch (never a clip twice, never one skipped), and a group of
the same size continues its random draws exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gram_ray.config.world import derive_seed
from gram_ray.distributed import get_rank, get_world_size

__all__ = ["TrainState", "restore_rng", "rng_state"]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken, those before a resume included
    epoch: int = 0  # the epoch being trained, or the next one to train
    resumed_ids: frozenset = frozenset()  # the clips of `epoch` trained on before the checkpoint resumed from
    consumed: list[str] = field(default_factory=list)  # this rank's clips of `epoch`, trained on in this run
    # Evaluations this run has reported, those before a resume included: a sweep judges a trial by them (a resumed
    # trial's Tune iteration count starts again at 0 while its training continues from the checkpoint).
    evaluations: int = 0
    skipped_steps: int = 0  # updates left out because a loss or gradient norm was not finite, in this run
    skipped_in_a_row: int = 0
    last_checkpoint_step: int | None = None

    @classmethod
    def load(cls, checkpoint: dict | None) -> TrainState:
        """The state a run starts in: afresh (None), or from a checkpoint's state (load_checkpoint)."""
        if checkpoint is None:
            return cls()
        mid_epoch = not checkpoint.get("epoch_complete", True)
        return cls(
            step=checkpoint["step"],
            epoch=checkpoint["epoch"] if mid_epoch else checkpoint["epoch"] + 1,
            resumed_ids=frozenset(checkpoint["consumed_ids"]) if mid_epoch else frozenset(),
            evaluations=checkpoint.get("evaluations", 0),
            last_checkpoint_step=checkpoint["step"],
        )

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resumed mid-epoch keeps the clips it had trained on
            self.resumed_ids = frozenset()
        self.epoch, self.consumed = epoch, []

    def end_epoch(self) -> None:
        self.resumed_ids, self.consumed = frozenset(), []

    def fields(self, everyone_consumed: list[str] | None) -> dict:
        """save_checkpoint's keyword arguments for this state: mid-epoch with every rank's consumed clips of the
        epoch (everyone_consumed), or at the epoch's end (None)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_complete": everyone_consumed is None,
            "evaluations": self.evaluations,
            "consumed_ids": sorted(self.resumed_ids | set(everyone_consumed or [])),
            "world_size": get_world_size(),
        }

    def stopped(self) -> str:
        """What a run that stops here keeps, for its error message."""
        last = self.last_checkpoint_step
        return "Training stopped here; the checkpoints written before it are untouched" + (
            f" (the last at step {last})" if last is not None else ""
        )


def rng_state(device: torch.device) -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(checkpoint: dict, device: torch.device, seed: int) -> None:
    """A mid-epoch checkpoint of a group of this size: each rank's draws continue exactly. An epoch's end, or a
    group of another size: streams of (seed, step, rank), distinct per rank."""
    states = checkpoint.get("rng_states") or []
    if not checkpoint.get("epoch_complete", True) and len(states) == get_world_size():
        state = states[get_rank()]
        torch.set_rng_state(state["cpu"])
        if device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], device)
    else:
        torch.manual_seed(derive_seed(seed, checkpoint["step"], get_rank()))
