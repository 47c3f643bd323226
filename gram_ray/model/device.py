"""Where a batch and its math run: the batch's tensors on the device, and the mixed precision the config asks
for there. Training steps, training's evaluation and the index's embedding all run through these two."""

from __future__ import annotations

import torch

from gram_ray.config import GramConfig
from gram_ray.data.frame_codec import decode_on_device

__all__ = ["autocast", "to_device"]


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the device; frames a JPEG cache left undecoded (data.video.decode_device: cuda) are
    decoded there, in one batched call."""
    batch = decode_on_device(batch, device)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, cfg: GramConfig):
    """bf16 (train.bf16) or fp16 (train.fp16) autocast on a GPU; full precision otherwise."""
    dtype = torch.float16 if cfg.train.fp16 else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda" and (cfg.train.bf16 or cfg.train.fp16))
