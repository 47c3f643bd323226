"""One optimizer step: the micro-batches' forward and backward (accumulated), gradient clipping, and the update,
left out on every rank together when some rank's loss or gradient norm is not finite."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gram_ray.config import GramConfig
from gram_ray.data.schema import FILES, IDS
from gram_ray.distributed import get_rank, max_over_ranks
from gram_ray.model.device import autocast, to_device
from gram_ray.storage import StorageError
from gram_ray.train.sharding import as_local, micro_batch_sync
from gram_ray.train.state import TrainState
from gram_ray.train.step_timer import StepTimer

__all__ = ["NonFiniteTrainingError", "Optimization", "StepOutput", "accumulate_gradients", "train_step"]


class NonFiniteTrainingError(RuntimeError):
    """train.max_skipped_steps steps in a row had a non-finite loss or gradient norm."""


@dataclass
class Optimization:
    """What a step changes: the (wrapped) model, its optimizer and schedule, fp16's loss scaler, the timer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    timer: StepTimer
    device: torch.device


@dataclass
class StepOutput:
    out: object  # the last micro-batch's GramOutput: its loss, temperature, volumes
    grad_norm: torch.Tensor
    samples: int  # clips this rank trained on in the step


_UNTIMED = StepTimer(None, enabled=False)


def accumulate_gradients(
    model,
    batch: dict,
    grad_accum: int,
    sync: bool,
    timer: StepTimer = _UNTIMED,
    scaler=None,
    sync_every_micro_batch: bool = True,
):
    """Forward and backward of one micro-batch, its loss scaled by 1/grad_accum so that the accumulated gradient
    is the mean over micro-batches. sync: the step's last micro-batch, whose backward reduces the gradients across
    ranks (DDP: only it; FSDP: every micro-batch unless scaling.fsdp_sync says last_micro_batch)."""
    with micro_batch_sync(model, sync, sync_every_micro_batch):
        with timer.phase("forward"):
            out = model(batch)
        with timer.phase("backward"):
            loss = out.loss / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return out


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, device: torch.device) -> bool:
    """Whether every rank's loss and (all-reduced) gradient norm are finite: one flag, max-reduced, so that all
    ranks skip a step together (a rank that stepped alone would leave DDP's replicas apart, and its next
    collectives unmatched). Costs a host sync per step."""
    bad = int(not (torch.isfinite(loss.detach()).all() and torch.isfinite(grad_norm).all()))
    return max_over_ranks(bad, device) == 0


def train_step(
    opt: Optimization, batches: Iterator[dict], state: TrainState, cfg: GramConfig, grad_accum: int, steps_left: int
) -> StepOutput:
    """One optimizer step over grad_accum micro-batches of `batches`; the state counts the step, its clips and any
    skipped update. A skipped step still consumed its batches and counts as a step (the schedule and the data
    position stay where an uninterrupted run has them); only the update is left out."""
    every_micro_batch = cfg.scaling.fsdp_sync == "every_micro_batch"
    samples = 0
    for micro in range(1, grad_accum + 1):
        batch = _next_batch(batches, opt, state, steps_left)
        with autocast(opt.device, cfg):
            out = accumulate_gradients(
                opt.model, batch, grad_accum, micro == grad_accum, opt.timer, opt.scaler, every_micro_batch
            )
        state.trained_on(batch[FILES], batch[IDS])
        samples += len(batch[IDS])
    with opt.timer.phase("optimizer"):
        grad_norm, finite = _update(opt, out.loss, cfg.train.grad_clip)
    _count_update(state, finite, out.loss, grad_norm, cfg.train.max_skipped_steps)
    opt.timer.step_done(samples)
    state.step += 1
    return StepOutput(out, grad_norm, samples)


def _next_batch(batches: Iterator[dict], opt: Optimization, state: TrainState, steps_left: int) -> dict:
    with opt.timer.phase("data"):
        try:
            batch = next(batches, None)
        except StorageError as e:  # the train cache's reads failed past every retry
            raise StorageError(f"step {state.step}: {e}. {state.stopped()}.") from e
        if batch is None:
            raise RuntimeError(
                f"epoch {state.epoch} ran out of batches on rank {get_rank()} with {steps_left} optimizer steps "
                "left: every rank must get steps_per_epoch batches (drop_last, equal shards)"
            )
        return to_device(batch, opt.device)


def _update(opt: Optimization, loss: torch.Tensor, grad_clip: float) -> tuple[torch.Tensor, bool]:
    """Clip and apply the accumulated gradients unless some rank's are not finite; (gradient norm, applied)."""
    if opt.scaler is not None:  # fp16: clip the true gradients
        opt.scaler.unscale_(opt.optimizer)
    # Under FSDP the norm is over every rank's shards (a DTensor, replicated): the global norm as DDP's.
    grad_norm = as_local(torch.nn.utils.clip_grad_norm_(opt.model.parameters(), grad_clip))
    if opt.scaler is not None:
        # fp16 overflow is the scaler's business: it skips that step itself and lowers the scale.
        finite = step_is_finite(loss, torch.zeros(()), opt.device)
        if finite:
            opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        finite = step_is_finite(loss, grad_norm, opt.device)
        if finite:
            opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _count_update(state: TrainState, finite: bool, loss: torch.Tensor, grad_norm, max_skipped: int) -> None:
    """Count a skipped update, saying so on rank 0; stop when max_skipped were skipped in a row."""
    if finite:
        state.skipped_in_a_row = 0
        return
    state.skipped_steps += 1
    state.skipped_in_a_row += 1
    step, in_a_row = state.step + 1, state.skipped_in_a_row
    if get_rank() == 0:
        print(
            f"step {step}: non-finite loss ({loss.item():.4g}) or gradient norm ({float(grad_norm):.4g}) on some "
            f"rank: update skipped on every rank ({in_a_row} in a row, {state.skipped_steps} in this run)",
            flush=True,
        )
    if in_a_row < max_skipped:
        return
    last = state.last_checkpoint_step
    where = (
        f"the last checkpoint was taken at step {last}, with the weights of step {min(last, step - in_a_row)} "
        "(skipped steps leave the weights as they were)"
        if last is not None
        else "no checkpoint was taken in this run"
    )
    raise NonFiniteTrainingError(
        f"training stopped at step {step}: {in_a_row} steps in a row had a non-finite loss or gradient norm "
        f"(train.max_skipped_steps={max_skipped}); {where}. Check the data of these steps, lower train.lr or use "
        "bf16 instead of fp16, then resume from that checkpoint (gram-ray train --resume auto)."
    )
