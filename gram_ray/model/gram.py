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
from gram_ray.matching import matching_loss
from gram_ray.model.encoders import AudioEncoder, Encoded, TextEncoder, VisionEncoder, build_backbone, pool_tokens
from gram_ray.model.fusion import Fusion

__all__ = ["GramModel", "build_model"]


class GramModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        num_frames: int,
        vocab_size: int | None = None,
        image_size: int = 224,
        load_pretrained: bool = True,
        num_windows: int = 1,
    ) -> None:
        super().__init__()
        if "text" not in cfg.modalities or len(cfg.modalities) < 2:
            raise ValueError(f"model.modalities must hold 'text' and at least one other, got {cfg.modalities}")
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        text_overrides = {"vocab_size": vocab_size} if vocab_size and not cfg.text.pretrained else {}
        load = {"load_pretrained": load_pretrained}
        self.text = TextEncoder(build_backbone(cfg.text, "text", **load, **text_overrides))
        self.vision = (
            VisionEncoder(build_backbone(cfg.vision, "vision", image_size=image_size, **load), cfg.vision, num_frames)
            if "video" in self.modalities
            else None
        )
        self.audio = AudioEncoder(build_backbone(cfg.audio, "audio", **load)) if "audio" in self.modalities else None
        widths = {"text": self.text.out_dim, "subtitle": self.text.out_dim}
        if self.vision is not None:
            widths["video"] = self.vision.out_dim
        if self.audio is not None:
            widths["audio"] = self.audio.out_dim
        # GRAM's contrastive heads (Contra_head): a linear map to the shared space, without bias by default.
        self.projections = nn.ModuleDict(
            {m: nn.Linear(widths[m], cfg.embed_dim, bias=cfg.head_bias) for m in self.modalities}
        )
        self.loss_fn = VolumeContrastiveLoss(
            temperature=cfg.temperature,
            learnable_temperature=cfg.learnable_temperature,
            label_smoothing=cfg.label_smoothing,
            gather=cfg.gather,
            temperature_bounds=cfg.temperature_bounds,
            refine=cfg.refine_per_row,
            compile=cfg.compile,
        )
        # GRAM's fusion and match head, trained by the matching loss (model.itm_ratio > 0) from the clip's video
        # and audio tokens (GRAM's condition_feats_va).
        self.fusion = None
        if cfg.itm_ratio > 0:
            conditions = {"video": self.vision, "audio": self.audio}
            widths = {m: enc.width for m, enc in conditions.items() if enc is not None}
            self.fusion = Fusion(self.text.width, widths, {"video": num_frames, "audio": num_windows})
        elif cfg.text.cross_attention:
            # Only the fusion reads them: frozen while no loss trains it, so DDP never waits on parameters without
            # gradient.
            for p in self.text.backbone.cross_attention_parameters():
                p.requires_grad_(False)
        encoders = [e for e in (self.text, self.vision, self.audio) if e is not None]
        if cfg.compile:  # each encoder in place; the loss compiles its volume itself
            for encoder in encoders:
                encoder.compile()
        if cfg.gradient_checkpointing:
            for encoder in encoders:
                encoder.backbone.set_gradient_checkpointing(True)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters of encoders loaded with pretrained weights (trained at train.encoder_lr)."""
        groups = [(self.text, self.cfg.text), (self.vision, self.cfg.vision), (self.audio, self.cfg.audio)]
        return [p for enc, c in groups if enc is not None and c.pretrained for p in enc.parameters() if p.requires_grad]

    # Entry points other than forward. Under FSDP (train/sharding.py) each is registered as a forward method, so
    # that calling it gathers the root's parameters as forward does; they and forward call only the private
    # versions below, never one another, so no gathering hook runs inside another.
    ENTRY_POINTS = ("encode", "embed", "embed_for_eval", "condition", "match_logits")

    def encode(self, batch: dict[str, torch.Tensor], modalities: list[str] | None = None) -> dict[str, Encoded]:
        """Each modality's encoder output: the pooled feature and the token states (for the fusion)."""
        return self._encode(batch, modalities)

    def embed(self, batch: dict[str, torch.Tensor], modalities: list[str] | None = None) -> dict[str, torch.Tensor]:
        """L2-normalised float32 embeddings [B, embed_dim] of each modality."""
        return self._project(self._encode(batch, modalities))

    def embed_for_eval(
        self, batch: dict[str, torch.Tensor], with_condition: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """embed(batch), and with_condition the clips' condition features for reranking, from one encoding."""
        encoded = self._encode(batch)
        return self._project(encoded), self._condition(encoded) if with_condition else None

    def condition(self, encoded: dict[str, Encoded]) -> torch.Tensor:
        """The fusion's condition features [B, M, text width] of a batch's clips."""
        return self._condition(encoded)

    def match_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """[B, 2] match-head logits of captions fused with clips' condition features. The fused caption is pooled
        as the text encoder pools the plain one (GRAM: BERT's CLS; a text encoder trained with mean pooling never
        puts the caption in its CLS state, and a match head reading it stays at the base rate)."""
        return self._match_logits(input_ids, mask, condition)

    def _encode(self, batch: dict[str, torch.Tensor], modalities: list[str] | None = None) -> dict[str, Encoded]:
        out = {}
        for m in modalities or self.modalities:
            spec = MODALITIES[m]  # which encoder reads which batch keys: the data contract's table
            out[m] = getattr(self, spec.encoder)(*(batch[key] for key in spec.batch_keys))
        return out

    def _project(self, encoded: dict[str, Encoded]) -> dict[str, torch.Tensor]:
        return {m: F.normalize(self.projections[m](e.pooled).float(), dim=-1) for m, e in encoded.items()}

    def _condition(self, encoded: dict[str, Encoded]) -> torch.Tensor:
        fused = self.fusion.order
        return self.fusion.condition({m: encoded[m].tokens for m in fused}, {m: encoded[m].parts for m in fused})

    def _match_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        states = self.text.backbone.fuse(input_ids, mask, condition, None)
        return self.fusion.match_head(pool_tokens(states, self.cfg.text.pooling, mask))

    def forward(self, batch: dict[str, torch.Tensor]) -> VolumeLossOutput:
        encoded = self._encode(batch)
        emb = self._project(encoded)
        out = self.loss_fn.compute(emb["text"], *[emb[m] for m in self.modalities if m != "text"])
        if self.fusion is None:
            return out
        text_ids, text_mask = (batch[key] for key in MODALITIES["text"].batch_keys)
        dam = matching_loss(
            self._match_logits,
            text_ids,
            text_mask,
            self._condition(encoded),
            out.logits_t2v,
            out.logits_v2t,
            out.sizes,
            out.offset,
        )
        out.loss = out.loss + self.cfg.itm_ratio * dam
        out.matching_loss = dam.detach()
        return out


def build_model(cfg: GramConfig, vocab: list[str] | None) -> GramModel:
    """The model a config describes; `vocab` sizes a randomly initialised text encoder's embeddings. With
    model.init_from every weight comes from that checkpoint (checkpoint.init_weights), so pretrained encoders are built
    as their architectures without reading their files."""
    return GramModel(
        cfg.model,
        num_frames=cfg.data.video.num_frames,
        vocab_size=len(vocab) if vocab else None,
        image_size=cfg.data.video.size,
        load_pretrained=not cfg.model.init_from,
        num_windows=cfg.data.audio.windows,
    )
