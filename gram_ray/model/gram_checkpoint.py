"""GRAM's released checkpoints in gram-ray: the key mapping between GRAM's model and gram-ray's, both ways.

A GRAM checkpoint is the flat state dict of GRAM's model (`model_step_N.pt`): `vision_encoder.*` (the whole
EVA-CLIP model), `audio_encoder.*` (BEATs), `multimodal_encoder.*` (BERT with cross-attention, and its masked-LM
head), `contra_head_{t,v,a,s,d}` (the contrastive heads, no bias), `contra_temp` (the temperature itself),
`itm_head.*`, `hidden_trans_*`, `*_frame_embedding`, `*_type_embeddings` (the fusion and match head, loaded into
gram-ray's `fusion.*` when the model trains the matching loss).

`import_gram_state` maps each key to gram-ray's model (built on the meta device: no memory, no download),
checks every shape, and reports what is missing, unexpected or mis-shaped. Keys gram-ray does not use (yet) are
kept, by their GRAM names, under the checkpoint's "unused" entry, each with the reason (UNUSED); nothing is
dropped. The temperature becomes gram-ray's log form: log(contra_temp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gram_ray.config import GramConfig
from gram_ray.model.safe_load import load_weights

__all__ = [
    "KEY_MAP",
    "UNUSED",
    "ImportReport",
    "gram_to_gram_ray",
    "gram_ray_to_gram",
    "import_gram_state",
    "model_shapes",
]

TEMPERATURE = ("contra_temp", "loss_fn.log_temperature")

# GRAM prefix -> gram-ray prefix, first match wins.
KEY_MAP = (
    ("vision_encoder.visual.", "vision.backbone.tower.visual."),
    ("audio_encoder.", "audio.backbone.beats."),
    ("multimodal_encoder.bert.", "text.backbone.model."),
    ("contra_head_t.linear.", "projections.text."),
    ("contra_head_v.linear.", "projections.video."),
    ("contra_head_a.linear.", "projections.audio."),
    ("contra_head_s.linear.", "projections.subtitle."),
    # The fusion and match head (model.itm_ratio > 0).
    ("itm_head.", "fusion.match_head."),
    ("hidden_trans_vision_multimodal.", "fusion.hidden_trans.video."),
    ("hidden_trans_audio_multimodal.", "fusion.hidden_trans.audio."),
    ("vision_frame_embedding", "fusion.part_embedding.video"),
    ("audio_frame_embedding", "fusion.part_embedding.audio"),
    ("vision_type_embeddings", "fusion.type_embedding.video"),
    ("audio_type_embeddings", "fusion.type_embedding.audio"),
)

# GRAM prefix -> why gram-ray does not load it (the key is kept in the imported checkpoint all the same).
UNUSED = {
    "vision_encoder.visual.head.": "EVA-CLIP's projection to its own CLIP space; GRAM uses its contrastive heads",
    "vision_encoder.text.": "EVA-CLIP's text tower: stored in GRAM's checkpoints, never run",
    "vision_encoder.logit_scale": "EVA-CLIP's own temperature, never used by GRAM",
    "multimodal_encoder.cls.": "BERT's masked-LM head (GRAM's captioning objectives)",
    "multimodal_encoder.bert.embeddings.position_ids": "a constant buffer that transformers rebuilds",
    "contra_head_d.": "the depth head: no depth modality in gram-ray yet",
    "contra_head_va.": "a head of fused vision+audio features, not used by GRAM's retrieval",
    "contra_head_vs.": "a head of fused vision+subtitle features, not used by GRAM's retrieval",
    "contra_head_vas.": "a head of fused vision+audio+subtitle features, not used by GRAM's retrieval",
    "hidden_trans_subtitle_multimodal.": "the fusion's subtitle projection: GRAM's matching loss fuses video and "
    "audio only",
    "subtitle_type_embeddings": "the fusion's subtitle type embedding: GRAM's matching loss fuses video and audio only",
}


def _unused_reason(key: str) -> str | None:
    return next((why for prefix, why in UNUSED.items() if key.startswith(prefix)), None)


def gram_to_gram_ray(key: str) -> str | None:
    """gram-ray's name for a GRAM key; None for keys gram-ray does not load (UNUSED) or does not know."""
    if key == TEMPERATURE[0]:
        return TEMPERATURE[1]
    if _unused_reason(key) is not None:
        return None
    return next((ours + key[len(theirs) :] for theirs, ours in KEY_MAP if key.startswith(theirs)), None)


def gram_ray_to_gram(key: str) -> str | None:
    """GRAM's name for a gram-ray key (the inverse of gram_to_gram_ray), None for keys GRAM has not."""
    if key == TEMPERATURE[1]:
        return TEMPERATURE[0]
    return next((theirs + key[len(ours) :] for theirs, ours in KEY_MAP if key.startswith(ours)), None)


def model_shapes(cfg: GramConfig, vocab: list[str] | None = None) -> dict[str, torch.Size]:
    """The state-dict shapes of the model cfg describes, built on the meta device from its architectures (no
    memory, no download: pretrained encoders are replaced by random weights of the same architecture)."""
    from gram_ray.model.architectures import random_weights
    from gram_ray.model.gram import build_model

    shaped = cfg.model_copy(deep=True)
    shaped.model = random_weights(shaped.model)
    shaped.model.compile = False
    with torch.device("meta"):
        model = build_model(shaped, vocab)
    return {k: v.shape for k, v in model.state_dict().items()}


