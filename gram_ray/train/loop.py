"""The training loop: nanoGPT-short, and free of Ray so that tests and notebooks can call it directly.

`run_training` takes a function giving each epoch's batches and a `report(metrics, checkpoint_dir)` callback;
the Ray Train entry point (trainer.py) feeds it dataset shards and reports through ray.train.report. Every rank
runs the same code; torch.distributed (set up by Ray Train, torchrun or nothing) decides what is gathered.

Resuming is exact: a checkpoint records the optimizer step, the epoch, and, when taken mid-epoch, the clips every
rank has trained on in that epoch and every rank's RNG state. The resumed run trains on the rest of that epoch
(never a clip twice, never one skipped), and its learning-rate schedule ends at the planned total steps.
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gram_ray.config import GramConfig
from gram_ray.config.world import derive_seed
from gram_ray.data.frame_codec import decode_on_device
from gram_ray.data.schema import IDS, MODALITIES, TEXT_TO_VIDEO
from gram_ray.distributed import all_gather_no_grad, get_rank, get_world_size, is_distributed, max_over_ranks
from gram_ray.model.checkpoint import CheckpointWriteError, init_weights, save_checkpoint
from gram_ray.model.gram import GramModel, build_model
from gram_ray.retrieval.metrics import evaluate_embeddings
from gram_ray.storage import StorageError
from gram_ray.train.sharding import as_local, gathered_state, load_optimizer_state, micro_batch_sync, whole_weights
from gram_ray.train.step_timer import StepTimer

__all__ = [
    "main_metric_name",
    "warmup_steps",
    "lr_factor",
    "build_optimizer",
    "accumulate_gradients",
    "run_training",
    "NonFiniteTrainingError",
    "embed_batches",
    "to_device",
    "flatten_metrics",
]

# train_batches(epoch, skip_ids): this rank's batches of an epoch, without the clips in skip_ids (the ones a
# resumed epoch already trained on).
TrainBatches = Callable[[int, frozenset], Iterable[dict]]


class NonFiniteTrainingError(RuntimeError):
    """train.max_skipped_steps steps in a row had a non-finite loss or gradient norm."""


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, device: torch.device) -> bool:
    """Whether every rank's loss and (all-reduced) gradient norm are finite: one flag, max-reduced, so that all
    ranks skip a step together (a rank that stepped alone would leave DDP's replicas apart, and its next
    collectives unmatched). Costs a host sync per step."""
    bad = int(not (torch.isfinite(loss.detach()).all() and torch.isfinite(grad_norm).all()))
    return max_over_ranks(bad, device) == 0


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


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the device; frames a JPEG cache left undecoded (data.video.decode_device: cuda) are
    decoded there, in one batched call."""
    batch = decode_on_device(batch, device)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _unwrap(model) -> GramModel:
    return model.module if hasattr(model, "module") else model


def _autocast(device: torch.device, cfg: GramConfig):
    dtype = torch.float16 if cfg.train.fp16 else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda" and (cfg.train.bf16 or cfg.train.fp16))


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


def _gather_objects(value) -> list:
    """value of every rank, in rank order ([value] without a process group)."""
    if not is_distributed():
        return [value]
    out = [None] * get_world_size()
    dist.all_gather_object(out, value)
    return out


@torch.no_grad()
def embed_batches(
    model: GramModel,
    batches: Iterable[dict],
    device: torch.device,
    cfg: GramConfig,
    fusion_inputs: list | None = None,
):
    """Embeddings of every modality for this rank's batches, then gathered from every rank (exact, no grad).
    Returns ({modality: np.ndarray}, text_to_video, video ids). With a list as fusion_inputs, also keeps this
    rank's (condition features, caption ids, caption mask) of each batch there, for reranking."""
    model.eval()
    parts: dict[str, list] = {}
    text_to_video, ids, offset = [], [], 0
    for batch in batches:
        batch = to_device(batch, device)
        with _autocast(device, cfg):
            emb, condition = model.embed_for_eval(batch, with_condition=fusion_inputs is not None)
            if fusion_inputs is not None:
                text_ids, text_mask = (batch[key] for key in MODALITIES["text"].batch_keys)
                fusion_inputs.append((condition, text_ids, text_mask))
        for m, e in emb.items():
            parts.setdefault(m, []).append(e.float())
        text_to_video.append(batch[TEXT_TO_VIDEO].cpu() + offset)
        offset += len(batch[IDS])
        ids.extend(batch[IDS])
    dim = cfg.model.embed_dim
    local = {m: torch.cat(parts[m]) if m in parts else torch.zeros(0, dim, device=device) for m in model.modalities}
    t2v = torch.cat(text_to_video) if text_to_video else torch.zeros(0, dtype=torch.long)
    if is_distributed():
        # Shift this rank's caption -> video indices past the videos of lower ranks, then gather everything.
        counts = _gather_objects(len(ids))
        t2v = t2v + sum(counts[: get_rank()])
        local = {m: all_gather_no_grad(e.contiguous()) for m, e in local.items()}
        t2v = all_gather_no_grad(t2v.to(device)).cpu()
        ids = [i for part in _gather_objects(ids) for i in part]
    model.train()
    return {m: e.cpu().numpy() for m, e in local.items()}, t2v.numpy(), ids


