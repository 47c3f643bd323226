"""EVA-CLIP's vision tower (EVA01-CLIP-g/14 in GRAM), through timm's EVA implementation.

timm's `Eva` is the same network as EVA-CLIP's visual tower for EVA01: absolute position embeddings, a class
token, pre-LN blocks whose attention has one fused qkv weight with biases on q and v only, an exact-GELU MLP,
LayerNorm eps 1e-6, and a final LayerNorm over every token (no rotary embedding, no layer scale, no post-norm);
timm's own `checkpoint_filter_fn` reads EVA-CLIP checkpoints (the `visual.` prefix, the position embedding
resampled to another image size). The tower returns every token after that final norm, [B, 1 + P, D] with the
CLS first: GRAM pools the CLS of each frame for the contrastive feature and hands all tokens to the fusion.

Sizes come from the checkpoint's shapes (width, depth, patch, MLP width, positions). The one size a state
dict does not show is the head width: it comes from the file's `clip_cfg` when it carries one, from the known
EVA-CLIP towers by width otherwise (g/14: 88, L/14 and B/16: 64, E/14: 112), or from the caller.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gram_ray.model.safe_load import load_weights

__all__ = ["KNOWN_HEAD_WIDTHS", "EvaVisionTower", "build_eva_vision", "load_eva_vision_checkpoint"]

TIMM_MODEL = "eva_giant_patch14_clip_224"  # timm's EVA01-CLIP-g/14 vision tower; sizes are overridden from the file
KNOWN_HEAD_WIDTHS = {1408: 88, 1024: 64, 768: 64, 1792: 112}


class EvaVisionTower(nn.Module):
    """images [B, 3, H, W], normalised with CLIP's statistics -> tokens [B, 1 + P, D] after the final norm."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    @property
    def width(self) -> int:
        return self.visual.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual.forward_features(images)


def build_eva_vision(
    *,
    width: int,
    depth: int,
    head_width: int,
    mlp_hidden: int,
    patch_size: int = 14,
    image_size: int = 224,
    drop_path_rate: float = 0.0,
    qkv_bias: bool = True,
) -> EvaVisionTower:
    """An EVA01-style vision tower of any size, randomly initialised."""
    import timm

    if width % head_width:
        raise ValueError(f"an EVA tower of width {width} cannot have heads of width {head_width}")
    visual = timm.create_model(
        TIMM_MODEL,
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=width // head_width,
        # timm takes the MLP width as int(width * ratio): half a unit over the exact ratio keeps it exact.
        mlp_ratio=(mlp_hidden + 0.5) / width,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        num_classes=0,  # EVA-CLIP's projection head (to the CLIP space) is not used by GRAM
    )
    return EvaVisionTower(visual)


def _read(checkpoint) -> tuple[dict, dict]:
    """(the flat state dict, the vision cfg if the file carries one)."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_weights(checkpoint)
    vision_cfg = {}
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        vision_cfg = (checkpoint.get("clip_cfg") or {}).get("vision_cfg") or {}
        checkpoint = checkpoint["state_dict"]
    return checkpoint, vision_cfg


def load_eva_vision_checkpoint(
    checkpoint: str | Path | dict, image_size: int = 224, head_width: int | None = None, drop_path_rate: float = 0.0
) -> EvaVisionTower:
    """The vision tower of an EVA-CLIP checkpoint (a path read with weights_only=True, or its flat state dict
    with the vision keys under `visual.`; the text tower and logit scale are skipped), loaded strictly through
    timm's key filter; in eval mode."""
    from timm.models.eva import checkpoint_filter_fn

    state, vision_cfg = _read(checkpoint)
    prefix = "visual." if "visual.pos_embed" in state else ""
    visual = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    visual = {k: v for k, v in visual.items() if not k.startswith("head.")}  # the projection to CLIP space
    if "pos_embed" not in visual or "patch_embed.proj.weight" not in visual:
        raise ValueError(
            "not an EVA-CLIP vision checkpoint: no visual.pos_embed / visual.patch_embed.proj.weight "
            f"(first keys: {sorted(state)[:8]})"
        )
    width = visual["pos_embed"].shape[-1]
    head_width = head_width or vision_cfg.get("head_width") or KNOWN_HEAD_WIDTHS.get(width)
    if head_width is None:
        raise ValueError(
            f"the checkpoint's tower is {width} wide, not a known EVA-CLIP size, and a state dict does not say its "
            "head width: pass head_width (the checkpoint's vision_cfg.head_width)"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in visual if k.startswith("blocks."))
    tower = build_eva_vision(
        width=width,
        depth=depth,
        head_width=head_width,
        mlp_hidden=visual["blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=visual["patch_embed.proj.weight"].shape[-1],
        image_size=image_size,
        drop_path_rate=drop_path_rate,
        qkv_bias="blocks.0.attn.q_bias" in visual,
    )
    # timm's filter resamples the position embedding when image_size differs from the checkpoint's.
    filtered = checkpoint_filter_fn({"visual." + k: v for k, v in visual.items()}, tower.visual)
    result = tower.visual.load_state_dict(filtered, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the EVA-CLIP checkpoint does not fit an EVA tower of its own sizes: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    return tower.eval()
