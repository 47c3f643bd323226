"""How much GPU memory a config's training step needs per GPU, estimated without a GPU (`bench train --dry-run`).

The model is built on the meta device from its architectures (no memory, no download) and one forward pass of
the encoders at the config's batch shapes (and, with the matching loss, the fusion over the 3B caption-clip
pairs) runs there in bf16, counting every tensor autograd saves for the backward pass (each storage once,
parameters excluded). Attention is counted as a fused kernel keeps it on a
GPU (flash / memory-efficient SDPA: q, k, v, the output and the log-sum-exp, never the [heads, N, N] matrix).
Added to that, per trainable parameter: the fp32 weight, its gradient, AdamW's two moments, and DDP's gradient
bucket (frozen parameters: the weight only). Under FSDP (train/sharding.py) the fp32 weights, gradients and
moments are sharded over the workers, and what the code gathers is added back: the root unit's weights in bf16
(kept from forward through backward) with an fp32 gradient buffer, and two transformer blocks at a time (the one
running and the one prefetched), each with its bf16 weights and fp32 gradient buffer; with
scaling.fsdp_sync: last_micro_batch, every weight in bf16 and every gradient in fp32, unsharded. Not counted: the
allocator's fragmentation, the CUDA context (~0.5 GB), kernels' workspaces and the volume loss (B x B:
negligible), so treat the figures as a floor with ~10-15% to spare.

The same meta-device pass counts a training step's FLOPs (training_flops_per_clip): `bench data`'s rate of a GPU
without one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gram_ray.config import GramConfig

__all__ = [
    "MemoryEstimate",
    "static_bytes",
    "estimate_memory",
    "configured_estimate",
    "memory_table",
    "memory_json",
    "training_flops_per_clip",
]

GIB = 2**30


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: the shapes it returns, and what a fused
    (flash) kernel saves for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: counting stops at the forward pass
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class MemoryEstimate:
    name: str
    parameters: int
    trainable: int
    activations_bytes: int
    static_bytes: int  # weights, gradients, optimizer, DDP buckets (sharded under FSDP)

    @property
    def total_bytes(self) -> int:
        return self.activations_bytes + self.static_bytes


def _meta_model(cfg: GramConfig, vocab_size: int | None):
    from gram_ray.model.architectures import random_weights
    from gram_ray.model.gram import GramModel

    shaped = random_weights(cfg.model)
    shaped.compile = False
    with torch.device("meta"):
        return GramModel(
            shaped, num_frames=cfg.data.video.num_frames, vocab_size=vocab_size, image_size=cfg.data.video.size
        )


def _meta_batch(cfg: GramConfig, batch_size: int) -> dict:
    d, text_length = cfg.data, cfg.model.max_text_length
    meta = {"device": "meta"}
    batch = {
        # No attention mask: transformers inspects a mask's values, which meta tensors do not have; every caption
        # at the full length is the worst case anyway.
        "input_ids": torch.zeros(batch_size, text_length, dtype=torch.long, **meta),
        "attention_mask": None,
        "frames": torch.zeros(batch_size, d.video.num_frames, 3, d.video.size, d.video.size, dtype=torch.uint8, **meta),
        "audio_fbank": torch.zeros(
            batch_size, d.audio.windows, d.audio.window_frames, d.audio.mel_bins, dtype=torch.bfloat16, **meta
        ),
    }
    if "subtitle" in cfg.model.modalities:
        batch["subtitle_input_ids"] = batch["input_ids"]
        batch["subtitle_attention_mask"] = None
    return batch


def _saved_activation_bytes(model, batch: dict) -> int:
    params = {id(p.untyped_storage()) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if id(storage) not in params:
            saved[id(storage)] = storage.nbytes()
        return t

    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step_forward(model, batch)
    return sum(saved.values())


def _step_forward(model, batch: dict) -> None:
    """The forward pass of a training step, as far as it costs anything: the encoders and heads, and with the
    matching loss the fusion over 3B (caption, clip) pairs; the volume loss on [B, B] adds next to nothing."""
    encoded = model.encode(batch)
    for m, e in encoded.items():
        model.projections[m](e.pooled)
    if model.fusion is not None:
        condition = model.condition(encoded)
        model.match_logits(torch.cat([batch["input_ids"]] * 3), None, torch.cat([condition] * 3))


def training_flops_per_clip(cfg: GramConfig, batch_size: int = 8) -> tuple[int, int]:
    """(forward FLOPs, training FLOPs) a clip of the config's model at its shapes, counted on the meta device by
    torch.utils.flop_counter (matmuls, convolutions, attention) without a GPU or weights. Training = the forward,
    a backward of twice its FLOPs, and with gradient checkpointing the forward once more (recomputed in the
    backward pass): what a GPU executes, which is what its step time follows. Captions at the full text length."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(cfg, vocab_size=None)
    if model.vision is not None:  # crop_flip draws need real values; it costs no FLOPs worth counting
        model.vision.augment = "none"
    model.to(torch.bfloat16)  # what autocast runs the encoders in (and the meta batch's dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _step_forward(model, _meta_batch(cfg, batch_size))
    forward = counter.get_total_flops() // batch_size
    return forward, forward * (4 if cfg.model.gradient_checkpointing else 3)


