"""The training loop, free of Ray so that tests and notebooks can call it directly.

`run_training` reads top-down: build the model and its optimizer (`build_optimization`), load where the run is
(`TrainState`, train/state.py), then for every step call `train_step` (train/step.py) and ask the `Schedule`
what is due after it: a log line, an evaluation (train/evaluation.py), a checkpoint. It takes a function giving
each epoch's batches and a `report(metrics, checkpoint)` callback (checkpoint: train/checkpointing.py's); the Ray
Train entry point (worker.py) feeds it dataset shards and reports through ray.train.report. Every rank runs the
same code; torch.distributed (set up by Ray Train, torchrun or nothing) decides what is gathered.

Resuming is exact (train/state.py): the resumed run trains on the rest of a checkpoint's epoch, never a clip
twice, never one skipped, and its learning-rate schedule ends at the planned total steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from gram_ray.config import GramConfig
from gram_ray.data.epoch_progress import EpochProgress
from gram_ray.distributed import gather_objects, get_rank, get_world_size
from gram_ray.model.checkpoint import checkpoint_state, init_weights
from gram_ray.model.gram import GramModel, build_model
from gram_ray.storage import StorageError
from gram_ray.train.checkpointing import TakenCheckpoint, stamped_failure
from gram_ray.train.evaluation import evaluate_split, flatten_metrics
from gram_ray.train.preemption import Notices
from gram_ray.train.sharding import gathered_state, is_sharded, load_optimizer_state
from gram_ray.train.state import FOLD_STEPS, TrainState, restore_rng, rng_state
from gram_ray.train.step import Optimization, StepOutput, train_step
from gram_ray.train.step_timer import StepTimer
from gram_ray.train.watchdog import StepWatchdog

__all__ = [
    "Schedule",
    "Training",
    "build_optimization",
    "build_optimizer",
    "lr_factor",
    "main_metric_name",
    "run_training",
    "warmup_steps",
]

# train_batches(epoch, resumed): this rank's batches of an epoch, without the clips `resumed` (an EpochProgress)
# holds: the ones a resumed epoch already trained on (empty, and falsy, for an epoch started afresh).
TrainBatches = Callable[[int, EpochProgress], Iterable[dict]]


def main_metric_name(cfg: GramConfig) -> str:
    """The metric that picks the best checkpoints and drives Tune: t2v R@1 by volume over every modality."""
    return "val/" + "-".join(cfg.model.modalities) + "/t2v/R@1"


def warmup_steps(cfg: GramConfig, total_steps: int) -> int:
    t = cfg.train
    steps = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    if steps > total_steps:
        raise ValueError(
            f"train.warmup_steps={steps} is longer than the whole run ({total_steps} optimizer steps): the learning "
            "rate would never reach its peak. Lower train.warmup_steps, or use train.warmup_ratio (e.g. 0.1)."
        )
    return steps


def lr_factor(step: int, warmup: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup to 1, then
    linear or cosine decay reaching 0 at total_steps (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: GramModel, cfg: GramConfig, total_steps: int):
    t = cfg.train
    pretrained = {id(p) for p in model.pretrained_parameters()}
    vision = {id(p) for p in model.vision.parameters()} if model.vision is not None else set()
    vision_lr = t.vision_lr or t.encoder_lr
    groups: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            # Pretrained encoders at their own lr (GRAM: the vision tower at clip_lr, the rest at 2e-5), new layers
            # at lr; no weight decay on biases, norms and the temperature.
            lr = (vision_lr if id(p) in vision else t.encoder_lr) if id(p) in pretrained else t.lr
            groups.setdefault((lr, p.ndim >= 2), []).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": ps, "lr": lr, "weight_decay": t.weight_decay if decay else 0.0}
            for (lr, decay), ps in groups.items()
        ],
        betas=t.betas,
        eps=t.eps,
    )
    warmup = warmup_steps(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, t.schedule)
    )
    return optimizer, scheduler


def _unwrap(model) -> GramModel:
    return model.module if hasattr(model, "module") else model


@dataclass(frozen=True)
class Schedule:
    """How long a run is, and what is due after a step: a log line, an evaluation, a checkpoint.

    train.evals_per_run: that many evaluations spread evenly over the run's steps (GRAM's valid_freq), the last at
    its end, each with its checkpoint; otherwise one every eval_every_epochs epochs, at the epoch's end. Only whole
    accumulation groups make a step: a partial group's gradients would leak into the next epoch."""

    total_steps: int
    epochs: int  # a fractional last epoch stops early
    updates_per_epoch: int
    eval_steps: frozenset[int]
    log_every: int
    checkpoint_every: int | None
    eval_every_epochs: int

    @classmethod
    def of(cls, cfg: GramConfig, steps_per_epoch: int, grad_accum: int) -> Schedule:
        t = cfg.train
        updates_per_epoch = steps_per_epoch // grad_accum
        if updates_per_epoch < 1:
            raise ValueError(
                f"an epoch has {steps_per_epoch} batches per worker, fewer than train.grad_accum={grad_accum}: "
                "lower train.grad_accum or train.batch_size"
            )
        total = max(1, round(t.epochs * updates_per_epoch))
        n = t.evals_per_run
        evals = frozenset(round(total * i / n) for i in range(1, n + 1)) if n else frozenset()
        epochs = math.ceil(total / updates_per_epoch)
        return cls(total, epochs, updates_per_epoch, evals, t.log_every_steps, t.checkpoint_every_steps,
                   t.eval_every_epochs)  # fmt: skip

    def epoch_end(self, epoch: int) -> int:
        """The step at which `epoch` ends."""
        return min((epoch + 1) * self.updates_per_epoch, self.total_steps)

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0

    def evaluation_due(self, step: int, epoch: int) -> bool:
        """An evaluation (and its checkpoint) mid-epoch: one of train.evals_per_run's."""
        return step in self.eval_steps and step < self.epoch_end(epoch)

    def checkpoint_due(self, step: int, epoch: int) -> bool:
        """A checkpoint without an evaluation, mid-epoch: train.checkpoint_every_steps."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < self.epoch_end(epoch)

    def epoch_evaluation_due(self, epoch: int, step: int) -> bool:
        """An evaluation and checkpoint at the end of `epoch` (always after the last)."""
        periodic = step in self.eval_steps if self.eval_steps else (epoch + 1) % self.eval_every_epochs == 0
        return periodic or epoch + 1 == self.epochs


def build_optimization(
    cfg: GramConfig, vocab, checkpoint: dict | None, device: torch.device, prepare_model: Callable, total_steps: int
) -> Optimization:
    """The model (its weights: a checkpoint's, or model.init_from's, or the seed's), wrapped by prepare_model (DDP,
    FSDP), with its optimizer, learning-rate schedule and fp16 loss scaler, in the checkpoint's state if any."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg, vocab)
    if checkpoint is None and cfg.model.init_from:
        init_weights(model, cfg.model.init_from, log=print if get_rank() == 0 else lambda line: None)
    model = model.to(device)
    if checkpoint is not None:  # whole weights, before DDP copies them or FSDP shards them
        model.load_state_dict(checkpoint["model"])
    # The optimizer is built on the prepared model's parameters: FSDP replaces each by its shard.
    model = prepare_model(model)
    optimizer, scheduler = build_optimizer(_unwrap(model), cfg, total_steps)
    # fp16 autocast needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda") if t.fp16 and device.type == "cuda" else None
    if checkpoint is not None:
        load_optimizer_state(model, optimizer, checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
    timer = StepTimer(device, warmup=t.time_warmup_steps, enabled=t.time_steps)
    return Optimization(model, optimizer, scheduler, scaler, timer, device)


class Training:
    """What a run does between steps: log, evaluate, checkpoint and report, and count an epoch's clips. It holds
    the run's parts and callbacks; where the run is lives in the TrainState each method is given."""

    def __init__(
        self,
        cfg: GramConfig,
        opt: Optimization,
        vocab,
        report,
        log,
        val_batches,
        notices: Notices | None = None,
        watchdog: StepWatchdog | None = None,
    ) -> None:
        self.cfg, self.opt, self.vocab = cfg, opt, vocab
        self.report, self.log, self.val_batches, self.notices = report, log, val_batches, notices
        self.watchdog = watchdog
        self.in_flight: TakenCheckpoint | None = None  # a checkpoint being stored in the background
        # The last checkpoint's pause of training and its time from taken to stored (rank 0), in the step metrics.
        self.checkpoint_pause_s: float | None = None
        self.checkpoint_stored_s: float | None = None
        # Stored in the background, a checkpoint needs a copy of its own; FSDP's gathered state is one already.
        self.copy_to_host = cfg.train.checkpoint_in_background and not is_sharded(opt.model)
        self.rank0 = get_rank() == 0
        self.metric_name = main_metric_name(cfg)
        self.window_start, self.window_clips, self.epoch_start = time.perf_counter(), 0, time.perf_counter()

    def start_epoch(self) -> None:
        self.opt.model.train()
        self.window_start, self.window_clips = time.perf_counter(), 0
        self.epoch_start = self.window_start

    def after_step(self, done: StepOutput, state: TrainState, schedule: Schedule, last: dict) -> dict:
        """The step's metrics, logged on rank 0, when a log line is due; else the last ones."""
        step_clips = done.samples * get_world_size()  # every rank trains on as many (equal shards, drop_last)
        self.window_clips += step_clips
        if not schedule.log_due(state.step):
            return last
        out, opt = done.out, self.opt
        metrics = {
            "step": state.step,
            "total_steps": schedule.total_steps,
            "epoch": state.epoch,
            "train/loss": out.loss.item(),
            "train/temperature": out.temperature.item(),
            "train/lr": opt.scheduler.get_last_lr()[-1],
            "train/positive_volume": out.positive_volume.mean().item(),
            "train/grad_norm": float(done.grad_norm),
            "train/samples_per_s": self.window_clips / (time.perf_counter() - self.window_start),
            "train/step_clips": step_clips,  # the global batch of this step, whatever the world size
            "train/skipped_steps": state.skipped_steps,
        }
        if self.checkpoint_pause_s is not None:
            metrics["checkpoint/pause_s"] = self.checkpoint_pause_s
        if self.checkpoint_stored_s is not None:
            metrics["checkpoint/stored_s"] = self.checkpoint_stored_s
        if out.matching_loss is not None:
            metrics["train/matching_loss"] = out.matching_loss.item()
        if out.refine_overflow is not None:  # synced here, at the log interval only
            metrics["train/refine_overflow"] = int(out.refine_overflow)
        if self.rank0:
            self.log(metrics)
        self.window_start, self.window_clips = time.perf_counter(), 0
        return metrics

    def watched(self, batches: Iterator[dict]) -> Iterator[dict]:
        """An epoch's batches, each wait for the next one known to the step watchdog as a read."""
        return self.watchdog.reads(batches) if self.watchdog is not None else batches

    def step_took(self, seconds: float) -> None:
        """A step is done: the watchdog's clock restarts, and a notice's judgement learns how long one takes."""
        if self.notices is not None:
            self.notices.step_took(seconds)
        if self.watchdog is not None:
            self.watchdog.step_done()

    def not_a_step(self):
        """An evaluation or a checkpoint: the step watchdog does not time it."""
        return self.watchdog.pause() if self.watchdog is not None else contextlib.nullcontext()

    def evaluate(self, metrics: dict, state: TrainState) -> dict:
        """metrics plus the val split's (every rank takes part); the main metric is always present."""
        with self.not_a_step():
            return self._evaluate(metrics, state)

    def _evaluate(self, metrics: dict, state: TrainState) -> dict:
        if self.val_batches is not None:
            model = _unwrap(self.opt.model)
            try:
                evaluation = evaluate_split(model, self.val_batches(), self.opt.device, self.cfg)
            except StorageError as e:  # the val cache's reads failed past every retry
                raise StorageError(f"step {state.step}: {e}. {state.stopped()}.") from e
            metrics = metrics | flatten_metrics(evaluation, "val")
            metrics["val_eval"] = json.dumps(evaluation)
            if self.rank0:
                val = {k: v for k, v in metrics.items() if k.startswith("val/")}
                self.log(val | {"step": metrics["step"], "epoch": metrics.get("epoch", 0)})
        metrics.setdefault(self.metric_name, 0.0)
        return metrics

    def evaluate_and_checkpoint(self, last: dict, state: TrainState, mid_epoch: bool) -> dict:
        state.evaluations += 1
        metrics = self.evaluate({**last, "step": state.step, "epoch": state.epoch} | self.opt.timer.summary(), state)
        self.checkpoint(metrics, state, mid_epoch)
        return metrics

    def checkpoint(self, metrics: dict, state: TrainState, mid_epoch: bool) -> None:
        """Report metrics with a checkpoint of the state (rank 0 takes it; every rank reports). Mid-epoch, every
        rank contributes its clips of the epoch and its RNG state: a collective. Training waits only for the
        state's host copy when the report stores it in the background (train/checkpointing.py)."""
        started = time.perf_counter()
        with self.not_a_step():
            self._checkpoint(metrics, state, mid_epoch)
        if self.rank0:
            self.checkpoint_pause_s = time.perf_counter() - started

    def _checkpoint(self, metrics: dict, state: TrainState, mid_epoch: bool) -> None:
        stopped = state.stopped()  # should this checkpoint fail: the run keeps the ones before it
        previous, state.last_checkpoint_step = state.last_checkpoint_step, state.step
        metrics["train/skipped_steps"] = state.skipped_steps
        metrics["evaluations"] = state.evaluations
        if mid_epoch:
            state.fold()  # every rank's clips of the epoch so far
        rng_states = gather_objects(rng_state(self.opt.device)) if mid_epoch else None
        model_state, optimizer_state = gathered_state(self.opt.model, self.opt.optimizer)  # FSDP: shards to rank 0
        if not self.rank0:
            self.report(metrics, None)
            return
        self.wait_for_stored()  # at most one in flight, so host memory holds one copy; its failure is raised here
        try:
            taken = TakenCheckpoint.take(
                checkpoint_state(
                    model_state, self.cfg, self.vocab, optimizer_state=optimizer_state, scheduler=self.opt.scheduler,
                    scaler=self.opt.scaler, rng_states=rng_states, **state.fields(mid_epoch),
                ),
                self.cfg, state.step, stopped, copy=self.copy_to_host,
            )  # fmt: skip
            del model_state, optimizer_state
            in_background = self.report(metrics, taken)
        except OSError as e:  # disk full, permission denied, storage unreachable: stop, saying what to do
            state.last_checkpoint_step = previous
            failure = stamped_failure(e, state.step, stopped)
            if failure is e:  # stamped where it failed (TakenCheckpoint.store)
                raise
            raise failure from e
        if in_background:
            self.in_flight = taken
        else:
            taken.settle()  # stored, or written where the caller wanted it, before report returned
        taken.stored.add_done_callback(self._checkpoint_stored)

    def _checkpoint_stored(self, stored) -> None:
        """From the thread that stored it: how long it took, for the step metrics and should a notice come."""
        if stored.exception() is None:
            self.checkpoint_stored_s = stored.result()
            if self.notices is not None:
                self.notices.checkpoint_took(self.checkpoint_stored_s)

    def wait_for_stored(self) -> None:
        """The checkpoint stored in the background (if one is in flight) is whole and registered; its failure is
        raised here, on the training thread."""
        if self.in_flight is not None:
            taken, self.in_flight = self.in_flight, None
            taken.stored.result()

    def heed_notice(self, last: dict, state: TrainState, epoch: int) -> None:
        """After a step mid-epoch: a preemption notice (Notices) is met with a checkpoint at the last step there
        is time for, then a wait for the restart (a collective: every rank calls it after every step)."""

        def checkpoint() -> None:
            if state.last_checkpoint_step != state.step:  # not when this step's scheduled one was just written
                self.checkpoint({**last, "step": state.step, "epoch": epoch}, state, mid_epoch=True)

        if self.notices is not None:
            self.notices.heed(state.step, checkpoint, self.rank0)

    def epoch_metrics(self, state: TrainState) -> dict:
        """Every rank's clips of the epoch (with those a resumed epoch had trained on before), each counted once: a
        reported check that the epoch trained every clip of the split once (drop_last leaves out the remainder).
        With them the epoch's throughput and the largest peak RSS of any rank (memory a worker needs)."""
        state.fold()
        parts = gather_objects((state.samples, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        return {
            "train/epoch_clips": state.progress.trained,
            "train/epoch_repeats": state.progress.repeats,
            "train/epoch_samples_per_s": sum(n for n, _ in parts) / (time.perf_counter() - self.epoch_start),
            "train/peak_rss_mb": max(rss for _, rss in parts),  # Linux reports ru_maxrss in KiB
        }


def run_training(
    cfg: GramConfig,
    *,
    train_batches: TrainBatches,
    val_batches: Callable[[], Iterable[dict]] | None,
    steps_per_epoch: int,
    report: Callable[[dict, TakenCheckpoint | None], bool | None],
    vocab: list[str] | None = None,
    resume: dict | None = None,
    device: torch.device | None = None,
    prepare_model: Callable = lambda m: m,
    log: Callable[[dict], None] = lambda metrics: None,
    grad_accum: int | None = None,
    notices: Notices | None = None,
    watchdog: StepWatchdog | None = None,
    file_rows: dict[str, int] | None = None,
) -> dict:
    """Train for cfg.train.epochs; returns the last metrics.

    steps_per_epoch: batches per rank in a full epoch (every rank the same). report(metrics, checkpoint) is called
    on every rank at each evaluation and checkpoint, with a TakenCheckpoint from rank 0 only (None elsewhere): it
    stores it (checkpoint.store(upload)) or writes it (checkpoint.write(folder)) before it returns, or returns True
    when it is stored in the background (then the next checkpoint, and the run's end, wait for checkpoint.stored).
    log() gets the step metrics every log_every_steps on rank 0. With train.time_steps, every evaluation's report
    also carries this rank's step-time breakdown (StepTimer.summary: time/...). grad_accum: micro-batches per
    optimizer step at this world size (an elastic run's WorldPlan), default train.grad_accum. resume: a
    checkpoint's state to continue from.
    notices: preemption notices, heeded after every step mid-epoch (train/preemption.py); None: not asked.
    watchdog: told of every step, read and pause (train/watchdog.py); the caller starts and stops it.
    file_rows: the train cache's {file: rows} (its report's file_rows), by which the epoch's progress is recorded
    (data/epoch_progress.py); None: by clip id."""
    device = device or torch.device("cpu")
    grad_accum = grad_accum or cfg.train.grad_accum
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    schedule = Schedule.of(cfg, steps_per_epoch, grad_accum)
    opt = build_optimization(cfg, vocab, resume, device, prepare_model, schedule.total_steps)
    state = TrainState.load(resume, file_rows)
    if resume is not None:
        restore_rng(resume, device, cfg.train.seed)
    run = Training(cfg, opt, vocab, report, log, val_batches, notices, watchdog)
    last: dict = {"step": state.step, "total_steps": schedule.total_steps}
    if cfg.train.first_eval and resume is None and val_batches is not None:
        last = run.evaluate(dict(last), state)  # the starting point (pretrained or imported weights)

    for epoch in range(state.epoch, schedule.epochs):
        state.start_epoch(epoch)
        run.start_epoch()
        batches = run.watched(iter(train_batches(epoch, state.resumed)))
        end = schedule.epoch_end(epoch)
        while state.step < end:
            started = time.perf_counter()
            done = train_step(opt, batches, state, cfg, grad_accum, steps_left=end - state.step)
            run.step_took(time.perf_counter() - started)
            if state.step % FOLD_STEPS == 0:
                state.fold()
            last = run.after_step(done, state, schedule, last)
            if schedule.evaluation_due(state.step, epoch):
                last = run.evaluate_and_checkpoint(last, state, mid_epoch=True)
                opt.model.train()
            elif schedule.checkpoint_due(state.step, epoch):
                run.checkpoint({**last, "step": state.step, "epoch": epoch}, state, mid_epoch=True)
            if state.step < end:  # at an epoch's end its own evaluation comes first; the next step heeds it
                run.heed_notice(last, state, epoch)
        last = last | run.epoch_metrics(state)
        state.end_epoch()
        if schedule.epoch_evaluation_due(epoch, state.step):
            last = run.evaluate_and_checkpoint(last, state, mid_epoch=False)
    run.wait_for_stored()  # the run's last checkpoint whole and registered before it ends
    return last
