"""The architectures of the pretrained encoders gram-ray's configs name, as Hugging Face config fields.

A benchmark (or a dry run) of a real config needs the real model's shapes but must not download a gigabyte of
weights: `random_weights(model_cfg)` swaps each `pretrained` name for these fields, giving the same
architecture with random weights, built offline. The fields are those of each model's published config.json
(every field that changes a shape or the computation; the rest are transformers' defaults).
"""

from __future__ import annotations

from typing import Any

from gram_ray.config import ModelConfig

__all__ = ["KNOWN_ARCHITECTURES", "random_weights"]

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


def random_weights(model: ModelConfig) -> ModelConfig:
    """A copy of `model` whose pretrained encoders are the same architectures with random weights (no download).
    Text then uses a word vocabulary (nothing to download for a tokenizer either)."""
    out = model.model_copy(deep=True)
    for tower in ("text", "vision", "audio"):
        encoder = getattr(out, tower)
        if not encoder.pretrained:
            continue
        if encoder.pretrained not in KNOWN_ARCHITECTURES:
            raise ValueError(
                f"model.{tower}.pretrained={encoder.pretrained!r} has no architecture on record for random weights; "
                f"known: {sorted(KNOWN_ARCHITECTURES)}. Give model.{tower}.config (with model_type) instead."
            )
        encoder.config = dict(KNOWN_ARCHITECTURES[encoder.pretrained])
        encoder.pretrained = None
    out.tokenizer = None
    return out
