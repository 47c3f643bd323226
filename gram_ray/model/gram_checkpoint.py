"""GRAM's released checkpoints in gram-ray: the key mapping between GRAM's model and gram-ray's, both ways.

A GRAM checkpoint is the flat state dict of GRAM's model (`model_step_N.pt`): `vision_encoder.*` (the whole
EVA-CLIP model), `audio_encoder.*` (BEATs), `multimodal_encoder.*` (BERT with cross-attention, and its masked-LM
head), `contra_head_{t,v,a,s,d}` (the contrastive heads, no bias), `contra_temp` (the temperature itself),
`itm_head.*`, `hidden_trans_*`, `*_frame_embedding`, `*_type_embeddings` (the fusion and match head, loaded into
gram-ray's `fusion.*` when the model trains the matching loss).

`import_gram_state` maps each key to gram-ray's model (built on the meta device: no memory, no download), fits
the weights to it (model/fitting.py: frame and window embeddings, EVA's positions), and reports what is missing,
unexpected or mis-shaped. Keys gram-ray does not use are kept, by their GRAM names, under the checkpoint's
"gram_unused" entry, each with the reason (UNUSED); the weights of parts the import's config has not and GRAM's
own resized tensors are kept for other recipes; nothing is dropped. The temperature becomes gram-ray's log form:
log(contra_temp).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gram_ray.config import GramConfig
from gram_ray.model.fitting import FitReport, adapt_state
from gram_ray.model.safe_load import load_weights

__all__ = [
    "KEY_MAP",
    "UNUSED",
    "GramImport",
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
class GramImport:
    state: dict[str, torch.Tensor]  # gram-ray's state dict for the import's model
    unused: dict[str, torch.Tensor]  # GRAM's tensors gram-ray does not load, by their GRAM names (report.unused: why)
    spare: dict[str, torch.Tensor]  # by gram-ray's names: parts the import's model has not (the subtitle head)
    originals: dict[str, torch.Tensor]  # by gram-ray's names: GRAM's own tensors that were resized for this model
    report: FitReport


def import_gram_state(source: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> GramImport:
    """A GRAM state dict mapped onto the gram-ray model of `shapes` (model_shapes). Kept beside the state, so that
    another recipe's model starts from GRAM's weights as well (checkpoint.init_weights): the weights of the parts
    this model leaves out, and GRAM's own tensors where they were resized (a recipe resizes from GRAM's, as GRAM
    does)."""
    renamed: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    unused: dict[str, torch.Tensor] = {}
    unexpected, reasons = [], {}
    for key, value in source.items():
        ours = gram_to_gram_ray(key)
        if ours is None:
            unused[key] = value
            why = _unused_reason(key)
            if why is None:
                unexpected.append(key)
            else:
                reasons[key] = why
            continue
        if key == TEMPERATURE[0]:  # GRAM keeps t itself (a scalar); gram-ray log t, in one element
            value = torch.log(value.to(torch.float64)).to(torch.float32).reshape(-1)
        renamed[ours], names[ours] = value, key
    state, report = adapt_state(renamed, shapes, names)
    spare = {}
    for why, keys in report.left_out.items():
        for ours in keys:
            spare[ours] = renamed[ours]
            reasons[names[ours]] = why.replace("this recipe has", "the import's config has")
    report.left_out = {}  # kept as spare weights for other recipes: reported with the unused ones
    report.unexpected = unexpected + report.unexpected
    report.unused = reasons
    originals = {k: renamed[k] for k, v in state.items() if v.shape != renamed[k].shape}
    return GramImport(state, unused, spare, originals, report)


def import_gram_checkpoint(
    source: str | Path, cfg: GramConfig, out: str | Path, allow_partial: bool = False, log=print
) -> FitReport:
    """Write a gram-ray checkpoint folder at `out` from one of GRAM's checkpoints, for the model `cfg` describes.
    Refuses (CheckpointError, nothing written) when a key is missing, unexpected or mis-shaped, unless
    allow_partial. GRAM's checkpoints are plain state dicts: read with weights_only=True."""
    from gram_ray.model.checkpoint import ORIGINALS, SPARE, CheckpointError, write_checkpoint

    log(f"reading {source} ...")
    state = load_weights(source)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not a GRAM checkpoint: expected a flat state dict of tensors")
    log(f"  {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e9:.2f} B values")
    log("building the shapes of the configured model (meta device: no memory, no download) ...")
    imported_state = import_gram_state(state, model_shapes(cfg))
    report = imported_state.report
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
            "model": imported_state.state,
            "optimizer": None,
            "scheduler": None,
            "step": 0,
            "epoch": 0,
            "epoch_complete": True,
            "epoch_progress": None,
            "rng_states": None,
            "config": imported.model_dump(mode="json"),
            "vocab": None,
            "gram_unused": imported_state.unused,  # by GRAM's names, each with its reason in import_report
            # For recipes other than the import's (checkpoint.init_weights): the weights of parts its config has
            # not, and GRAM's own tensors where they were resized.
            SPARE: imported_state.spare,
            ORIGINALS: imported_state.originals,
            "imported_from": str(source),
            "import_report": report.lines(),
        },
        imported,
    )
    log(f"wrote {out}: start training from it with --set model.init_from={out}")
    return report
