"""What the benchmarks share: the hardware's name, synthetic caches of a config's shapes, reading a cache without
Ray, a process's memory, the config and vocabulary a benchmark trains with, and how each command reports."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gram_ray.config import GramConfig
from gram_ray.data.text import SPECIAL_TOKENS

__all__ = [
    "hardware_name",
    "cpu_model",
    "require_device",
    "video_like_frames",
    "write_synthetic_cache",
    "cache_batches",
    "process_memory",
    "PEAK_BF16_TFLOPS",
    "peak_bf16_tflops",
    "bench_config",
    "bench_vocab",
    "write_json",
    "cache_shards",
]


def require_device(device: str) -> None:
    """A clear error before any work when a CUDA device is asked for and torch sees none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu")


def cache_shards(cache: str) -> str:
    """The Parquet shards of an existing cache (a preprocess --out folder, a path or URI), or a ValueError saying
    what it is not."""
    from gram_ray import storage
    from gram_ray.data.preprocess import SHARDS

    shards = storage.join(storage.absolute(cache), SHARDS)
    if not storage.list_files(shards, ".parquet"):
        raise ValueError(f"no Parquet shards under {shards}: is {cache} a preprocess --out folder?")
    return shards


def write_json(result, path: Path | None) -> None:
    """A benchmark's whole result as JSON, where asked (--json)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2))


def hardware_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def video_like_frames(rng: np.random.Generator, shape: tuple[int, ...], size: int) -> np.ndarray:
    """uint8 frames [*shape, 3, size, size] that code like video frames: smooth random colour fields (14 x 14
    noise upsampled bicubically) with light sensor noise. At 224 px and JPEG quality 90 they take ~11.9 KB a
    frame, against ~11.1 KB for the real clips of ../shared/data; uniform noise would take ~5x that and decode
    slower, which would misstate a JPEG cache."""
    low = torch.from_numpy(rng.integers(0, 256, (int(np.prod(shape)), 3, 14, 14)).astype(np.float32))
    frames = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    frames += torch.from_numpy(rng.normal(0.0, 2.0, frames.shape).astype(np.float32))
    return frames.clamp(0, 255).to(torch.uint8).numpy().reshape(*shape, 3, size, size)


def write_synthetic_cache(out: str, rows: int, data, seed: int = 0, words: int = 1000, caption_words: int = 12) -> str:
    """A train cache of `rows` clips with random contents of the data config's shapes, in the layout
    preprocessing writes for it (data.video.cache_codec, data.audio.cache_codec, train_draws draws a clip),
    without decoding any media:
    for benchmarks of what happens after the cache. `out` may be a storage URI. Each caption is caption_words
    words drawn from w0 ... w<words-1> (MSR-VTT's captions average ~9 words). Returns its shards dir."""
    import ray.data

    from gram_ray import storage
    from gram_ray.data.fbank_codec import encode_fbank
    from gram_ray.data.frame_codec import encode_frames
    from gram_ray.data.parquet_layout import to_parquet_layout
    from gram_ray.data.preprocess import SHARDS, rows_per_shard
    from gram_ray.data.schema import AUDIO_FBANK_RANGE, AUDIO_FBANK_U8, FRAMES_JPEG, object_column

    v, a = data.video, data.audio
    draws = (v.train_draws,) if v.train_draws > 1 else ()

    def make(batch: dict) -> dict:
        ids = batch["id"]
        rng = np.random.default_rng([seed, int(ids[0])])
        n = len(ids)
        frames = video_like_frames(rng, (n, *draws, v.num_frames), v.size)
        if v.cache_codec == "jpeg":
            video = {FRAMES_JPEG: object_column([encode_frames(clip, v.jpeg_quality) for clip in frames])}
        else:
            video = {"frames": frames}
        fbank = rng.standard_normal((n, a.windows, a.window_frames, a.mel_bins)).astype(np.float32)
        audio = {"audio_fbank": fbank}
        if a.cache_codec == "uint8":
            audio = dict(zip((AUDIO_FBANK_U8, AUDIO_FBANK_RANGE), encode_fbank(fbank), strict=True))
        return {
            "id": np.array([f"clip{i:06d}" for i in ids], dtype=object),
            "captions": object_column(
                [[" ".join(f"w{w}" for w in rng.integers(0, words, caption_words))] for _ in ids]
            ),
            **video,
            **audio,
            "has_audio": np.ones(n, dtype=bool),
        }

    shards = storage.join(out, SHARDS)
    ds = ray.data.range(rows, override_num_blocks=max(1, rows // 256)).map_batches(make, batch_format="numpy")
    ds = ds.map_batches(to_parquet_layout, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    filesystem, path = storage.resolve(shards)
    ds.write_parquet(path, filesystem=filesystem, min_rows_per_file=rows_per_shard(data, "train"), use_dictionary=False)
    return shards


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes; {} when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {
                k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")
            }
    except (OSError, ValueError):
        return {}


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s; the first name contained in
# torch.cuda.get_device_name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def peak_bf16_tflops(hardware: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in hardware), None)


def bench_config(cfg: GramConfig, *, steps: int, warmup: int, workers: int, device: str, random: bool) -> GramConfig:
    """The config a benchmark trains: one epoch of warmup + steps optimizer steps per worker, every phase timed,
    no evaluation, W&B off; pretrained encoders swapped for random weights of the same architectures."""
    from gram_ray.model.architectures import random_weights

    c = cfg.model_copy(deep=True)
    if random:
        c.model = random_weights(c.model)
        c.model.init_from = None  # random weights are the point: no checkpoint to start from
    t = c.train
    t.epochs, t.grad_accum, t.time_steps, t.time_warmup_steps = 1, 1, True, warmup
    t.warmup_steps, t.log_every_steps, t.checkpoint_every_steps = 0, 10**9, None
    c.scaling.num_workers, c.scaling.use_gpu, c.scaling.max_failures = workers, device.startswith("cuda"), 0
    c.data.val_annotations = None
    c.wandb.enabled = False
    c.run.name, c.run.storage_path = f"bench-train-{int(time.time())}", None
    return c


def bench_vocab(cfg: GramConfig) -> list[str] | None:
    """A word vocabulary as large as the text encoder's (so its embedding table has the real size), or None
    when a tokenizer is named."""
    m = cfg.model
    if m.tokenizer or m.text.pretrained:
        return None
    words = int(m.text.config.get("vocab_size", 1000 + len(SPECIAL_TOKENS))) - len(SPECIAL_TOKENS)
    return SPECIAL_TOKENS + [f"w{i}" for i in range(words)]


def _numpy_batch(table) -> dict:
    """A pyarrow table of cache rows (tensor columns restored) -> the numpy batch Ray Data would give."""
    import pyarrow as pa

    from gram_ray.data.schema import object_column

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, pa.ExtensionType):  # Ray's tensor columns
            out[name] = column.to_numpy()
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            out[name] = object_column(column.to_pylist())
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def cache_batches(shards: str, batch_size: int) -> Iterator[dict]:
    """Numpy batches of cache rows (tensor columns restored), as Ray Data would hand them to the collate
    function: read from a cache's Parquet files (a local path or a storage URI) in file order, synchronously,
    without Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gram_ray import storage
    from gram_ray.data.parquet_layout import from_parquet_layout

    pending, rows = [], 0
    for path in storage.list_files(shards, ".parquet"):
        filesystem, inside = storage.resolve(path)
        with filesystem.open_input_file(inside) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                pending.append(pa.Table.from_batches([record_batch]))
                rows += record_batch.num_rows
                while rows >= batch_size:
                    table = pa.concat_tables(pending)
                    yield _numpy_batch(from_parquet_layout(table.slice(0, batch_size)))
                    rest = table.slice(batch_size)
                    pending, rows = [rest], rest.num_rows
