"""How a cache stores a clip's frames: raw uint8 tensors, or one JPEG per frame (`data.video.cache_codec`).

Raw frames at GRAM's settings (4 frames of 224 x 224 x 3, 4 cached draws) are 2.4 MB a clip; a 224 px JPEG at
quality 90 is a small fraction of that, and libjpeg-turbo decodes one in about a millisecond on a CPU core.
Encoding happens once, when a cache is written; decoding happens in the training input pipeline: in the
collate function on the CPU (Ray Data's threads next to the worker: `data.video.decode_device: cpu`), or, with
`decode_device: cuda`, on the training GPU in one batched nvjpeg call per batch (`decode_on_device`). Either way
the model sees the same uint8 [B, N, 3, S, S] frames, so augmentation, frame draws and resume are unchanged.

A JPEG cache row holds its frames in the column FRAMES_JPEG (the data contract, schema.py): a list of draws x N
JPEG byte strings, draw-major. Free of Ray.
"""

from __future__ import annotations

import numpy as np
import torch

from gram_ray.data.schema import FRAMES_JPEG

__all__ = [
    "FRAMES_JPEG",
    "encode_frames",
    "frames_of_draw",
    "decode_jpegs",
    "decode_on_device",
]


def encode_frames(frames: np.ndarray, quality: int) -> list[bytes]:
    """uint8 frames [..., 3, S, S] (any leading draws / frame axes) -> one JPEG each, in C order."""
    from torchvision.io import encode_jpeg

    flat = torch.from_numpy(np.ascontiguousarray(frames)).reshape(-1, *frames.shape[-3:])
    return [bytes(j.numpy()) for j in encode_jpeg(list(flat), quality=quality)]


def frames_of_draw(jpegs, num_frames: int, draw: int) -> list:
    """The JPEGs of one draw of a clip (its N frames, in order) from the draw-major list."""
    jpegs = list(jpegs)
    if len(jpegs) % num_frames:
        raise ValueError(
            f"a cached clip holds {len(jpegs)} JPEG frames, not a multiple of data.video.num_frames={num_frames}: "
            "the cache was written with other video settings; rebuild it (gram-ray preprocess --force)"
        )
    return jpegs[draw * num_frames : (draw + 1) * num_frames]


def _as_tensors(jpegs) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]


def decode_jpegs(clips: list[list], device: str | torch.device = "cpu") -> torch.Tensor:
    """JPEG frames of B clips (N each) -> uint8 [B, N, 3, S, S], decoded on `device` in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not clips:
        raise ValueError("no clips to decode")
    n = len(clips[0])
    flat = [j for clip in clips for j in clip]
    tensors = flat if flat and isinstance(flat[0], torch.Tensor) else _as_tensors(flat)
    images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images).view(len(clips), n, *images[0].shape)


def decode_on_device(batch: dict, device: torch.device) -> dict:
    """A batch whose frames were left as JPEG (decode_device: cuda) with its frames decoded on `device`."""
    if FRAMES_JPEG not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != FRAMES_JPEG}
    out["frames"] = decode_jpegs(batch[FRAMES_JPEG], device=device)
    return out
