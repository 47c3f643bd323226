"""`gram-ray bench data`: the training input pipeline alone, stage by stage, without the model.

What one training worker's input costs, per clip, on one CPU core (torch and the decoders held to one thread):
  read       the cache's Parquet files, from a local path or a storage URI, into batches of cache rows;
  decode     this epoch's frame draw of each clip: picked out of the raw tensors, or its JPEGs decoded
             (data.video.decode_device: cpu; with decode_device: cuda the JPEGs stay as they are here);
  collate    the rest of the collate function: captions drawn and tokenised, filterbanks made tensors;
  to device  the model batch copied to the training device; with decode_device: cuda, its JPEGs decoded there in
             one batched nvjpeg call (device time, not a CPU core's);
  augment    crop_flip as the vision encoder runs it on the training device (device time).
Each stage is timed alone over the same batches; then the whole pipeline (read, collate, to device) is timed as
the training loop gets it, as a check on the sum. Passes are interleaved across variants and the median kept, so
a noisy machine slows every variant alike.

Cores per GPU = the clips/s one GPU trains on / the CPU pipeline's clips/s per core. The GPU's rate is measured
(`bench train --json`) or derived from the model's training FLOPs a clip (memory.training_flops_per_clip, on the
meta device) at a stated MFU of the GPU's dense bf16 peak. Ray Data's own overhead (object store, threads) is
not in these figures: `bench train`'s path (c) has it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch

from gram_ray.bench.common import cache_batches, peak_bf16_tflops
from gram_ray.config import GramConfig
from gram_ray.data.collate import Collate
from gram_ray.data.schema import FRAMES_JPEG, ID
from gram_ray.model.device import to_device

__all__ = ["DEFAULT_GPU", "DEFAULT_MFU", "gpu_rate", "bench_data", "run_bench_data", "data_table"]

# The training nodes of cluster/aws.yaml; MFU that GRAM-sized ViT training reaches in bf16 with checkpointing.
DEFAULT_GPU, DEFAULT_MFU = "A10G", 0.4
CPU_STAGES = ("read", "decode", "collate")


def gpu_rate(cfg: GramConfig, *, train_json: Path | None, gpu: str, mfu: float) -> dict:
    """Clips/s that one GPU trains the config's model on: bench train's measurement when given, else the
    training FLOPs a clip at `mfu` of the GPU's dense bf16 peak."""
    from gram_ray.train.memory import training_flops_per_clip

    if train_json is not None:
        try:
            result = json.loads(Path(train_json).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{train_json} is not valid JSON ({e}); write it with `gram-ray bench train --json`"
            ) from None
        path = next((p for p in ("ray", "loop", "plain") if p in result.get("paths", {})), None)
        if path is None:
            raise ValueError(f"{train_json} holds no bench train paths; write it with `gram-ray bench train --json`")
    forward, training = training_flops_per_clip(cfg)
    rate = {"forward_flops_per_clip": forward, "training_flops_per_clip": training}
    if train_json is not None:
        return rate | {
            "clips_per_s": result["paths"][path]["samples_per_s"],
            "source": f"bench train path {path} on {result['hardware']} (measured)",
        }
    peak = peak_bf16_tflops(gpu)
    if peak is None:
        raise ValueError(
            f"no known bf16 peak for a GPU named {gpu!r}; name one of the data sheet's (e.g. A10G, L4, A100, H100)"
        )
    return rate | {
        "clips_per_s": mfu * peak * 1e12 / training,
        "source": f"{training / 1e9:,.1f} GFLOPs a clip at {mfu:.0%} MFU of {gpu}'s {peak:.0f} TFLOP/s (estimated)",
        "gpu": gpu,
        "mfu": mfu,
        "peak_bf16_tflops": peak,
    }


def _timed(fn: Callable, items: list, device: torch.device) -> tuple[float, list]:
    """Seconds to map fn over items (the device synchronised at the end), and the results."""
    start = time.perf_counter()
    out = [fn(item) for item in items]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _collate_rest(cfg: GramConfig, vocab) -> Collate:
    """The collate function without the video: what it does besides picking and decoding frames."""
    c = cfg.model_copy(deep=True)
    c.model.modalities = [m for m in c.model.modalities if m != "video"]
    return Collate(c, vocab, train=True)


def _variant(cfg: GramConfig, decode_device: str) -> GramConfig:
    c = cfg.model_copy(deep=True)
    c.data.video.decode_device = decode_device
    return c


