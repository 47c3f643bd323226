"""The encoders of each modality, behind one interface.

A *backbone* turns one input (a caption's token ids, one frame, one filterbank window) into its token states
[n, L, D] and a pooled vector [n, D]; `width` is D. `model.<tower>.kind` picks it:
- `hf`: any Hugging Face AutoModel (BERT, CLIP/ViT, AST, ...) by name or local path (`pretrained`), or random
  weights from a config with `model_type`;
- `eva_clip`: EVA-CLIP's vision tower through timm (GRAM's EVA01-CLIP-g/14; `pretrained` is the EVA-CLIP `.pt`,
  `config` gives sizes for random weights): pooled = the CLS token, as GRAM pools each frame;
- `beats`: BEATs (GRAM's audio encoder; `pretrained` is the BEATs `.pt`, `config` a BEATs cfg for random
  weights): pooled = the mean over tokens, as GRAM.
A modality encoder runs its backbone over a sample's parts (frames, windows), pools across them, and returns
`Encoded(pooled [B, out_dim], tokens [B, parts x L, D], mask)`: the pooled vector feeds the contrastive head,
the tokens the fusion. A new backbone is one class with `forward(x, mask) -> (tokens, pooled)`, `width`,
`set_gradient_checkpointing(enabled)` and `shard_units()` (the modules FSDP shards one by one: its transformer
blocks, and any module several blocks share, innermost first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gram_ray.config import EncoderConfig, VisionEncoderConfig

__all__ = [
    "Encoded",
    "load_backbone",
    "load_beats",
    "load_eva_vision",
    "HFBackbone",
    "EvaBackbone",
    "BeatsBackbone",
    "build_backbone",
    "pool_tokens",
    "TextEncoder",
    "VisionEncoder",
    "AudioEncoder",
]


@dataclass
class Encoded:
    pooled: torch.Tensor  # [B, out_dim]: the contrastive feature before its head
    tokens: torch.Tensor  # [B, N, width]: every part's token states, parts in order
    mask: torch.Tensor | None = None  # [B, N], 1 for real tokens (text); None when every token is real
    parts: int = 1  # frames (video) or windows (audio) the tokens come from, in order


def load_backbone(cfg: EncoderConfig, tower: str, **overrides) -> nn.Module:
    """A Hugging Face encoder module. tower ('text', 'vision' or 'audio') picks one side of a dual model such as
    CLIP; overrides change config fields of a randomly initialised one."""
    from transformers import AutoConfig, AutoModel

    # transformers builds BERT's cross-attention layers only for a decoder; _encoder_side undoes the causal part.
    # A text model saved with them (gram-ray's own) loads without them unless asked for.
    cross = {"add_cross_attention": True, "is_decoder": True} if cfg.cross_attention else {}
    if tower == "text" and not cfg.cross_attention:
        cross = {"add_cross_attention": False, "is_decoder": False}
    if cfg.pretrained:
        model = AutoModel.from_pretrained(cfg.pretrained, **cross)
    else:
        if "model_type" not in cfg.config:
            raise ValueError(
                "a Hugging Face encoder needs either `pretrained` (a name or local path) or a `config` with "
                f"`model_type` for random weights; got config keys {sorted(cfg.config)}"
            )
        model = AutoModel.from_config(AutoConfig.for_model(**(cfg.config | overrides | cross)))
    if cfg.cross_attention:
        _encoder_side(model)
    side = getattr(model, f"{tower}_model", None)  # CLIPModel, SiglipModel, ...: keep the tower we need
    if isinstance(side, nn.Module):
        model = side
    # Pooler heads (BERT, ViT) are never used: we pool token states ourselves. Dropping them keeps DDP from
    # waiting on parameters that get no gradient.
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    return model


def _encoder_side(model: nn.Module) -> None:
    """A BERT built with cross-attention layers (which transformers ties to decoders) made an encoder again:
    bidirectional self-attention; its cross-attention runs only when a forward passes encoder_hidden_states, so
    without them it is exactly the plain encoder (GRAM's text path), with them GRAM's fusion."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(layer, "crossattention") for layer in layers):
        raise ValueError(f"{type(model).__name__} has no BERT-style cross-attention layers: text.cross_attention")
    model.config.is_decoder = False  # the self-attention mask: bidirectional, no cache
    for layer in layers:
        layer.attention.self.is_causal = False


def load_beats(checkpoint) -> nn.Module:
    """BEATs from a checkpoint in its released layout: a path (read with weights_only=True) or the dict
    {"cfg": ..., "model": state_dict}. Returns the module in eval mode; called on a filterbank [B, T, F] it
    returns tokens [B, N, D], as GRAM's BEATs.forward. Every size comes from the cfg."""
    from gram_ray.model.beats import load_beats_checkpoint

    return load_beats_checkpoint(checkpoint)


def load_eva_vision(checkpoint, image_size: int = 224, head_width: int | None = None) -> nn.Module:
    """EVA-CLIP's vision tower from its checkpoint: a path (read with weights_only=True) or the flat state dict
    with the vision keys under `visual.` (the text tower is skipped). Returns the module in eval mode; called on
    normalised images [B, 3, H, W] it returns every token after the final norm, [B, 1 + P, D], CLS first.
    Sizes come from the checkpoint's shapes; head_width only for a tower of an unknown width."""
    from gram_ray.model.eva import load_eva_vision_checkpoint

    return load_eva_vision_checkpoint(checkpoint, image_size=image_size, head_width=head_width)


def pool_tokens(
    states: torch.Tensor, how: str, mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, N, D] token states -> [B, D]: 'cls' (the backbone's own pooled output when given, else the first
    token) or 'mean' over the real tokens (mask 1)."""
    if how == "cls":
        # A backbone's own pooled CLS (CLIP: CLS + post-layernorm; AST: CLS and distillation token) when it has
        # one, so its last layers get gradient; BERT's and ViT's pooler heads were dropped, leaving CLS.
        return pooled if pooled is not None else states[:, 0]
    if mask is None:
        return states.mean(1)
    mask = mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


class HFBackbone(nn.Module):
    """A Hugging Face model: its last hidden states, pooled by `pooling` ('cls' or 'mean')."""

    INPUTS = {"text": "input_ids", "vision": "pixel_values", "audio": "input_values"}

    def __init__(self, model: nn.Module, tower: str, pooling: str) -> None:
        super().__init__()
        self.model, self.input_name, self.pooling = model, self.INPUTS[tower], pooling

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; older models have only one
        verb = "enable" if enabled else "disable"
        for name in (f"activation_checkpointing_{verb}", f"gradient_checkpointing_{verb}"):
            if hasattr(self.model, name):
                getattr(self.model, name)()
                return

    def shard_units(self) -> list[nn.Module]:
        # Every transformers encoder keeps its blocks in one ModuleList: encoder.layer (BERT, ViT, AST),
        # encoder.layers (CLIP, SigLIP).
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers") and len(module):
                return list(module)
        raise ValueError(
            f"{type(self.model).__name__} has no list of transformer layers (encoder.layer / encoder.layers) for "
            "FSDP to shard: use scaling.strategy: ddp with it"
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {self.input_name: x} | ({"attention_mask": mask} if mask is not None else {})
        out = self.model(**inputs)
        states = out.last_hidden_state
        return states, pool_tokens(states, self.pooling, mask, getattr(out, "pooler_output", None))

    def cross_attention_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if ".crossattention." in name]

    def fuse(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token states of the text cross-attending, in every layer, to context [B, M, width] (GRAM's fusion);
        context_mask None: every context token is real."""
        return self.model(
            input_ids=input_ids, attention_mask=mask, encoder_hidden_states=context, encoder_attention_mask=context_mask
        ).last_hidden_state


class EvaBackbone(nn.Module):
    """EVA-CLIP's vision tower: every token after the final norm; pooled = the CLS token."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    @property
    def width(self) -> int:
        return self.tower.width

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.tower.visual.set_grad_checkpointing(enabled)

    def shard_units(self) -> list[nn.Module]:
        return list(self.tower.visual.blocks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tower(x)
        return tokens, tokens[:, 0]


class BeatsBackbone(nn.Module):
    """BEATs over one filterbank window: its tokens; pooled = their mean (GRAM's pooled audio feature)."""

    def __init__(self, beats: nn.Module) -> None:
        super().__init__()
        self.beats = beats

    @property
    def width(self) -> int:
        return self.beats.width

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.beats.encoder.gradient_checkpointing = enabled

    def shard_units(self) -> list[nn.Module]:
        # The relative position bias is one Embedding every layer holds (and the encoder calls outside any layer):
        # a unit of its own, so no layer's shard owns it.
        layers = list(self.beats.encoder.layers)
        shared = getattr(layers[0].self_attn, "relative_attention_bias", None) if layers else None
        return ([shared] if shared is not None else []) + layers

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.beats(x)
        return tokens, tokens.mean(1)


def build_backbone(
    cfg: EncoderConfig, tower: str, image_size: int = 224, load_pretrained: bool = True, **overrides
) -> nn.Module:
    """The backbone `cfg` describes (the config validated which kinds each tower takes), trainable unless
    cfg.freeze. load_pretrained=False builds a pretrained encoder's architecture with random weights instead
    (when every weight will come from a checkpoint: nothing is read or downloaded twice)."""
    if not load_pretrained:
        from gram_ray.model.architectures import random_encoder

        freeze = cfg.freeze
        cfg = random_encoder(cfg, tower)
        cfg.freeze = freeze
    if cfg.kind == "hf":
        backbone = HFBackbone(load_backbone(cfg, tower, **overrides), tower, cfg.pooling)
    elif cfg.kind == "eva_clip":
        from gram_ray.model.eva import build_eva_vision, load_eva_vision_checkpoint

        drop_path = cfg.drop_path_rate if isinstance(cfg, VisionEncoderConfig) else 0.0
        if cfg.pretrained:
            tower_module = load_eva_vision_checkpoint(
                cfg.pretrained, image_size=image_size, head_width=cfg.config.get("head_width"), drop_path_rate=drop_path
            )
        else:
            tower_module = build_eva_vision(**cfg.config, image_size=image_size, drop_path_rate=drop_path)
        backbone = EvaBackbone(tower_module.train())
    else:
        from gram_ray.model.beats import BEATs, BEATsConfig, load_beats_checkpoint

        beats = load_beats_checkpoint(cfg.pretrained) if cfg.pretrained else BEATs(BEATsConfig.from_dict(cfg.config))
        backbone = BeatsBackbone(beats.train())
    if cfg.freeze:
        backbone.requires_grad_(False)
    return backbone


class TextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.width = self.out_dim = backbone.width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        tokens, pooled = self.backbone(input_ids, attention_mask)
        return Encoded(pooled, tokens, attention_mask)


class VisionEncoder(nn.Module):
    """Per-frame backbone, then temporal pooling: 'mean' (order-free, the paper's) or 'concat' (keeps order)."""

    def __init__(self, backbone: nn.Module, cfg: VisionEncoderConfig, num_frames: int) -> None:
        super().__init__()
        self.backbone, self.temporal, self.augment = backbone, cfg.temporal_pooling, cfg.augment
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1) * 255, persistent=False)
        self.num_frames = num_frames
        self.width = backbone.width
        self.out_dim = backbone.width * (num_frames if self.temporal == "concat" else 1)

    def forward(self, frames: torch.Tensor) -> Encoded:
        b, n = frames.shape[:2]
        if self.temporal == "concat" and n != self.num_frames:
            raise ValueError(f"concat temporal pooling was built for {self.num_frames} frames, got {n}")
        frames = frames.float()
        if self.training and self.augment == "crop_flip":
            from gram_ray.data.augment import crop_flip

            frames = crop_flip(frames)
        pixels = (frames.flatten(0, 1) - self.mean) / self.std
        pixels = pixels.to(next(self.backbone.parameters()).dtype)
        tokens, pooled = self.backbone(pixels)
        per_frame = pooled.view(b, n, -1)
        pooled = per_frame.flatten(1) if self.temporal == "concat" else per_frame.mean(1)
        return Encoded(pooled, tokens.reshape(b, -1, tokens.shape[-1]), parts=n)


class AudioEncoder(nn.Module):
    """A spectrogram backbone (AST, BEATs: input [n, frames, mel_bins]) per window, then the mean over windows."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.width = self.out_dim = backbone.width

    def forward(self, fbank: torch.Tensor) -> Encoded:
        b, windows = fbank.shape[:2]
        tokens, pooled = self.backbone(fbank.flatten(0, 1))
        return Encoded(pooled.view(b, windows, -1).mean(1), tokens.reshape(b, -1, tokens.shape[-1]), parts=windows)
