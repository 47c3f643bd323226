"""The training loop: nanoGPT-short, and free of Ray so that tests and notebooks can call it directly.

`run_training` takes iterables of batches and a `report(metrics, checkpoint_dir)` callback; the Ray Train
entry point `train_loop_per_worker` feeds it dataset shards and reports through ray.train.report. Every rank
runs the same code; torch.distributed (set up by Ray Train, torchrun or nothing) decides what is gathered.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gram_ray import storage
from gram_ray.config import GramConfig, save_config
from gram_ray.data.text import make_tokenizer, tokenize
from gram_ray.distributed import all_gather_no_grad, get_rank, get_world_size, is_distributed
from gram_ray.evaluate import evaluate_embeddings
from gram_ray.model.gram import GramModel

__all__ = [
    "main_metric_name",
    "make_collate",
    "build_model",
    "build_optimizer",
    "run_training",
    "embed_batches",
    "save_checkpoint",
    "load_checkpoint",
    "train_loop_per_worker",
]

STATE_FILE = "state.pt"


def main_metric_name(cfg: GramConfig) -> str:
    """The metric that picks the best checkpoints and drives Tune: t2v R@1 by volume over every modality."""
    return "val/" + "-".join(cfg.model.modalities) + "/t2v/R@1"


def _writable_tensor(values) -> torch.Tensor:
    """A tensor over a batch column; copied only when the array is a read-only zero-copy view of the Arrow cache
    (torch cannot promise not to write into it)."""
    array = np.asarray(values)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _captions(value) -> list[str]:
    return [str(c) for c in (value.tolist() if isinstance(value, np.ndarray) else value)]


def make_collate(tokenizer, cfg: GramConfig, train: bool, seed: int = 0) -> Callable[[dict], dict]:
    """numpy batch (a Parquet cache row per video) -> model batch. Train: one caption drawn per video per step.
    Eval: every caption, with text_to_video mapping each caption to its video."""
    rng = np.random.default_rng(seed)
    use_audio = "audio" in cfg.model.modalities

    def collate(batch: dict) -> dict:
        if use_audio and "has_audio" in batch and not np.all(batch["has_audio"]):
            keep = np.asarray(batch["has_audio"], dtype=bool)  # no audio: cannot take part in an audio volume
            batch = {k: v[keep] for k, v in batch.items()}
        per_video = [_captions(c) for c in batch["captions"]]
        if train:
            texts = [c[rng.integers(len(c))] for c in per_video]
            text_to_video = np.arange(len(per_video))
        else:
            texts = [c for caps in per_video for c in caps]
            text_to_video = np.repeat(np.arange(len(per_video)), [len(c) for c in per_video])
        out = tokenize(tokenizer, texts, cfg.model.max_text_length)
        out["text_to_video"] = torch.from_numpy(text_to_video)
        if "video" in cfg.model.modalities:
            out["frames"] = _writable_tensor(batch["frames"])
        if use_audio:
            out["audio_fbank"] = _writable_tensor(batch["audio_fbank"]).float()
        if "subtitle" in cfg.model.modalities:
            subs = tokenize(tokenizer, [str(s) for s in batch["subtitle"]], cfg.model.max_text_length)
            out["subtitle_input_ids"], out["subtitle_attention_mask"] = subs["input_ids"], subs["attention_mask"]
        out["ids"] = [str(i) for i in batch["id"]]
        return out

    return collate


def build_model(cfg: GramConfig, vocab: list[str] | None) -> GramModel:
    return GramModel(cfg.model, num_frames=cfg.data.video.num_frames, vocab_size=len(vocab) if vocab else None)


def build_optimizer(model: GramModel, cfg: GramConfig, total_steps: int):
    t = cfg.train
    pretrained = {id(p) for p in model.pretrained_parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            # No weight decay on biases, norms and the temperature; pretrained encoders at their own lr.
            groups.setdefault((id(p) in pretrained, p.ndim >= 2), []).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": ps, "lr": t.encoder_lr if is_pre else t.lr, "weight_decay": t.weight_decay if decay else 0.0}
            for (is_pre, decay), ps in groups.items()
        ]
    )

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return 1.0 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _unwrap(model) -> GramModel:
    return model.module if hasattr(model, "module") else model


def _autocast(device: torch.device, cfg: GramConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.bf16)


@torch.no_grad()
def embed_batches(model: GramModel, batches: Iterable[dict], device: torch.device, cfg: GramConfig):
    """Embeddings of every modality for this rank's batches, then gathered from every rank (exact, no grad).
    Returns ({modality: np.ndarray}, text_to_video, video ids)."""
    model.eval()
    parts: dict[str, list] = {}
    text_to_video, ids, offset = [], [], 0
    for batch in batches:
        batch = _to_device(batch, device)
        with _autocast(device, cfg):
            emb = model.embed(batch)
        for m, e in emb.items():
            parts.setdefault(m, []).append(e.float())
        text_to_video.append(batch["text_to_video"].cpu() + offset)
        offset += len(batch["ids"])
        ids.extend(batch["ids"])
    dim = cfg.model.embed_dim
    local = {m: torch.cat(parts[m]) if m in parts else torch.zeros(0, dim, device=device) for m in model.modalities}
    t2v = torch.cat(text_to_video) if text_to_video else torch.zeros(0, dtype=torch.long)
    if is_distributed():
        # Shift this rank's caption -> video indices past the videos of lower ranks, then gather everything.
        counts = [None] * get_world_size()
        dist.all_gather_object(counts, len(ids))
        t2v = t2v + sum(counts[: get_rank()])
        local = {m: all_gather_no_grad(e.contiguous()) for m, e in local.items()}
        t2v = all_gather_no_grad(t2v.to(device)).cpu()
        all_ids = [None] * get_world_size()
        dist.all_gather_object(all_ids, ids)
        ids = [i for part in all_ids for i in part]
    model.train()
    return {m: e.cpu().numpy() for m, e in local.items()}, t2v.numpy(), ids


def _flatten(metrics: dict, prefix: str) -> dict[str, float]:
    flat = {}
    for kind, by_name in metrics.items():
        for name, directions in by_name.items():
            for direction, values in directions.items():
                # Volume metrics are the main ones: val/<modalities>/<direction>/<metric>; cosine ones say so.
                base = f"{prefix}/{name}" if kind == "volume" else f"{prefix}/cosine/{name}"
                for k, v in values.items():
                    flat[f"{base}/{direction}/{k}"] = v
    return flat


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, epoch: int, cfg: GramConfig, vocab):
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "epoch": epoch,
        "config": cfg.model_dump(mode="json"),
        "vocab": vocab,
    }
    torch.save(state, directory / STATE_FILE)
    save_config(cfg, directory / "config.yaml")


def load_checkpoint(directory: str | Path, map_location="cpu") -> dict:
    """A checkpoint's state from a local folder or a storage URI (s3://.../checkpoint_000003)."""
    path = storage.join(directory, STATE_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a gram-ray checkpoint folder?")
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location=map_location, weights_only=False)


