"""Video clips -> uint8 frames [N, 3, S, S] with decord, decoded small.

N frames come from N equal segments of the clip: the middle frame of each in eval mode (deterministic), a
random frame of each in train mode (temporal augmentation). decord is asked for frames whose short side is
already S, so the decoder's scaler does the resize and full-resolution frames are never materialised; the
centre crop is a slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
from decord import DECORDError, VideoReader, cpu

from gram_ray.data.errors import DecodeError

__all__ = ["segment_indices", "decode_video", "probe_size"]

Mode = Literal["train", "eval"]


def segment_indices(num_total: int, num_frames: int, mode: Mode, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame index per equal segment: the middle (eval) or a uniformly random one (train)."""
    if num_total < num_frames:
        raise DecodeError(
            f"video has {num_total} frames, fewer than the {num_frames} asked for (data.video.num_frames)"
        )
    edges = np.linspace(0, num_total, num_frames + 1)
    starts, ends = np.floor(edges[:-1]).astype(int), np.maximum(np.floor(edges[1:]).astype(int), 1)
    ends = np.maximum(ends, starts + 1)
    if mode == "eval":
        return (starts + ends - 1) // 2
    rng = rng or np.random.default_rng()
    return rng.integers(starts, ends)


def probe_size(path: str) -> tuple[int, int]:
    """(width, height) from the container header, without decoding a frame."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError("file has no video stream")
            stream = container.streams.video[0]
            return stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise DecodeError(f"not a readable video ({type(e).__name__}: {e})") from None


def _scaled(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _read(reader: VideoReader, num_frames: int, mode: Mode, rng) -> np.ndarray:
    return reader.get_batch(list(segment_indices(len(reader), num_frames, mode, rng))).asnumpy()  # [N, H, W, 3]


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def decode_video(path: str | None, num_frames: int, size: int, mode: Mode, rng: np.random.Generator | None = None):
    """uint8 [num_frames, 3, size, size]. Raises DecodeError with the reason for any file it cannot use."""
    if path is None or not Path(path).is_file():
        raise DecodeError("video file not found")
    width, height = _scaled(*probe_size(path), size)
    try:
        try:
            frames = _read(
                VideoReader(path, ctx=cpu(0), width=width, height=height, num_threads=1), num_frames, mode, rng
            )
        except DECORDError as e:
            if "must exactly match" not in str(e):
                raise
            # decord's scaler mis-sizes some small outputs (e.g. 16, 24, 48 px wide): decode at the native size
            # and resize here instead.
            frames = _resize(_read(VideoReader(path, ctx=cpu(0), num_threads=1), num_frames, mode, rng), width, height)
    except DECORDError as e:
        raise DecodeError(f"video cannot be decoded (truncated or corrupt?): {str(e).splitlines()[0][:200]}") from None
    top, left = (frames.shape[1] - size) // 2, (frames.shape[2] - size) // 2
    frames = frames[:, top : top + size, left : left + size]
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
