"""How a cache stores a clip's audio filterbank: float32, or 8 bits a value (`data.audio.cache_codec`).

At GRAM's settings a filterbank window is 1024 frames x 64 mel bins: 256 KB in float32, more than four JPEG frames
of a clip together. Stored as uint8, each window affinely mapped from its own [min, max] onto 0..255 (the pair kept
beside it), it is a quarter of that, and the error is at most (max - min) / 510 per value: on the shared real
clips at most 0.0065 (RMS 0.0032) on values whose spread is 0.32 (docs/data.md). The input pipeline turns it back
into float32 in the collate function (one multiply-add), so the model sees a float32 [A, L, mel_bins] filterbank
either way. Free of Ray.
"""

from __future__ import annotations

import numpy as np

from gram_ray.data.schema import AUDIO_FBANK_RANGE, AUDIO_FBANK_U8

__all__ = ["AUDIO_FBANK_U8", "AUDIO_FBANK_RANGE", "encode_fbank", "decode_fbank"]


def encode_fbank(fbank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., A, L, M] -> (uint8 [..., A, L, M], float32 [..., A, 2]: each window's min and max)."""
    lo = fbank.min(axis=(-2, -1), keepdims=True)
    hi = fbank.max(axis=(-2, -1), keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    q = np.rint((fbank - lo) / scale).clip(0, 255).astype(np.uint8)
    return q, np.concatenate([lo, hi], axis=-1)[..., 0, :].astype(np.float32)


def decode_fbank(q: np.ndarray, value_range: np.ndarray) -> np.ndarray:
    """(uint8 [..., A, L, M], float32 [..., A, 2]) -> float32 [..., A, L, M]."""
    value_range = np.asarray(value_range, dtype=np.float32)
    lo, hi = value_range[..., 0, None, None], value_range[..., 1, None, None]
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    return np.asarray(q, dtype=np.float32) * scale + lo
