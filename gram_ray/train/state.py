"""Where a training run is, as a checkpoint records it and a resumed run starts from it.

A checkpoint taken at an epoch's end resumes at the next epoch's start. One taken mid-epoch (train.evals_per_run,
train.checkpoint_every_steps) records the epoch's progress (data/epoch_progress.py: the cache files trained on
whole, as bits, and the ids trained on of the files in progress) and every rank's RNG state: the resumed run
trains on the rest of that epoch (never a clip twice, never one skipped), and a group of the same size continues
its random draws exactly.

Each rank notes the clips it trains on; every rank folds all of them into the epoch's progress (a gather) at each
checkpoint, at the epoch's end, and every FOLD_STEPS steps between, so what a rank holds is bounded by the steps
since the last fold and the progress by the cache's files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gram_ray.config.world import derive_seed
from gram_ray.data.epoch_progress import EpochProgress
from gram_ray.distributed import gather_objects, get_rank, get_world_size

__all__ = ["TrainState", "restore_rng", "rng_state", "resumed_progress", "FOLD_STEPS"]

FOLD_STEPS = 200  # steps between two folds of every rank's clips into the epoch's progress (a small all-gather)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken, those before a resume included
    epoch: int = 0  # the epoch being trained, or the next one to train
    file_rows: dict[str, int] | None = None  # the train cache's {file: rows}; None: rows without files
    resumed: EpochProgress = field(default_factory=EpochProgress)  # of `epoch`, as the checkpoint resumed had it
    progress: EpochProgress = field(default_factory=EpochProgress)  # of `epoch`: resumed + every rank's folded
    consumed: list[str] = field(default_factory=list)  # this rank's clips trained on since the last fold
    consumed_files: list[str] = field(default_factory=list)  # their files (data/epoch_progress.FILE)
    samples: int = 0  # this rank's clips of `epoch` trained on in this run
    # Evaluations this run has reported, those before a resume included: a sweep judges a trial by them (a resumed
    # trial's Tune iteration count starts again at 0 while its training continues from the checkpoint).
    evaluations: int = 0
    skipped_steps: int = 0  # updates left out because a loss or gradient norm was not finite, in this run
    skipped_in_a_row: int = 0
    last_checkpoint_step: int | None = None

    @classmethod
    def load(cls, checkpoint: dict | None, file_rows: dict[str, int] | None = None) -> TrainState:
        """The state a run starts in: afresh (None), or from a checkpoint's state (load_checkpoint)."""
        if checkpoint is None:
            return cls(file_rows=file_rows, resumed=EpochProgress(file_rows), progress=EpochProgress(file_rows))
        mid_epoch = not checkpoint.get("epoch_complete", True)
        resumed = resumed_progress(checkpoint, file_rows) if mid_epoch else EpochProgress(file_rows)
        return cls(
            step=checkpoint["step"],
            epoch=checkpoint["epoch"] if mid_epoch else checkpoint["epoch"] + 1,
            file_rows=file_rows,
            resumed=resumed,
            progress=resumed.copy(),
            evaluations=checkpoint.get("evaluations", 0),
            last_checkpoint_step=checkpoint["step"],
        )

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resumed mid-epoch keeps the clips it had trained on
            self.resumed = EpochProgress(self.file_rows)
        self.epoch, self.progress = epoch, self.resumed.copy()
        self.consumed, self.consumed_files, self.samples = [], [], 0

    def end_epoch(self) -> None:
        self.resumed = EpochProgress(self.file_rows)
        self.progress = EpochProgress(self.file_rows)
        self.consumed, self.consumed_files, self.samples = [], [], 0

    def trained_on(self, files: list[str], ids: list[str]) -> None:
        """This rank trained on these clips (each row's file and id)."""
        self.consumed.extend(ids)
        self.consumed_files.extend(files)
        self.samples += len(ids)

    def fold(self) -> None:
        """Every rank's clips since the last fold into the epoch's progress, on every rank (a collective)."""
        for files, ids in gather_objects((self.consumed_files, self.consumed)):
            self.progress.add(files, ids)
        self.consumed, self.consumed_files = [], []

    def fields(self, mid_epoch: bool) -> dict:
        """save_checkpoint's keyword arguments for this state: mid-epoch with the epoch's progress (fold() first),
        or at the epoch's end."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_complete": not mid_epoch,
            "evaluations": self.evaluations,
            "epoch_progress": self.progress.to_json() if mid_epoch else None,
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


def resumed_progress(checkpoint: dict, file_rows: dict[str, int] | None) -> EpochProgress:
    """A mid-epoch checkpoint's (or its position's) progress of its epoch: its epoch_progress, or the list of ids
    a checkpoint written before it kept (consumed_ids)."""
    if checkpoint.get("epoch_progress") is not None:
        return EpochProgress.from_json(checkpoint["epoch_progress"], file_rows)
    return EpochProgress.of_ids(checkpoint.get("consumed_ids") or [], file_rows)
