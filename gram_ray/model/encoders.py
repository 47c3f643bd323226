"""Hugging Face encoders for each modality, loaded through one path.

`load_backbone` takes a Hugging Face name or local path (pretrained weights, real runs) or a config with
`model_type` (random weights: the demo and tests). Each wrapper turns its backbone's token states into one
vector per sample: the text encoder over token ids, the vision encoder over every frame then across frames,
the audio encoder over each filterbank window then across windows.
"""

from __future__ import annotations

import torch
from torch import nn

from gram_ray.config import EncoderConfig, VisionEncoderConfig

__all__ = ["load_backbone", "hidden_size", "TextEncoder", "VisionEncoder", "AudioEncoder"]


def load_backbone(cfg: EncoderConfig, tower: str, **overrides) -> nn.Module:
    """The encoder module. tower ('text' or 'vision') picks one side of a dual model such as CLIP."""
    from transformers import AutoConfig, AutoModel

    if cfg.pretrained:
        model = AutoModel.from_pretrained(cfg.pretrained)
    else:
        if "model_type" not in cfg.config:
            raise ValueError(
                "an encoder needs either `pretrained` (a Hugging Face name or local path) or a `config` with "
                f"`model_type` for random weights; got config keys {sorted(cfg.config)}"
            )
        model = AutoModel.from_config(AutoConfig.for_model(**(cfg.config | overrides)))
    side = getattr(model, f"{tower}_model", None)  # CLIPModel, SiglipModel, ...: keep the tower we need
    if isinstance(side, nn.Module):
        model = side
    # Pooler heads (BERT, ViT) are never used: we pool token states ourselves. Dropping them keeps DDP from
    # waiting on parameters that get no gradient.
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    if cfg.freeze:
        model.requires_grad_(False)
    return model


def hidden_size(model: nn.Module) -> int:
    return model.config.hidden_size


def _pool(output, how: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    states = output.last_hidden_state
    if how == "cls":
        # A backbone's own pooled CLS (CLIP: CLS + post-layernorm; AST: CLS and distillation token) when it has
        # one, so its last layers get gradient; BERT's and ViT's pooler heads were dropped, leaving CLS.
        pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else states[:, 0]
    if mask is None:
        return states.mean(1)
    mask = mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


class TextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: str) -> None:
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.out_dim = hidden_size(backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _pool(self.backbone(input_ids=input_ids, attention_mask=attention_mask), self.pooling, attention_mask)


class VisionEncoder(nn.Module):
    """Per-frame encoder, then temporal pooling: 'mean' (order-free, the paper's) or 'concat' (keeps order)."""

    def __init__(self, backbone: nn.Module, cfg: VisionEncoderConfig, num_frames: int) -> None:
        super().__init__()
        self.backbone, self.pooling, self.temporal = backbone, cfg.pooling, cfg.temporal_pooling
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1) * 255, persistent=False)
        self.num_frames = num_frames
        self.out_dim = hidden_size(backbone) * (num_frames if self.temporal == "concat" else 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, n = frames.shape[:2]
        if self.temporal == "concat" and n != self.num_frames:
            raise ValueError(f"concat temporal pooling was built for {self.num_frames} frames, got {n}")
        pixels = (frames.flatten(0, 1).float() - self.mean) / self.std
        pixels = pixels.to(next(self.backbone.parameters()).dtype)
        per_frame = _pool(self.backbone(pixel_values=pixels), self.pooling).view(b, n, -1)
        return per_frame.flatten(1) if self.temporal == "concat" else per_frame.mean(1)


class AudioEncoder(nn.Module):
    """Spectrogram transformer (AST or any model taking input_values [B, frames, mel_bins]) per window."""

    def __init__(self, backbone: nn.Module, pooling: str) -> None:
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.out_dim = hidden_size(backbone)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        b, windows = fbank.shape[:2]
        return _pool(self.backbone(input_values=fbank.flatten(0, 1)), self.pooling).view(b, windows, -1).mean(1)
