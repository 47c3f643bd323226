"""A checkpoint's weights fitted to the model of a recipe: what `model.init_from` and `import-checkpoint` both do.

GRAM's released weights (and a gram-ray run's) are trained for one clip length and resolution, and for one set of
modalities; a recipe may have others. `adapt_state` takes a state dict by gram-ray's names and the shapes of the
recipe's model, and fits one to the other as GRAM's own code does when it loads a checkpoint
(`general_module.modify_checkpoint`): the fusion's frame and window embeddings resized by nearest neighbour to
the recipe's counts, EVA's position embedding bilinearly to its resolution; the weights of a part the recipe does
not have (a modality it drops, the matching loss) left out and said; anything else reported, with the config key
that sets the tensor's shape. Torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["FitReport", "adapt_state", "config_key", "parts_of"]


@dataclass
class FitReport:
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # gram-ray keys the GRAM checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # keys with no place in the model, each with its config key
    misshaped: list[str] = field(default_factory=list)  # "key: theirs vs ours (the config key that sets it)"
    unused: dict[str, str] = field(default_factory=dict)  # a key kept beside the weights, not loaded -> why
    resized: list[str] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # why -> keys of a part the model does not have

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def lines(self) -> list[str]:
        out = [f"loaded {self.loaded} tensors into gram-ray's model"]
        out += [f"resized: {r}" for r in self.resized]
        out += [f"left out {len(keys)} tensors: {why}" for why, keys in self.left_out.items()]
        by_reason: dict[str, int] = {}
        for why in self.unused.values():
            by_reason[why] = by_reason.get(why, 0) + 1
        out += [f"kept, not loaded ({n} keys): {why}" for why, n in by_reason.items()]
        out += [f"MISSING in the checkpoint: {k}" for k in self.missing]
        out += [f"UNEXPECTED (no place in the model): {k}" for k in self.unexpected]
        out += [f"MIS-SHAPED: {m}" for m in self.misshaped]
        return out


# A gram-ray key's parts of the model: a modality (its encoder, its head, its share of the fusion) and, for the
# fusion and match head, the matching loss. A recipe without one of them (model.modalities, model.itm_ratio: 0)
# leaves the key out.
_FUSED = ("video", "audio", "subtitle")


def parts_of(key: str) -> tuple[str, ...]:
    """Of 'text', 'video', 'audio', 'subtitle', 'matching': the parts of the model a gram-ray key belongs to."""
    head = key.split(".")
    if head[0] == "vision":
        return ("video",)
    if head[0] == "audio":
        return ("audio",)
    if head[0] == "projections" and len(head) > 1:
        return (head[1],)
    if head[0] == "fusion":
        return ("matching", head[2]) if len(head) > 2 and head[2] in _FUSED else ("matching",)
    return ("text",)


def _left_out_reason(part: str) -> str:
    if part == "matching":
        return "the fusion and match head of GRAM's matching loss: this recipe has none (model.itm_ratio: 0)"
    return f"the {part} modality's encoder, head and fusion inputs: this recipe has no {part} (model.modalities)"


_ENCODER_KEYS = {"video": "model.vision", "audio": "model.audio", "text": "model.text", "subtitle": "model.text"}


def config_key(key: str, theirs: torch.Size | None = None, ours: torch.Size | None = None) -> str:
    """The config key that sets a gram-ray tensor's shape: what to check when a checkpoint's tensor does not fit.
    A head's output is model.embed_dim and its input the encoder's width: the shapes tell which differs."""
    head = key.split(".")
    if ".part_embedding.video" in key:
        return "data.video.num_frames"
    if ".part_embedding.audio" in key:
        return "data.audio.windows"
    if key.endswith("visual.pos_embed"):
        return "data.video.size"
    if head[0] == "projections" and len(head) > 1:
        if theirs is not None and ours is not None and len(theirs) == len(ours) == 2 and theirs[0] == ours[0]:
            return _ENCODER_KEYS.get(head[1], "model")
        return "model.embed_dim"
    return {
        "vision": "model.vision",
        "audio": "model.audio",
        "text": "model.text",
        "fusion": "model.text",  # the fusion works at the text encoder's width
        "loss_fn": "model.learnable_temperature",
    }.get(head[0], "model")


def _resize_pos_embed(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """EVA's position embedding [1, 1 + g*g, D] resampled to the model's grid (another vision resolution) as GRAM
    loads it (modify_checkpoint): the patch grid bilinearly, the CLS position as it is."""
    import torch.nn.functional as F

    width, old, new = value.shape[-1], math.isqrt(value.shape[1] - 1), math.isqrt(shape[1] - 1)
    grid = value[0, 1:].float().reshape(old, old, width).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, (new, new), mode="bilinear")[0].permute(1, 2, 0).reshape(-1, width)
    return torch.cat((value[0, :1].float(), grid)).unsqueeze(0).to(value.dtype)


def _resize_parts(value: torch.Tensor, parts: int) -> torch.Tensor:
    """GRAM's frame/window embeddings [1, n, D] at another count: nearest, as GRAM loads them."""
    import torch.nn.functional as F

    resized = F.interpolate(value.float().transpose(1, 2), parts, mode="nearest").transpose(1, 2)
    return resized.contiguous().to(value.dtype)


def _resized(key: str, value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str] | None:
    """value at `shape` when its shape follows the run (frames, windows, resolution), with why; else None."""
    if value.ndim != 3 or len(shape) != 3 or value.shape[-1] != shape[-1]:
        return None
    if key.endswith("visual.pos_embed"):
        return _resize_pos_embed(value, shape), "another vision resolution, data.video.size"
    if ".part_embedding." in key:
        return _resize_parts(value, shape[1]), f"other {'frame' if key.endswith('video') else 'window'} counts"
    return None


def adapt_state(
    state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], names: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], FitReport]:
    """A gram-ray state dict fitted to the model of `shapes`: tensors whose shape follows the recipe's frame or
    window count or resolution resized as GRAM's code resizes them, the parts of the model the recipe has not left
    out (report.left_out), everything else reported (unexpected, misshaped with the config key that sets its shape,
    missing). names: the key each tensor had in its source, for messages (GRAM's, on import)."""
    names = names or {}
    present = {part for k in shapes for part in parts_of(k)}
    out: dict[str, torch.Tensor] = {}
    report = FitReport()
    for key, value in state.items():
        label = f"{names[key]} -> {key}" if key in names else key
        if key not in shapes:
            lacking = [part for part in parts_of(key) if part not in present]
            if lacking:
                report.left_out.setdefault(_left_out_reason(lacking[0]), []).append(key)
            else:
                report.unexpected.append(f"{label} (check {config_key(key)})")
            continue
        if value.shape != shapes[key]:
            resized = _resized(key, value, shapes[key])
            if resized is None:
                report.misshaped.append(
                    f"{label}: checkpoint {list(value.shape)}, model {list(shapes[key])} "
                    f"(set by {config_key(key, value.shape, shapes[key])})"
                )
                continue
            report.resized.append(f"{names.get(key, key)}: {list(value.shape)} -> {list(shapes[key])} ({resized[1]})")
            value = resized[0]
        out[key] = value
    report.loaded = len(out)
    report.missing = [k for k in shapes if k not in out]
    return out, report