def _sizes(modules) -> tuple[int, int]:
    """(parameters, trainable parameters) of modules."""
    params = [p for m in modules for p in m.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def static_bytes(model, shards: int = 1, sync_every_micro_batch: bool = True) -> int:
    """Weights, gradients and AdamW state per GPU of the model as its requires_grad flags stand: DDP (shards 1)
    or FSDP over `shards` workers, as train/sharding.py shards it."""
    parameters, trainable = _sizes([model])
    if shards == 1:
        # fp32 weights (4 B) of every parameter; per trainable one its gradient (4), AdamW's moments (8) and the
        # DDP gradient bucket it is reduced through (4).
        return 4 * parameters + 16 * trainable
    from gram_ray.train.sharding import shard_units

    sharded = (4 * parameters + 12 * trainable) // shards
    if not sync_every_micro_batch:  # every weight gathered in bf16 and every gradient kept in fp32 until the last
        return sharded + 2 * parameters + 4 * trainable
    units = shard_units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_units]
    root_bytes = sum(p.numel() * (2 + 4 * p.requires_grad) for p in root)
    unit_bytes = sorted(sum(p.numel() * (2 + 4 * p.requires_grad) for p in u.parameters()) for u in units)
    return sharded + root_bytes + sum(unit_bytes[-2:])


def estimate_memory(cfg: GramConfig, batch_size: int | None = None, workers: int | None = None) -> list[MemoryEstimate]:
    """Per-GPU estimates of a config's training step in bf16, for the ways to fit it (DDP as it is, with gradient
    checkpointing, with the vision tower frozen, both; FSDP over the workers with checkpointing), and last the
    config as it stands (its strategy, checkpointing and frozen vision)."""
    batch_size = batch_size or cfg.worker_batch
    workers = workers or cfg.scaling.min_workers  # FSDP's shards: an elastic group at its smallest holds most
    model = _meta_model(cfg, vocab_size=None)
    if model.vision is not None:  # the input augmentation has no gradient to save, and draws need real values
        model.vision.augment = "none"
    batch = _meta_batch(cfg, batch_size)
    parameters = sum(p.numel() for p in model.parameters())
    every_micro_batch = cfg.scaling.fsdp_sync == "every_micro_batch"

    counted: dict[tuple[bool, bool], int] = {}  # activations of (checkpointing, frozen vision): one pass each

    def run(name: str, checkpointing: bool = False, frozen_vision: bool = False, shards: int = 1) -> MemoryEstimate:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        if frozen_vision and model.vision is not None:
            model.vision.requires_grad_(False)
        for encoder in (model.text, model.vision, model.audio):
            if encoder is not None:
                encoder.backbone.set_gradient_checkpointing(checkpointing)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.to(torch.bfloat16)  # what autocast runs the encoders in
        if (checkpointing, frozen_vision) not in counted:
            counted[checkpointing, frozen_vision] = _saved_activation_bytes(model, batch)
        activations = counted[checkpointing, frozen_vision]
        static = static_bytes(model, shards, every_micro_batch)
        return MemoryEstimate(name, parameters, trainable, activations, static)

    own = dict(checkpointing=cfg.model.gradient_checkpointing, frozen_vision=cfg.model.vision.freeze)
    fsdp = f"FSDP over {workers} GPUs" + ("" if every_micro_batch else " (sync: last_micro_batch)")
    extras = ", ".join(
        what for what, on in (("gradient checkpointing", own["checkpointing"]), ("vision frozen", own["frozen_vision"]))
        if on
    )  # fmt: skip
    return [
        run(f"DDP, batch {batch_size}"),
        run(f"DDP, batch {batch_size}, gradient checkpointing", checkpointing=True),
        run(f"DDP, batch {batch_size}, vision tower frozen", frozen_vision=True),
        run(f"DDP, batch {batch_size}, frozen vision + checkpointing", checkpointing=True, frozen_vision=True),
        run(f"{fsdp}, batch {batch_size}, gradient checkpointing", checkpointing=True, shards=workers),
        # The config as it stands (strategy, checkpointing, frozen vision): what `cluster check` compares with a GPU.
        run(
            f"as configured: {fsdp if cfg.scaling.strategy == 'fsdp' else 'DDP'}, batch {batch_size}"
            + (f", {extras}" if extras else ""),
            shards=workers if cfg.scaling.strategy == "fsdp" else 1,
            **own,
        ),
    ]


def configured_estimate(cfg: GramConfig) -> MemoryEstimate:
    """The estimate of the config's own setup: its strategy, gradient checkpointing and frozen vision tower."""
    return estimate_memory(cfg)[-1]


def memory_json(estimates: list[MemoryEstimate]) -> list[dict]:
    return [e.__dict__ | {"total_bytes": e.total_bytes} for e in estimates]


def memory_table(estimates: list[MemoryEstimate], gpu_gib: float = 80.0) -> str:
    width = max(len(e.name) for e in estimates)
    header = f"{'setup':<{width}} {'trainable':>10} {'activations':>12} {'weights+grads+optim':>20} {'total':>8}"
    lines = [f"{header}  fits {gpu_gib:.0f} GB"]
    for e in estimates:
        fits = "yes" if e.total_bytes / GIB <= gpu_gib * 0.9 else "no"
        lines.append(
            f"{e.name:<{width}} {e.trainable / 1e6:>9.0f}M {e.activations_bytes / GIB:>11.1f}G "
            f"{e.static_bytes / GIB:>19.1f}G {e.total_bytes / GIB:>7.1f}G  {fits}"
        )
    lines.append(
        f"(per GPU, bf16 activations, fp32 weights and AdamW; {estimates[0].parameters / 1e9:.2f} B parameters; "
        "'fits' leaves 10% for the allocator and the CUDA context)"
    )
    return "\n".join(lines)