@torch.no_grad()
def rerank_evaluation(
    model: GramModel, fusion_inputs: list, emb: dict, text_to_video, device: torch.device, cfg: GramConfig
) -> dict:
    """Reranking of the val split: {kind: {"<modalities>": {"t2v": ..., "v2t": ...}}} for the volume of every
    modality, its top cfg.eval.rerank_k rescored by the match head, one kind per score (retrieval/rerank.py).
    Every rank finds the same candidate pairs from the gathered embeddings and scores the pairs whose clip it
    holds (its condition features stay where they were computed; the captions' token ids are gathered), then the
    head's log-odds are summed across ranks."""
    from gram_ray.retrieval.metrics import volume_scores
    from gram_ray.retrieval.rerank import rerank_metrics

    model.eval()
    others = [m for m in model.modalities if m != "text"]
    volumes = volume_scores(torch.as_tensor(emb["text"]), [torch.as_tensor(emb[m]) for m in others])
    condition = torch.cat([c for c, _, _ in fusion_inputs]) if fusion_inputs else None
    length = max_over_ranks(max((ids.shape[1] for _, ids, _ in fusion_inputs), default=1), device)
    local_ids = [F.pad(ids, (0, length - ids.shape[1])) for _, ids, _ in fusion_inputs]
    local_mask = [F.pad(mask, (0, length - mask.shape[1])) for _, _, mask in fusion_inputs]
    empty = torch.zeros(0, length, dtype=torch.long, device=device)
    all_ids = all_gather_no_grad(torch.cat(local_ids) if local_ids else empty)
    all_mask = all_gather_no_grad(torch.cat(local_mask) if local_mask else empty)
    clips = condition.shape[0] if condition is not None else 0
    first_clip = sum(_gather_objects(clips)[: get_rank()])

    def match_log_odds(pairs: torch.Tensor) -> torch.Tensor:
        log_odds = torch.zeros(pairs.shape[0], device=device)
        mine = torch.nonzero((pairs[:, 1] >= first_clip) & (pairs[:, 1] < first_clip + clips)).flatten()
        # split() of an empty tensor gives one empty chunk: a rank that holds no val clip (fewer val batches than
        # ranks) has no condition features to index, and scores nothing.
        for chunk in mine.split(cfg.train.eval_batch_size) if mine.numel() else ():
            caption, clip = pairs[chunk, 0].to(device), pairs[chunk, 1].to(device) - first_clip
            with _autocast(device, cfg):
                logits = model.match_logits(all_ids[caption], all_mask[caption], condition[clip])
            log_odds[chunk.to(device)] = logits.float().diff(dim=-1).squeeze(-1)  # log p / (1 - p)
        if is_distributed():
            dist.all_reduce(log_odds)  # each pair was scored by the one rank holding its clip
        return log_odds.cpu()

    name = "-".join(model.modalities)
    temperature = model.loss_fn.temperature.item()
    by_kind = rerank_metrics(volumes, text_to_video, cfg.eval.rerank_k, match_log_odds, temperature)
    return {kind: {name: metrics} for kind, metrics in by_kind.items()}


def flatten_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    """Metrics JSON -> flat keys: <prefix>/<modalities>/<direction>/<metric> for volume, <prefix>/<kind>/... else."""
    flat = {}
    for kind, by_name in metrics.items():
        for name, directions in by_name.items():
            base = f"{prefix}/{name}" if kind == "volume" else f"{prefix}/{kind}/{name}"
            for direction, values in directions.items():
                for k, v in values.items():
                    flat[f"{base}/{direction}/{k}"] = v
    return flat


def _rng_state(device: torch.device) -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _stopped(last_checkpoint_step: int | None) -> str:
    return "Training stopped here; the checkpoints written before it are untouched" + (
        f" (the last at step {last_checkpoint_step})" if last_checkpoint_step is not None else ""
    )