def bench_data(
    cfg: GramConfig,
    caches: dict[str, str],
    *,
    vocab,
    device: str = "cpu",
    batches: int = 8,
    reps: int = 3,
    rate: dict,
    progress: Callable[[str], None] = print,
) -> dict:
    """Clips/s per core of each stage and of the whole pipeline, for each cache (name -> shards dir: one per
    codec) and, for a JPEG cache on a CUDA device, each decode device; and the cores one GPU needs."""
    from gram_ray.data.augment import crop_flip

    dev = torch.device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    try:
        variants = _variants(caches, dev)
        rest = _collate_rest(cfg, vocab)
        for rep in range(reps + 1):  # pass 0 warms up decoders, tokenizer, allocator and the page cache
            progress(f"  pass {rep}/{reps}{' (warm-up)' if rep == 0 else ''} ...")
            for v in variants.values():
                frames = _measure(cfg, vocab, v, dev, batches, rest, keep=rep > 0)
        progress("  augment (crop_flip) on the device ...")
        frames = frames.float()
        crop_flip(frames)  # warm-up
        t_augment = statistics.median(_timed(lambda _: crop_flip(frames), [0], dev)[0] for _ in range(reps))
    finally:
        torch.set_num_threads(threads)
    result = {
        "device": device,
        "batch_size": cfg.worker_batch,
        "batches": batches,
        "reps": reps,
        "gpu_rate": rate,
        "augment_clips_per_s": frames.shape[0] / t_augment,
    }
    return result | {"variants": {name: _variant_result(v, rate) for name, v in variants.items()}}


def _variants(caches: dict[str, str], dev: torch.device) -> dict[str, dict]:
    """What is measured: each cache, and a JPEG cache on a CUDA device once per decode device."""
    from gram_ray import storage

    variants: dict[str, dict] = {}
    for codec, shards in caches.items():
        probe = next(cache_batches(shards, 1), None)
        if probe is None:
            raise ValueError(f"the cache at {shards} holds no clips")
        is_jpeg = FRAMES_JPEG in probe
        bytes_per_clip = storage.total_bytes(shards, ".parquet") / _rows(shards)
        for decode_device in ("cpu", "cuda") if is_jpeg and dev.type == "cuda" else ("cpu",):
            variants[f"{codec}, decode on {decode_device}"] = {
                "codec": "jpeg" if is_jpeg else "raw",
                "decode_device": decode_device,
                "shards": shards,
                "stored_bytes_per_clip": bytes_per_clip,
                "times": {s: [] for s in (*CPU_STAGES, "to_device", "pipeline")},
            }
    return variants


def _measure(cfg: GramConfig, vocab, v: dict, dev: torch.device, batches: int, rest, keep: bool):
    """One pass over a variant's first batches: each stage timed alone, then the whole pipeline; the seconds per
    clip of each go into v["times"] when keep (not a warm-up). Returns the last batch's frames on the device."""
    batch_size = cfg.worker_batch
    collate = Collate(_variant(cfg, v["decode_device"]), vocab, train=True)
    t_read, read = _timed(lambda _: list(islice(cache_batches(v["shards"], batch_size), batches)), [0], dev)
    read = read[0]
    t_decode, _ = _timed(lambda b: collate.frames(b, [str(i) for i in b[ID]]), read, dev)
    t_rest, _ = _timed(rest, read, dev)
    model_batches = [collate(b) for b in read]
    t_device, on_device = _timed(lambda b: to_device(b, dev), model_batches, dev)
    t_pipeline, _ = _timed(
        lambda _: [to_device(collate(b), dev) for b in islice(cache_batches(v["shards"], batch_size), batches)],
        [0],
        dev,
    )
    clips = sum(len(b[ID]) for b in read)
    if keep:
        measured = (t_read, t_decode, t_rest, t_device, t_pipeline)
        for stage, seconds in zip((*CPU_STAGES, "to_device", "pipeline"), measured, strict=True):
            v["times"][stage].append(seconds / clips)
    v["clips"] = clips
    return on_device[0]["frames"]


def _variant_result(v: dict, rate: dict) -> dict:
    """A variant's clips/s per stage (medians of the passes), per CPU core, and the cores one GPU needs."""
    per_clip = {stage: statistics.median(t) for stage, t in v["times"].items()}
    cpu = per_clip["read"] + per_clip["collate"] + (per_clip["decode"] if v["decode_device"] == "cpu" else 0.0)
    return {
        "codec": v["codec"],
        "decode_device": v["decode_device"],
        "clips": v["clips"],
        "stored_bytes_per_clip": v["stored_bytes_per_clip"],
        "clips_per_s": {stage: 1.0 / t for stage, t in per_clip.items()},
        "cpu_clips_per_s_per_core": 1.0 / cpu,
        "cores_per_gpu": rate["clips_per_s"] * cpu,
    }


def _rows(shards: str) -> int:
    import pyarrow.parquet as pq

    from gram_ray import storage

    total = 0
    for path in storage.list_files(shards, ".parquet"):
        filesystem, inside = storage.resolve(path)
        with filesystem.open_input_file(inside) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _tokenizer_or_vocabulary(cfg: GramConfig, progress) -> GramConfig:
    """The config's tokenizer where it is at hand; never a download in the middle of a benchmark: without it,
    captions go through a word vocabulary (random_weights' text encoder)."""
    tokenizer = cfg.model.tokenizer or cfg.model.text.pretrained
    if tokenizer:
        from transformers import AutoTokenizer

        from gram_ray.model.architectures import random_weights

        try:
            AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except OSError:
            progress(f"tokenizer {tokenizer} is not available here: captions go through a word vocabulary instead")
            cfg = cfg.model_copy(deep=True)
            cfg.model = random_weights(cfg.model)
    return cfg