@dataclass
class ImportReport:
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # gram-ray keys the GRAM checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # GRAM keys with no place in gram-ray's model
    misshaped: list[str] = field(default_factory=list)  # "gram key -> our key: theirs vs ours"
    unused: dict[str, str] = field(default_factory=dict)  # GRAM key -> why it is kept but not loaded
    resized: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def lines(self) -> list[str]:
        out = [f"loaded {self.loaded} tensors into gram-ray's model"]
        out += [f"resized: {r}" for r in self.resized]
        by_reason: dict[str, int] = {}
        for why in self.unused.values():
            by_reason[why] = by_reason.get(why, 0) + 1
        out += [f"kept, not loaded ({n} keys): {why}" for why, n in by_reason.items()]
        out += [f"MISSING in the GRAM checkpoint: {k}" for k in self.missing]
        out += [f"UNEXPECTED (no place in the model): {k}" for k in self.unexpected]
        out += [f"MIS-SHAPED: {m}" for m in self.misshaped]
        return out


def _resize_pos_embed(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """EVA's position embedding [1, 1 + g*g, D] resampled to the model's grid (another vision resolution)."""
    from timm.layers import resample_abs_pos_embed

    grid = int(math.isqrt(shape[1] - 1))
    return resample_abs_pos_embed(value.float(), new_size=[grid, grid], num_prefix_tokens=1).to(value.dtype)


def import_gram_state(
    source: dict[str, torch.Tensor], shapes: dict[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ImportReport]:
    """(gram-ray state dict, GRAM's unused tensors by their GRAM names, report) for a GRAM state dict and the
    shapes of the gram-ray model to load it into (model_shapes)."""
    state: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    report = ImportReport()
    for key, value in source.items():
        ours = gram_to_gram_ray(key)
        if ours is None:
            unused[key] = value
            why = _unused_reason(key)
            if why is None:
                report.unexpected.append(key)
            else:
                report.unused[key] = why
            continue
        if ours not in shapes:  # e.g. the subtitle head of a model without subtitles, the fusion of one without DAM
            unused[key] = value
            report.unused[key] = f"{ours} is not part of this model (model.modalities, model.itm_ratio)"
            continue
        if key == TEMPERATURE[0]:
            # GRAM keeps t itself (a scalar); gram-ray log t, in one element
            value = torch.log(value.to(torch.float64)).to(torch.float32).reshape(shapes[ours])
        if value.shape != shapes[ours]:
            if ours.endswith("visual.pos_embed") and value.ndim == 3 and value.shape[-1] == shapes[ours][-1]:
                report.resized.append(f"{key}: {list(value.shape)} -> {list(shapes[ours])} (another vision resolution)")
                value = _resize_pos_embed(value, shapes[ours])
            elif ".part_embedding." in ours and value.ndim == 3 and value.shape[-1] == shapes[ours][-1]:
                # GRAM's frame/window embeddings are as long as its training run's clips: nearest, as GRAM loads them
                report.resized.append(f"{key}: {list(value.shape)} -> {list(shapes[ours])} (other frame counts)")
                value = torch.nn.functional.interpolate(value.transpose(1, 2), shapes[ours][1], mode="nearest")
                value = value.transpose(1, 2).contiguous()
            else:
                report.misshaped.append(f"{key} -> {ours}: checkpoint {list(value.shape)}, model {list(shapes[ours])}")
                continue
        state[ours] = value
    report.loaded = len(state)
    report.missing = [k for k in shapes if k not in state]
    return state, unused, report


def import_gram_checkpoint(
    source: str | Path, cfg: GramConfig, out: str | Path, allow_partial: bool = False, log=print
) -> ImportReport:
    """Write a gram-ray checkpoint folder at `out` from one of GRAM's checkpoints, for the model `cfg` describes.
    Refuses (CheckpointError, nothing written) when a key is missing, unexpected or mis-shaped, unless
    allow_partial. GRAM's checkpoints are plain state dicts: read with weights_only=True."""
    from gram_ray.model.checkpoint import CheckpointError, write_checkpoint

    log(f"reading {source} ...")
    state = load_weights(source)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not a GRAM checkpoint: expected a flat state dict of tensors")
    log(f"  {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e9:.2f} B values")
    log("building the shapes of the configured model (meta device: no memory, no download) ...")
    weights, unused, report = import_gram_state(state, model_shapes(cfg))
    for line in report.lines():
        log("  " + line)
    if not report.complete and not allow_partial:
        raise CheckpointError(
            f"{source} does not fit the configured model ({len(report.missing)} missing, {len(report.unexpected)} "
            f"unexpected, {len(report.misshaped)} mis-shaped; listed above). Check model.* in the config (GRAM's "
            "model: vision eva_clip, audio beats, text with cross_attention); --allow-partial imports it anyway."
        )
    imported = cfg.model_copy(deep=True)
    imported.model.init_from = None  # the folder is itself the starting point
    write_checkpoint(
        out,
        {
            "model": weights,
            "optimizer": None,
            "scheduler": None,
            "step": 0,
            "epoch": 0,
            "epoch_complete": True,
            "consumed_ids": [],
            "rng_states": None,
            "config": imported.model_dump(mode="json"),
            "vocab": None,
            "gram_unused": unused,  # GRAM's other weights by their GRAM names (the fusion's, until it exists)
            "imported_from": str(source),
            "import_report": report.lines(),
        },
        imported,
    )
    log(f"wrote {out}: start training from it with --set model.init_from={out}")
    return report
