"""`gram-ray bench decode`: clips/s on one core of the video decoders (a naive per-frame seek loop, gram-ray's PyAV
decode, decord's batch read) against reading the same clips back from a Parquet cache."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["bench_decode", "decode_table", "DECODE_PATHS"]

DECODE_PATHS = ("naive_seek", "gram_ray_decode", "decord_batch", "parquet_cache")


def _naive_decode(path: str, num_frames: int, size: int) -> np.ndarray:
    """The baseline: seek to each sampled frame and read it at full resolution, then resize and crop."""
    from decord import VideoReader, cpu

    from gram_ray.data.video import segment_indices

    reader = VideoReader(path, ctx=cpu(0), num_threads=1)
    frames = []
    for index in segment_indices(len(reader), num_frames, "eval"):
        reader.seek_accurate(int(index))
        frame = torch.from_numpy(reader.next().asnumpy()).permute(2, 0, 1)[None].float()
        h, w = frame.shape[-2:]
        scale = size / min(h, w)
        frame = F.interpolate(frame, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear")
        top, left = (frame.shape[-2] - size) // 2, (frame.shape[-1] - size) // 2
        frames.append(frame[0, :, top : top + size, left : left + size].to(torch.uint8))
    return torch.stack(frames).numpy()


def bench_decode(videos, *, num_frames: int = 8, size: int = 224, reps: int = 3, progress=print) -> dict:
    """Clips per second on one core: the naive seek loop, our decoders, and reading the clips back from the cache
    (the same Parquet layout and read path training uses)."""
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from gram_ray.data.manifest import VIDEO_EXTENSIONS
    from gram_ray.data.parquet_layout import from_parquet_layout, to_parquet_layout
    from gram_ray.data.video import decode_video

    torch.set_num_threads(1)  # per core: the decoders are already asked for one thread
    paths = sorted(str(p) for p in Path(videos).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not paths:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in {videos}")

    methods = {
        "naive_seek": ("naive per-frame seek-and-read (decord)", lambda p: _naive_decode(p, num_frames, size)),
        "gram_ray_decode": (
            "gram_ray decode (pyav, non-reference frames skipped)",
            lambda p: decode_video(p, num_frames, size, "eval", decoder="pyav"),
        ),
        "decord_batch": (
            "decord get_batch, decoded small",
            lambda p: decode_video(p, num_frames, size, "eval", decoder="decord"),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(reps):  # interleaved, so a noisy neighbour slows every method alike
        for name, (label, fn) in methods.items():
            if rep == 0:
                progress(f"  {label} over {len(paths)} clips ...")
            start = time.perf_counter()
            for p in paths:
                fn(p)
            times[name].append(time.perf_counter() - start)
    rates = {name: len(paths) / statistics.median(t) for name, t in times.items()}

    progress("  reading the same clips from a Parquet cache ...")
    frames = np.stack([decode_video(p, num_frames, size, "eval") for p in paths])
    with tempfile.TemporaryDirectory() as tmp:
        shard = f"{tmp}/cache.parquet"
        pq.write_table(to_parquet_layout(pa.table({"frames": ArrowTensorArray.from_numpy(frames)})), shard)
        cache_reps = max(reps, 50)  # reading is fast: more passes for a stable median
        start = time.perf_counter()
        for _ in range(cache_reps):
            from_parquet_layout(pq.read_table(shard)).column("frames").chunk(0).to_numpy()
        rates["parquet_cache"] = len(paths) * cache_reps / (time.perf_counter() - start)
    return {"clips": len(paths), **rates}


def decode_table(result: dict) -> str:
    lines = [f"{'path':<28} {'clips/s/core':>13}"]
    lines += [f"{name:<28} {result[name]:>13.2f}" for name in DECODE_PATHS]
    lines.append(
        f"\ndecode is {result['gram_ray_decode'] / result['naive_seek']:.2f}x the per-frame seek loop; reading the "
        f"cache is {result['parquet_cache'] / result['gram_ray_decode']:.0f}x decoding ({result['clips']} clips)."
    )
    return "\n".join(lines)