def run_bench_data(
    cfg: GramConfig,
    *,
    cache: str | None,
    storage_uri: str | None,
    device: str,
    batches: int,
    reps: int,
    train_json: Path | None,
    gpu_name: str | None,
    mfu: float,
    start_ray: Callable[[], None],
    progress: Callable[[str], None] = print,
) -> dict:
    """`gram-ray bench data` whole: the GPU's rate, the caches (the one given, or a synthetic raw and JPEG cache of
    the config's shapes, in `storage_uri` or a temporary folder, deleted after), and bench_data over them."""
    import tempfile

    from gram_ray import storage
    from gram_ray.bench.common import (
        bench_vocab,
        cache_shards,
        cpu_model,
        hardware_name,
        require_device,
        write_synthetic_cache,
    )

    require_device(device)
    if device.startswith("cuda"):
        gpu_name = gpu_name or torch.cuda.get_device_name(torch.device(device))
    cfg = _tokenizer_or_vocabulary(cfg, progress)
    vocab = bench_vocab(cfg)
    rate = gpu_rate(cfg, train_json=train_json, gpu=gpu_name or DEFAULT_GPU, mfu=mfu)
    with tempfile.TemporaryDirectory(prefix="gram-ray-bench-data-") as tmp:
        if cache:
            caches = {"cache": cache_shards(cache)}
        else:
            start_ray()
            rows = batches * cfg.worker_batch
            v = cfg.data.video
            caches = {}
            # raw frames and filterbanks; JPEG frames; JPEG frames and 8-bit filterbanks (data.audio.cache_codec)
            for name, codec, audio_codec in (("raw", "raw", "float32"), ("jpeg", "jpeg", "float32"),
                                             ("jpeg, uint8 audio", "jpeg", "uint8")):  # fmt: skip
                progress(
                    f"writing a synthetic {name} cache of {rows} clips ({v.train_draws} draws x {v.num_frames} frames "
                    f"of {v.size} px{f', quality {v.jpeg_quality}' if codec == 'jpeg' else ''}) ..."
                )
                c = cfg.model_copy(deep=True)
                c.data.video.cache_codec, c.data.audio.cache_codec = codec, audio_codec
                folder = name.replace(", ", "-").replace(" ", "-")
                base = storage.join(storage_uri, f"bench-data-{folder}") if storage_uri else f"{tmp}/{folder}"
                caches[name] = write_synthetic_cache(base, rows, c.data)
        hardware = hardware_name(device) if device.startswith("cuda") else cpu_model()
        progress(f"bench data on {hardware}")
        result = bench_data(
            cfg, caches, vocab=vocab, device=device, batches=batches, reps=reps, rate=rate, progress=progress
        )
        if storage_uri and not cache:
            for shards in caches.values():
                storage.delete_dir(shards)
    return result | {"hardware": hardware}


def data_table(result: dict) -> str:
    """The bench data result as a text table."""
    rate = result["gpu_rate"]
    width = max(22, *(len(name) for name in result["variants"]))
    lines = [
        f"bench data on {result['hardware']}: batches of {result['batch_size']}, {result['batches']} a pass, "
        f"median of {result['reps']} passes; CPU stages on one thread",
        f"{'variant':<{width}} {'MB/clip':>8} {'read':>8} {'decode':>8} {'collate':>8} {'to dev':>8} "
        f"{'CPU/core':>9} {'measured':>9} {'cores/GPU':>10}",
    ]
    for name, v in result["variants"].items():
        r = v["clips_per_s"]
        lines.append(
            f"{name:<{width}} {v['stored_bytes_per_clip'] / 1e6:>8.3f} {r['read']:>8.0f} "
            f"{r['decode']:>8.0f} {r['collate']:>8.0f} {r['to_device']:>8.0f} "
            f"{v['cpu_clips_per_s_per_core']:>9.0f} {r['pipeline']:>9.0f} {v['cores_per_gpu']:>10.3g}"
        )
    lines += [
        "(clips/s; CPU/core: read + decode + collate on one core, the decode counted only where it runs on the CPU; "
        "measured: read, collate and to device in one loop, as training gets batches; 'decode on cuda' rows decode "
        "in 'to dev', on the GPU)",
        f"augment (crop_flip on {result['device']}): {result['augment_clips_per_s']:.0f} clips/s",
        f"one GPU trains on {rate['clips_per_s']:.1f} clips/s: {rate['source']}",
    ]
    return "\n".join(lines)