def run_training(
    cfg: GramConfig,
    *,
    train_batches: TrainBatches,
    val_batches: Callable[[], Iterable[dict]] | None,
    steps_per_epoch: int,
    report: Callable[[dict, Path | None], None],
    vocab: list[str] | None = None,
    resume: dict | None = None,
    device: torch.device | None = None,
    prepare_model: Callable = lambda m: m,
    log: Callable[[dict], None] = lambda metrics: None,
    grad_accum: int | None = None,
) -> dict:
    """Train for cfg.train.epochs; returns the last metrics.

    steps_per_epoch: batches per rank in a full epoch (every rank the same). report() is called on every rank at
    each epoch end (and every checkpoint_every_steps), with a checkpoint folder from rank 0 only. log() gets the
    step metrics every log_every_steps on rank 0. With train.time_steps, every epoch-end report also carries
    this rank's step-time breakdown (StepTimer.summary: time/...). grad_accum: micro-batches per optimizer step
    at this world size (an elastic run's WorldPlan), default train.grad_accum."""
    t = cfg.train
    grad_accum = grad_accum or t.grad_accum
    device = device or torch.device("cpu")
    timer = StepTimer(device, warmup=t.time_warmup_steps, enabled=t.time_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(t.seed)
    model = build_model(cfg, vocab)
    if resume is None and cfg.model.init_from:
        init_weights(model, cfg.model.init_from, log=print if get_rank() == 0 else lambda line: None)
    model = model.to(device)
    updates_per_epoch = steps_per_epoch // grad_accum
    if updates_per_epoch < 1:
        raise ValueError(
            f"an epoch has {steps_per_epoch} batches per worker, fewer than train.grad_accum={grad_accum}: "
            "lower train.grad_accum or train.batch_size"
        )
    total_steps = max(1, round(t.epochs * updates_per_epoch))
    epochs = math.ceil(total_steps / updates_per_epoch)  # a fractional last epoch stops early
    if resume is not None:  # whole weights, before DDP copies them or FSDP shards them
        model.load_state_dict(resume["model"])
    # The optimizer is built on the prepared model's parameters: FSDP replaces each by its shard.
    model = prepare_model(model)
    optimizer, scheduler = build_optimizer(_unwrap(model), cfg, total_steps)
    # fp16 autocast needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda") if t.fp16 and device.type == "cuda" else None
    step, start_epoch, skip_ids = 0, 0, frozenset()
    skipped_steps = skipped_in_a_row = 0  # updates left out because a loss or gradient norm was not finite
    last_checkpoint_step = resume["step"] if resume is not None else None
    # Evaluations this run has reported, those before a resume included: a sweep judges a trial by them (a resumed
    # trial's Tune iteration count starts again at 0 while its training continues from the checkpoint).
    evaluations = resume.get("evaluations", 0) if resume is not None else 0
    if resume is not None:
        load_optimizer_state(model, optimizer, resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step = resume["step"]
        if resume.get("epoch_complete", True):
            start_epoch = resume["epoch"] + 1
        else:  # mid-epoch: the rest of that epoch, in the state every rank had
            start_epoch, skip_ids = resume["epoch"], frozenset(resume["consumed_ids"])
        states = resume.get("rng_states") or []
        if not resume.get("epoch_complete", True) and len(states) == get_world_size():
            _set_rng_state(states[get_rank()], device)  # the same group: its draws continue exactly
        else:  # an epoch's end, or a group of another size: streams of (seed, step, rank), distinct per rank
            torch.manual_seed(derive_seed(t.seed, step, get_rank()))
    sync_every_micro_batch = cfg.scaling.fsdp_sync == "every_micro_batch"
    rank0 = get_rank() == 0
    metric_name = main_metric_name(cfg)
    last: dict = {"step": step, "total_steps": total_steps}

    def checkpoint_and_report(metrics: dict, epoch: int, consumed: list[str] | None) -> None:
        nonlocal last_checkpoint_step
        previous_checkpoint_step, last_checkpoint_step = last_checkpoint_step, step
        metrics["train/skipped_steps"] = skipped_steps
        metrics["evaluations"] = evaluations
        # Mid-epoch (consumed is not None) every rank contributes its clips and RNG state: a collective.
        all_consumed = [i for part in _gather_objects(consumed) for i in part] if consumed is not None else []
        rng_states = _gather_objects(_rng_state(device)) if consumed is not None else None
        model_state, optimizer_state = gathered_state(model, optimizer)  # FSDP: every rank sends rank 0 its shards
        if not rank0:
            report(metrics, None)
            return
        try:
            _save_and_report(metrics, epoch, consumed, all_consumed, rng_states, model_state, optimizer_state)
        except OSError as e:  # disk full, permission denied, storage unreachable: stop, saying what to do
            raise CheckpointWriteError(
                f"step {step}: the checkpoint could not be written or stored ({e}). "
                + _stopped(previous_checkpoint_step)
                + (
                    "."  # a StorageError says what to do
                    if isinstance(e, StorageError)
                    else ". Free space or fix the storage's permissions, then continue with gram-ray train "
                    "--resume auto."
                )
            ) from e

    def _save_and_report(metrics, epoch, consumed, all_consumed, rng_states, model_state, optimizer_state) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                Path(tmp),
                model_state,
                cfg,
                vocab,
                optimizer_state=optimizer_state,
                scheduler=scheduler,
                scaler=scaler,
                step=step,
                epoch=epoch,
                epoch_complete=consumed is None,
                evaluations=evaluations,
                consumed_ids=sorted(skip_ids | set(all_consumed)),
                rng_states=rng_states,
                world_size=get_world_size(),
            )
            report(metrics, Path(tmp))

    def evaluate(metrics: dict) -> dict:
        """metrics plus the val split's (every rank takes part); the main metric is always present."""
        if val_batches is not None:
            plain = _unwrap(model)
            fusion_inputs = [] if cfg.eval.rerank_k and plain.fusion is not None else None
            with whole_weights(plain):  # FSDP: gathered once, so ranks may embed different numbers of batches
                try:
                    emb, text_to_video, _ = embed_batches(plain, val_batches(), device, cfg, fusion_inputs)
                except StorageError as e:  # the val cache's reads failed past every retry
                    raise StorageError(f"step {step}: {e}. {_stopped(last_checkpoint_step)}.") from e
                evaluation = evaluate_embeddings(emb, text_to_video)
                if fusion_inputs is not None:
                    evaluation |= rerank_evaluation(plain, fusion_inputs, emb, text_to_video, device, cfg)
                    plain.train()
            metrics = metrics | flatten_metrics(evaluation, "val")
            metrics["val_eval"] = json.dumps(evaluation)
            if rank0:
                val = {k: v for k, v in metrics.items() if k.startswith("val/")}
                log(val | {"step": metrics["step"], "epoch": metrics.get("epoch", 0)})
        metrics.setdefault(metric_name, 0.0)
        return metrics

    # train.evals_per_run: that many evaluations spread evenly over the run's steps (GRAM's valid_freq), the last
    # at its end; otherwise every eval_every_epochs epochs.
    n = t.evals_per_run
    eval_steps = {round(total_steps * i / n) for i in range(1, n + 1)} if n else set()
    if t.first_eval and resume is None and val_batches is not None:
        last = evaluate(dict(last))  # the starting point (pretrained or imported weights), before any step

    for epoch in range(start_epoch, epochs):
        model.train()
        # Only whole accumulation groups: a partial group's gradients would leak into the next epoch.
        updates_left = min(updates_per_epoch - (step - epoch * updates_per_epoch), total_steps - step)
        consumed: list[str] = []
        window_start, window_samples, micro = time.perf_counter(), 0, 0
        epoch_start = window_start
        batches = iter(train_batches(epoch, skip_ids))
        step_samples = 0
        while updates_left > 0:
            with timer.phase("data"):
                try:
                    batch = next(batches, None)
                except StorageError as e:  # the train cache's reads failed past every retry
                    raise StorageError(f"step {step}: {e}. {_stopped(last_checkpoint_step)}.") from e
                if batch is not None:
                    batch = to_device(batch, device)
            if batch is None:
                raise RuntimeError(
                    f"epoch {epoch} ran out of batches on rank {get_rank()} with {updates_left} optimizer steps "
                    "left: every rank must get steps_per_epoch batches (drop_last, equal shards)"
                )
            micro += 1
            last_micro = micro % grad_accum == 0
            with _autocast(device, cfg):
                out = accumulate_gradients(
                    model, batch, grad_accum, last_micro, timer, scaler, sync_every_micro_batch=sync_every_micro_batch
                )
            consumed.extend(batch[IDS])
            step_samples += len(batch[IDS])
            window_samples += len(batch[IDS]) * get_world_size()
            if not last_micro:
                continue
            with timer.phase("optimizer"):
                if scaler is not None:  # fp16: clip the true gradients
                    scaler.unscale_(optimizer)
                # Under FSDP the norm is over every rank's shards (a DTensor, replicated): the global norm as DDP's.
                grad_norm = as_local(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
                if scaler is not None:
                    # fp16 overflow is the scaler's business: it skips that step itself and lowers the scale.
                    finite = step_is_finite(out.loss, torch.zeros(()), device)
                    if finite:
                        scaler.step(optimizer)
                    scaler.update()
                else:
                    finite = step_is_finite(out.loss, grad_norm, device)
                    if finite:
                        optimizer.step()
                # A skipped step still consumed its batches and counts as a step (the schedule and the data
                # position stay where an uninterrupted run has them); only the update is left out.
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if finite:
                skipped_in_a_row = 0
            else:
                skipped_steps += 1
                skipped_in_a_row += 1
                if rank0:
                    print(
                        f"step {step + 1}: non-finite loss ({out.loss.item():.4g}) or gradient norm "
                        f"({float(grad_norm):.4g}) on some rank: update skipped on every rank "
                        f"({skipped_in_a_row} in a row, {skipped_steps} in this run)",
                        flush=True,
                    )
                if skipped_in_a_row >= t.max_skipped_steps:
                    where = (
                        f"the last checkpoint was taken at step {last_checkpoint_step}, with the weights of step "
                        f"{min(last_checkpoint_step, step + 1 - skipped_in_a_row)} (skipped steps leave the weights as "
                        "they were)"
                        if last_checkpoint_step is not None
                        else "no checkpoint was taken in this run"
                    )
                    raise NonFiniteTrainingError(
                        f"training stopped at step {step + 1}: {skipped_in_a_row} steps in a row had a non-finite "
                        f"loss or gradient norm (train.max_skipped_steps={t.max_skipped_steps}); {where}. Check the "
                        "data of these steps, lower train.lr or use bf16 instead of fp16, then resume from that "
                        "checkpoint (gram-ray train --resume auto)."
                    )
            timer.step_done(step_samples)
            step_clips = step_samples * get_world_size()  # every rank trains on as many (equal shards, drop_last)
            step_samples = 0
            step += 1
            updates_left -= 1
            if step % t.log_every_steps == 0:
                elapsed = time.perf_counter() - window_start
                last = {
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": epoch,
                    "train/loss": out.loss.item(),
                    "train/temperature": out.temperature.item(),
                    "train/lr": scheduler.get_last_lr()[-1],
                    "train/positive_volume": out.positive_volume.mean().item(),
                    "train/grad_norm": float(grad_norm),
                    "train/samples_per_s": window_samples / elapsed,
                    "train/step_clips": step_clips,  # the global batch of this step, whatever the world size
                    "train/skipped_steps": skipped_steps,
                }
                if out.matching_loss is not None:
                    last["train/matching_loss"] = out.matching_loss.item()
                if out.refine_overflow is not None:  # synced here, at the log interval only
                    last["train/refine_overflow"] = int(out.refine_overflow)
                if rank0:
                    log(last)
                window_start, window_samples = time.perf_counter(), 0
            if step in eval_steps and updates_left > 0:  # train.evals_per_run: mid-epoch, with its checkpoint
                evaluations += 1
                last = evaluate({**last, "step": step, "epoch": epoch} | timer.summary())
                checkpoint_and_report(last, epoch, consumed)
                model.train()
            elif t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and updates_left > 0:
                checkpoint_and_report({**last, "step": step, "epoch": epoch}, epoch, consumed)
        # Every rank's clips of the epoch (with those a resumed epoch had trained on before), each counted once: a
        # reported check that the epoch trained every clip of the split once (drop_last leaves out the remainder).
        # With them the epoch's throughput and the largest peak RSS of any rank (memory a worker needs).
        parts = _gather_objects((consumed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        everyone = [i for ids, _ in parts for i in ids]
        distinct = set(everyone)
        last["train/epoch_clips"] = len(distinct | skip_ids)
        last["train/epoch_repeats"] = len(everyone) - len(distinct) + len(distinct & skip_ids)
        last["train/epoch_samples_per_s"] = len(everyone) / (time.perf_counter() - epoch_start)
        last["train/peak_rss_mb"] = max(rss for _, rss in parts)  # Linux reports ru_maxrss in KiB
        skip_ids = frozenset()
        periodic = step in eval_steps if t.evals_per_run else (epoch + 1) % t.eval_every_epochs == 0
        if not (periodic or epoch + 1 == epochs):
            continue
        evaluations += 1
        last = evaluate({**last, "step": step, "epoch": epoch} | timer.summary())
        checkpoint_and_report(last, epoch, None)
    return last
