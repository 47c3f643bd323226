"""Built-in benchmarks (`gram-ray bench ...`): side-by-side measurements in one run, never timed tests."""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gram_ray.volume import gram_volume

__all__ = [
    "paper_volume",
    "VOLUME_VARIANTS",
    "bench_volume",
    "VolumeBenchResult",
    "hardware_name",
    "cpu_model",
    "bench_decode",
    "video_like_frames",
    "write_synthetic_cache",
    "bench_shuffle",
]


def paper_volume(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The GRAM paper's construction, kept here only as the baseline: every pair's k x k Gram matrix is
    stacked into a [B1, B2, k, k] tensor, then torch.det and sqrt(|det|)."""
    b1, b2 = anchor.shape[0], others[0].shape[0]
    vectors = [anchor, *others]
    rows = []
    for i, u in enumerate(vectors):
        row = []
        for j, v in enumerate(vectors):
            if i == 0 and j == 0:
                entry = (u * u).sum(-1)[:, None].expand(b1, b2)
            elif i == 0:
                entry = u @ v.T
            elif j == 0:
                entry = v @ u.T
            else:
                entry = (u * v).sum(-1)[None, :].expand(b1, b2)
            row.append(entry)
        rows.append(torch.stack(row, -1))
    gram = torch.stack(rows, -2)  # [B1, B2, k, k]
    return torch.det(gram).abs().sqrt()


def _cosine_logits(anchor: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    return anchor @ others[0].T


def _volume_logits(fn: Callable) -> Callable:
    return lambda anchor, *others: -fn(anchor, *others)


# name -> (logits function, what it is). All three feed the same bidirectional cross-entropy.
VOLUME_VARIANTS: dict[str, tuple[Callable, str]] = {
    "paper": (_volume_logits(paper_volume), "stacked k x k Gram + torch.det (the paper's code)"),
    "gram_volume": (_volume_logits(gram_volume), "gram_ray.volume.gram_volume"),
    "cosine": (_cosine_logits, "cosine InfoNCE of the same shapes (the floor)"),
}


def _compiled_variants() -> dict[str, tuple[Callable, str]]:
    """The volume and the floor through torch.compile (fullgraph: a graph break is an error). The volume uses
    the static-shape refinement (COMPILED_REFINE pairs per row), as VolumeContrastiveLoss(compile=True) does."""
    from functools import partial

    from gram_ray.loss import COMPILED_REFINE

    volume = torch.compile(partial(gram_volume, refine=COMPILED_REFINE), fullgraph=True)
    return {
        "gram_volume+compile": (
            _volume_logits(volume),
            f"gram_volume, static refinement ({COMPILED_REFINE}/row), compiled",
        ),
        "cosine+compile": (torch.compile(_cosine_logits, fullgraph=True), "cosine floor, compiled"),
    }


def _loss(logits: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    b1, b2 = logits.shape
    logits = logits / temperature
    rows = torch.arange(b1, device=logits.device) % b2
    cols = torch.arange(b2, device=logits.device) % b1
    return 0.5 * (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, cols))


def _inputs(k: int, b1: int, b2: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    anchor = F.normalize(torch.randn(b1, dim, generator=g), dim=-1)
    others = [F.normalize(torch.randn(b2, dim, generator=g), dim=-1) for _ in range(k - 1)]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (anchor, *others)]


def _step(fn: Callable, inputs: list[torch.Tensor]) -> None:
    for t in inputs:
        t.grad = None
    _loss(fn(*inputs)).backward()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_memory(
    variant: str, k: int, b1: int, b2: int, dim: int, device: str, dtype: str, fn: Callable | None = None
) -> int:
    """Peak extra memory of one forward+backward step (inputs excluded)."""
    fn = fn or VOLUME_VARIANTS[variant][0]
    inputs = _inputs(k, b1, b2, dim, device, getattr(torch, dtype))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # The CPU allocator keeps no peak statistic: this runs in a fresh process, so the high-water mark of its
    # resident set during the first step, minus the resident set before it, is the step's peak.
    base = _rss_bytes()
    _step(fn, inputs)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)


def _peak_memory_in_child(args: tuple, threads: int) -> int:
    torch.set_num_threads(threads)
    return _peak_memory(*args)


@dataclass
class VolumeBenchResult:
    variant: str
    description: str
    seconds: float
    peak_bytes: int


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


def bench_volume(
    *,
    device: str = "cpu",
    k: int = 3,
    b1: int = 256,
    b2: int = 1024,
    dim: int = 512,
    dtype: str = "float32",
    reps: int = 5,
    compile: bool = False,
    progress: Callable[[str], None] = print,
) -> list[VolumeBenchResult]:
    """Forward + backward of the bidirectional loss on each variant's logits.

    Timed repetitions are interleaved (paper, ours, floor, paper, ...) so that a noisy machine slows every
    variant alike and the ratios stay meaningful; the median of each is reported. compile adds the compiled
    volume and floor (their peak memory is measured on CUDA only: on CPU it would need a compile per process)."""
    variants = dict(VOLUME_VARIANTS)
    peaks = {name: 0 for name in variants}
    ctx = mp.get_context("spawn")
    for name in variants:
        progress(f"  {name}: peak memory of one step (k={k}, B1={b1}, B2={b2}, D={dim}, {dtype}, {device}) ...")
        args = (name, k, b1, b2, dim, device, dtype)
        if device.startswith("cuda"):
            peaks[name] = _peak_memory(*args)
        else:
            with ctx.Pool(1) as pool:
                peaks[name] = pool.apply(_peak_memory_in_child, (args, torch.get_num_threads()))
    if compile:  # after the CPU children: a parent that has loaded the compiler makes their baselines meaningless
        variants |= _compiled_variants()
        for name in set(variants) - set(peaks):
            peaks[name] = (
                _peak_memory(name, k, b1, b2, dim, device, dtype, fn=variants[name][0])
                if device.startswith("cuda")
                else 0
            )
    names = list(variants)

    inputs = _inputs(k, b1, b2, dim, device, getattr(torch, dtype))
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: compilation, first-call allocations and kernel selection are not timed
        if name not in VOLUME_VARIANTS:
            progress(f"  {name}: compiling ...")
        _step(variants[name][0], inputs)
    progress(f"  timing {reps} interleaved repetitions of each ...")
    for _ in range(reps):
        for name in names:
            _sync(device)
            start = time.perf_counter()
            _step(variants[name][0], inputs)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return [VolumeBenchResult(name, variants[name][1], statistics.median(times[name]), peaks[name]) for name in names]


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
    preprocessing writes for it (data.video.cache_codec, train_draws draws a clip), without decoding any media:
    for benchmarks of what happens after the cache. `out` may be a storage URI. Each caption is caption_words
    words drawn from w0 ... w<words-1> (MSR-VTT's captions average ~9 words). Returns its shards dir."""
    import ray.data

    from gram_ray import storage
    from gram_ray.data.frame_codec import encode_frames
    from gram_ray.data.parquet_layout import to_parquet_layout
    from gram_ray.data.preprocess import SHARDS, rows_per_shard
    from gram_ray.data.schema import FRAMES_JPEG, object_column

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
        return {
            "id": np.array([f"clip{i:06d}" for i in ids], dtype=object),
            "captions": object_column(
                [[" ".join(f"w{w}" for w in rng.integers(0, words, caption_words))] for _ in ids]
            ),
            **video,
            "audio_fbank": rng.standard_normal((n, a.windows, a.window_frames, a.mel_bins)).astype(np.float32),
            "has_audio": np.ones(n, dtype=bool),
        }

    shards = storage.join(out, SHARDS)
    ds = ray.data.range(rows, override_num_blocks=max(1, rows // 256)).map_batches(make, batch_format="numpy")
    ds = ds.map_batches(to_parquet_layout, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    filesystem, path = storage.resolve(shards)
    ds.write_parquet(path, filesystem=filesystem, min_rows_per_file=rows_per_shard(data), use_dictionary=False)
    return shards


def _drain_shard(shard, cfg, epoch: int, rank: int) -> None:
    """One worker's epoch over its shard, batched and locally shuffled as training does, without collating
    (tokenising is the same work whatever the shuffle)."""
    from gram_ray.train.trainer import train_iter_options

    options = train_iter_options(cfg, None, epoch, rank)
    del options["collate_fn"]
    for _ in shard.iter_batches(batch_format="numpy", **options):
        pass


def bench_shuffle(cfg, shards: str, *, epochs: int = 3, workers: int = 2, progress=print) -> dict:
    """Seconds per epoch for the train split's order, side by side: no shuffle, block order plus a local buffer,
    and a full random_shuffle; through the same pieces training uses (the cache kept in memory when it fits,
    Ray Train's equal streaming split, each worker's iter_torch_batches), without the model. The first epoch
    of each mode is warm-up and left out of the median."""
    import threading

    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.train.trainer import keep_in_memory, shuffled

    ds = keep_in_memory(read_cache(shards), cfg)
    rows = ds.count()
    progress(f"  {rows} rows in {ds.num_blocks()} blocks of {cfg.train.batch_size} kept in Ray's object store")
    result = {"rows": rows, "workers": workers, "epochs": epochs, "seconds_per_epoch": {}}
    for mode in ("none", "blocks", "full"):
        c = cfg.model_copy(deep=True)
        c.train.shuffle = mode
        split = shuffled(ds, c, start_epoch=0).streaming_split(workers, equal=True)
        times = []
        for epoch in range(epochs):
            start = time.perf_counter()
            threads = [
                threading.Thread(target=_drain_shard, args=(split[rank], c, epoch, rank)) for rank in range(workers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            times.append(time.perf_counter() - start)
        progress(f"  shuffle={mode}: " + ", ".join(f"{t:.2f}" for t in times) + " s per epoch")
        result["seconds_per_epoch"][mode] = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return result
