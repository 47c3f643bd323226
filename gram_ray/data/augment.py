"""Training-time augmentation of decoded frames, on the device that trains (the cheapest place: no extra decode,
no CPU work per clip, and the cache stays augmentation-free).

crop_flip is GRAM's training transform for MSR-VTT and VAST: RandomResizedCrop to the frame size with an area of
0.8-1.0 of the frame and an aspect ratio of 3/4-4/3 (torchvision's sampling: 10 tries, then the whole frame),
then a horizontal flip with probability 0.5. One crop and one flip per clip, shared by its frames, so motion
stays coherent. Draws come from torch's generator of the frames' device (checkpointed with the run's RNG state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["crop_flip"]

SCALE, RATIO = (0.8, 1.0), (3 / 4, 4 / 3)


def _crop_box(height: int, width: int, device: torch.device) -> tuple[int, int, int, int]:
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * torch.empty(1, device=device).uniform_(*SCALE).item()
        ratio = math.exp(torch.empty(1, device=device).uniform_(*log_ratio).item())
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), device=device))
            left = int(torch.randint(0, width - w + 1, (1,), device=device))
            return top, left, h, w
    return 0, 0, height, width


def crop_flip(frames: torch.Tensor) -> torch.Tensor:
    """frames [B, N, C, H, W] float -> the same shape, each clip randomly resized-cropped and maybe flipped."""
    b, n, c, h, w = frames.shape
    out = torch.empty_like(frames)
    flips = torch.rand(b, device=frames.device) < 0.5
    for i in range(b):
        top, left, ch, cw = _crop_box(h, w, frames.device)
        clip = frames[i, :, :, top : top + ch, left : left + cw]
        if (ch, cw) != (h, w):
            clip = F.interpolate(clip, size=(h, w), mode="bilinear", align_corners=False)
        out[i] = clip.flip(-1) if flips[i] else clip
    return out
