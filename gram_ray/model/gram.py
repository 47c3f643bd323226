"""The GRAM model: one encoder per modality, projection heads to a shared space, L2 normalisation, and the
volume contrastive loss (its temperature is a parameter of the model, so DDP averages its gradient too).

Text is the anchor; a subtitle stream (when enabled) goes through the same text encoder with its own
projection. Batches are dicts of tensors: input_ids / attention_mask (captions), subtitle_input_ids /
subtitle_attention_mask, frames uint8 [B, N, 3, S, S], audio_fbank float [B, A, L, mel_bins].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gram_ray.config import GramConfig, ModelConfig
from gram_ray.data.schema import MODALITIES
from gram_ray.loss import VolumeContrastiveLoss, VolumeLossOutput
from gram_ray.model.encoders import AudioEncoder, TextEncoder, VisionEncoder, load_backbone

__all__ = ["GramModel", "build_model"]


class GramModel(nn.Module):
    def __init__(self, cfg: ModelConfig, num_frames: int, vocab_size: int | None = None) -> None:
        super().__init__()
        if "text" not in cfg.modalities or len(cfg.modalities) < 2:
            raise ValueError(f"model.modalities must hold 'text' and at least one other, got {cfg.modalities}")
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        text_overrides = {"vocab_size": vocab_size} if vocab_size and not cfg.text.pretrained else {}
        self.text = TextEncoder(load_backbone(cfg.text, "text", **text_overrides), cfg.text.pooling)
        self.vision = (
            VisionEncoder(load_backbone(cfg.vision, "vision"), cfg.vision, num_frames)
            if "video" in self.modalities
            else None
        )
        self.audio = (
            AudioEncoder(load_backbone(cfg.audio, "audio"), cfg.audio.pooling) if "audio" in self.modalities else None
        )
        widths = {"text": self.text.out_dim, "subtitle": self.text.out_dim}
        if self.vision is not None:
            widths["video"] = self.vision.out_dim
        if self.audio is not None:
            widths["audio"] = self.audio.out_dim
        self.projections = nn.ModuleDict({m: nn.Linear(widths[m], cfg.embed_dim) for m in self.modalities})
        self.loss_fn = VolumeContrastiveLoss(
            temperature=cfg.temperature,
            learnable_temperature=cfg.learnable_temperature,
            label_smoothing=cfg.label_smoothing,
            gather=cfg.gather,
            temperature_bounds=cfg.temperature_bounds,
            refine=cfg.refine_per_row,
            compile=cfg.compile,
        )
        if cfg.compile:  # each encoder in place; the loss compiles its volume itself
            for encoder in (self.text, self.vision, self.audio):
                if encoder is not None:
                    encoder.compile()
        if cfg.gradient_checkpointing:
            for encoder in (self.text, self.vision, self.audio):
                if encoder is not None and hasattr(encoder.backbone, "gradient_checkpointing_enable"):
                    encoder.backbone.gradient_checkpointing_enable()

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters of encoders loaded with pretrained weights (trained at train.encoder_lr)."""
        groups = [(self.text, self.cfg.text), (self.vision, self.cfg.vision), (self.audio, self.cfg.audio)]
        return [p for enc, c in groups if enc is not None and c.pretrained for p in enc.parameters() if p.requires_grad]

    def _features(self, modality: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = MODALITIES[modality]  # which encoder reads which batch keys: the data contract's table
        return getattr(self, spec.encoder)(*(batch[key] for key in spec.batch_keys))

    def embed(self, batch: dict[str, torch.Tensor], modalities: list[str] | None = None) -> dict[str, torch.Tensor]:
        """L2-normalised float32 embeddings [B, embed_dim] of each modality."""
        out = {}
        for m in modalities or self.modalities:
            out[m] = F.normalize(self.projections[m](self._features(m, batch)).float(), dim=-1)
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> VolumeLossOutput:
        emb = self.embed(batch)
        return self.loss_fn.compute(emb["text"], *[emb[m] for m in self.modalities if m != "text"])


def build_model(cfg: GramConfig, vocab: list[str] | None) -> GramModel:
    """The model a config describes; `vocab` sizes a randomly initialised text encoder's embeddings."""
    return GramModel(cfg.model, num_frames=cfg.data.video.num_frames, vocab_size=len(vocab) if vocab else None)
