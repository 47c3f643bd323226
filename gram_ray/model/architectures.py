"""The architectures of the pretrained encoders gram-ray's configs name, as Hugging Face config fields.

A benchmark (or a dry run, or a checkpoint import) of a real config needs the real model's shapes but must not
download a gigabyte of weights: `random_weights(model_cfg)` swaps each `pretrained` name for these fields,
giving the same architecture with random weights, built offline. Hugging Face models: the fields of their
published config.json that change a shape or the computation (the rest are transformers' defaults). GRAM's
EVA-CLIP and BEATs files (known by file name): the sizes of their towers.
"""

from __future__ import annotations

from typing import Any

from gram_ray.config import EncoderConfig, ModelConfig

__all__ = ["KNOWN_ARCHITECTURES", "random_encoder", "random_weights"]

_BASE_TRANSFORMER = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}

KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # BERT-base, uncased: 110 M parameters (GRAM's text encoder).
    "bert-base-uncased": {
        "model_type": "bert",
        **_BASE_TRANSFORMER,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    },
    # CLIP ViT-B/16's vision tower: 86 M parameters, 224 px, 196 patches + CLS.
    "openai/clip-vit-base-patch16": {
        "model_type": "clip_vision_model",
        **_BASE_TRANSFORMER,
        "image_size": 224,
        "patch_size": 16,
        "projection_dim": 512,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    # AST fine-tuned on AudioSet: 86 M parameters, 128 mel bins x 1024 frames, 10 x 10 strides (1212 patches).
    "MIT/ast-finetuned-audioset-10-10-0.4593": {
        "model_type": "audio-spectrogram-transformer",
        **_BASE_TRANSFORMER,
        "patch_size": 16,
        "frequency_stride": 10,
        "time_stride": 10,
        "max_length": 1024,
        "num_mel_bins": 128,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    },
}


# GRAM's own encoders, loaded from local files (pretrained: a path), known by the file's name.
KNOWN_ARCHITECTURES |= {
    # EVA01-CLIP-g/14's vision tower: 1.01 B parameters, 224 px, 16 x 16 patches of 14 px + CLS.
    "EVA01_CLIP_g_14_psz14_s11B.pt": {
        "width": 1408,
        "depth": 40,
        "head_width": 88,
        "mlp_hidden": 6144,
        "patch_size": 14,
    },
    # BEATs iter3+ (AS2M): 90 M parameters; the checkpoint's own cfg.
    "BEATs_iter3_plus_AS2M.pt": {
        "encoder_layers": 12,
        "encoder_embed_dim": 768,
        "encoder_ffn_embed_dim": 3072,
        "encoder_attention_heads": 12,
        "activation_fn": "gelu",
        "layer_norm_first": False,
        "deep_norm": True,
        "conv_bias": False,
        "conv_pos": 128,
        "conv_pos_groups": 16,
        "relative_position_embedding": True,
        "num_buckets": 320,
        "max_distance": 800,
        "gru_rel_pos": True,
        "input_patch_size": 16,
        "embed_dim": 512,
        "layer_wise_gradient_decay_ratio": 0.6,
    },
}


def _known(pretrained: str) -> dict[str, Any] | None:
    from pathlib import PurePath

    return KNOWN_ARCHITECTURES.get(pretrained) or KNOWN_ARCHITECTURES.get(PurePath(pretrained).name)


def random_encoder(encoder: EncoderConfig, tower: str) -> EncoderConfig:
    """A copy of one encoder's config: a pretrained one becomes the same architecture with random weights."""
    out = encoder.model_copy(deep=True)
    if not out.pretrained:
        return out
    known = _known(out.pretrained)
    if known is None:
        raise ValueError(
            f"model.{tower}.pretrained={out.pretrained!r} has no architecture on record for random weights; "
            f"known: {sorted(KNOWN_ARCHITECTURES)}. Give model.{tower}.config (its sizes) instead."
        )
    out.config, out.pretrained = dict(known), None
    return out


def random_weights(model: ModelConfig) -> ModelConfig:
    """A copy of `model` whose pretrained encoders are the same architectures with random weights (no download).
    Text then uses a word vocabulary (nothing to download for a tokenizer either)."""
    out = model.model_copy(deep=True)
    for tower in ("text", "vision", "audio"):
        setattr(out, tower, random_encoder(getattr(out, tower), tower))
    out.tokenizer = None
    return out