def run_training(
    cfg: GramConfig,
    *,
    train_batches: Callable[[int], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]] | None,
    steps_per_epoch: int,
    report: Callable[[dict, Path | None], None],
    vocab: list[str] | None = None,
    resume: dict | None = None,
    device: torch.device | None = None,
    prepare_model: Callable = lambda m: m,
    log: Callable[[dict], None] = lambda metrics: None,
) -> dict:
    """Train for cfg.train.epochs; returns the last metrics. report() is called on every rank at each epoch end
    (and every checkpoint_every_steps), with a checkpoint folder from rank 0 only."""
    t = cfg.train
    device = device or torch.device("cpu")
    torch.manual_seed(t.seed)
    model = build_model(cfg, vocab).to(device)
    total_steps = t.epochs * max(1, steps_per_epoch // t.grad_accum)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    step, start_epoch = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step, start_epoch = resume["step"], resume["epoch"] + 1
    model = prepare_model(model)
    rank0 = get_rank() == 0
    metric_name = main_metric_name(cfg)
    last: dict = {}

    def checkpoint_and_report(metrics: dict, epoch: int) -> None:
        if not rank0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), model, optimizer, scheduler, step, epoch, cfg, vocab)
            report(metrics, Path(tmp))

    for epoch in range(start_epoch, t.epochs):
        model.train()
        window_start, window_samples, micro = time.perf_counter(), 0, 0
        for batch in train_batches(epoch):
            batch = _to_device(batch, device)
            with _autocast(device, cfg):
                out = model(batch)
            (out.loss / t.grad_accum).backward()
            micro += 1
            window_samples += len(batch["ids"]) * get_world_size()
            if micro % t.grad_accum:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % t.log_every_steps == 0:
                elapsed = time.perf_counter() - window_start
                last = {
                    "step": step,
                    "epoch": epoch,
                    "train/loss": out.loss.item(),
                    "train/temperature": out.temperature.item(),
                    "train/lr": scheduler.get_last_lr()[-1],
                    "train/positive_volume": out.positive_volume.mean().item(),
                    "train/grad_norm": float(grad_norm),
                    "train/samples_per_s": window_samples / elapsed,
                }
                if rank0:
                    log(last)
                window_start, window_samples = time.perf_counter(), 0
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                checkpoint_and_report({**last, "step": step, "epoch": epoch}, epoch - 1)
        if (epoch + 1) % t.eval_every_epochs and epoch + 1 < t.epochs:
            continue
        metrics = {**last, "step": step, "epoch": epoch}
        if val_batches is not None:
            emb, text_to_video, _ = embed_batches(_unwrap(model), val_batches(), device, cfg)
            evaluation = evaluate_embeddings(emb, text_to_video)
            metrics |= _flatten(evaluation, "val")
            metrics["val_eval"] = json.dumps(evaluation)
            if rank0:
                log({k: v for k, v in metrics.items() if k.startswith("val/")} | {"step": step, "epoch": epoch})
        metrics.setdefault(metric_name, 0.0)
        checkpoint_and_report(metrics, epoch)
        last = metrics
    return last


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every ray.train.report at INFO with all its metrics (here: ~100 keys and the evaluation
    JSON, twice per epoch), which buries the job's own progress lines; its logger is named by file path."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module logs differently: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: config = {"cfg": GramConfig as a dict, "vocab": [...] | None,
    "steps_per_epoch": int, "output_dir": str}."""
    import ray.data
    import ray.train
    import ray.train.torch

    from gram_ray.tracking import Tracker

    cfg = GramConfig.model_validate(config["cfg"])
    vocab = config.get("vocab")
    ray.data.DataContext.get_current().enable_progress_bars = False  # workers write to logs, not terminals
    _quiet_ray_train_reports()
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    device = ray.train.torch.get_device()
    tokenizer = make_tokenizer(cfg.model.tokenizer or cfg.model.text.pretrained, vocab)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")

    def train_batches(epoch: int):
        return train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            collate_fn=make_collate(tokenizer, cfg, train=True, seed=cfg.train.seed + 1000 * epoch + rank),
            drop_last=True,  # equal steps on every rank, so the gathers in the loss always pair up
            prefetch_batches=cfg.train.prefetch_batches,
        )

    val_cache: list[dict] = []

    def val_batches():
        # The val split is not sharded (sharding drops rows to equalise shards); each rank embeds every
        # world-th batch, and the embeddings are gathered exactly. A rank keeps its collated share in memory
        # after the first pass: re-reading through Ray Data every evaluation costs seconds of fixed overhead.
        if not val_cache:
            collate = make_collate(tokenizer, cfg, train=False)
            batches = val_data.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="numpy")
            val_cache.extend(collate(b) for i, b in enumerate(batches) if i % world == rank)
        return val_cache

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(d)

    tracker = Tracker(cfg, Path(config["output_dir"]), enabled=rank == 0, resume=resume is not None)

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report({k: v for k, v in metrics.items()}, checkpoint=ckpt)

    try:
        run_training(
            cfg,
            train_batches=train_batches,
            val_batches=val_batches if val_data is not None else None,
            steps_per_epoch=config["steps_per_epoch"],
            report=report,
            vocab=vocab,
            resume=resume,
            device=device,
            prepare_model=ray.train.torch.prepare_model,
            log=tracker.log,
        )
    finally:
        tracker.finish()
