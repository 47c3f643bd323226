"""Ray Data preprocessing: manifest rows -> decoded clips -> Parquet cache (or a lazily decoded dataset).

Decoding runs inside `map_batches` over the manifest rows, one row per video, so Ray Data spreads it over every
CPU of the cluster and streams: only a few batches per worker are in flight whatever the dataset's size.
A clip that cannot be used is left out of the output and recorded, with its reason, in a small side file
(idempotent under task retries); report.json gathers them. Nothing is zero-filled silently: clips without
audible audio are either skipped or kept with an explicit has_audio=false, as the config says.

Cache: `<out>/shards/*.parquet` (tensor columns as fixed-size binary, see parquet_layout; read it back with
`parquet_layout.read_cache`) plus `<out>/report.json`, whose `cache_key` hashes the annotations, the media
files' names, sizes and mtimes, and the data config. The same inputs and config reuse the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from gram_ray import storage
from gram_ray.config import DataConfig
from gram_ray.data.audio import decode_audio
from gram_ray.data.errors import DecodeError
from gram_ray.data.manifest import ManifestRow, read_annotations, resolve_media
from gram_ray.data.parquet_layout import to_parquet_layout
from gram_ray.data.schema import CACHE_COLUMNS, MODALITIES, object_column
from gram_ray.data.video import Mode, decode_video

__all__ = [
    "PreprocessError",
    "decode_batch",
    "decode_concurrency",
    "build_dataset",
    "preprocess",
    "cache_key",
    "SHARDS",
    "REPORT",
]

SHARDS = "shards"
REPORT = "report.json"
_SKIPPED = "_skipped"
_SUBTITLE = MODALITIES["subtitle"].cache_column


class PreprocessError(RuntimeError):
    """Preprocessing stopped; the message says why and where the report is."""


def _text_list(value) -> list[str]:
    return [str(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]


def _draw_shape(data: DataConfig, mode: Mode) -> tuple[int, ...]:
    draws = data.video.train_draws if mode == "train" else 1
    return (draws,) if draws > 1 else ()


def decode_batch(batch: dict, data: DataConfig, mode: Mode, skipped_dir: str | None) -> dict:
    """The map_batches UDF: decode each row, keep those that decode, record the others with their reason."""
    rng = np.random.default_rng() if mode == "train" else None
    keep, failures = {"id": [], "captions": [], "frames": [], "audio_fbank": [], "has_audio": [], "subtitle": []}, []
    for i, media_id in enumerate(batch["id"]):
        video_path, audio_path = str(batch["video_path"][i]) or None, str(batch["audio_path"][i]) or None
        try:
            # Training caches keep train_draws independent draws (a random frame per segment each), so that epochs
            # see different frames without decoding again; Collate picks one per clip per epoch.
            draws = data.video.train_draws if mode == "train" else 1
            frames = [
                decode_video(video_path, data.video.num_frames, data.video.size, mode, rng, decoder=data.video.decoder)
                for _ in range(draws)
            ]
            frames = np.stack(frames) if draws > 1 else frames[0]
        except DecodeError as e:
            failures.append({"id": str(media_id), "reason": str(e)})
            continue
        try:
            fbank, has_audio = decode_audio(audio_path, video_path, data.audio, mode, rng), True
        except DecodeError as e:
            if not data.audio.allow_missing:
                failures.append({"id": str(media_id), "reason": f"{e} (set data.audio.allow_missing=true to keep it)"})
                continue
            shape = (data.audio.windows, data.audio.window_frames, data.audio.mel_bins)
            fbank, has_audio = np.zeros(shape, dtype=np.float32), False  # flagged, never used as real audio
        keep["id"].append(str(media_id))
        keep["captions"].append(_text_list(batch["captions"][i]))
        keep["frames"].append(frames)
        keep["audio_fbank"].append(fbank)
        keep["has_audio"].append(has_audio)
        keep["subtitle"].append(str(batch["subtitle"][i] or ""))
    if failures and skipped_dir:
        # Named by the batch's ids, so a retried task overwrites its own record instead of adding a second one.
        # Through storage: on a cluster this task may run on another node than the driver that reads them.
        name = hashlib.sha1("\n".join(map(str, batch["id"])).encode()).hexdigest()[:16]
        storage.write_text(storage.join(skipped_dir, f"{name}.jsonl"), "".join(json.dumps(f) + "\n" for f in failures))
    video, audio = data.video, data.audio
    return {
        "id": np.array(keep["id"], dtype=object),
        "captions": object_column(keep["captions"]),
        "frames": np.stack(keep["frames"])
        if keep["frames"]
        else np.zeros((0, *_draw_shape(data, mode), video.num_frames, 3, video.size, video.size), np.uint8),
        "audio_fbank": np.stack(keep["audio_fbank"])
        if keep["audio_fbank"]
        else np.zeros((0, audio.windows, audio.window_frames, audio.mel_bins), np.float32),
        "has_audio": np.array(keep["has_audio"], dtype=bool),
        "subtitle": np.array(keep["subtitle"], dtype=object),
    }


def _manifest_items(rows: list[ManifestRow]) -> list[dict]:
    # Empty strings, not None: an all-None column would reach the UDF as float NaN.
    return [
        {
            "id": r.id,
            "captions": r.captions,
            "subtitle": r.subtitle or "",
            "video_path": r.video_path or "",
            "audio_path": r.audio_path or "",
        }
        for r in rows
    ]


def decode_concurrency(data: DataConfig) -> int | None:
    """data.decode_concurrency, else None (one task per CPU Ray offers) on a cluster. On one machine whose Ray
    offers more logical CPUs than it has cores (gram-ray's local Ray does, so that Train workers and Data tasks
    never wait on each other), one per core: decoding is CPU-bound, and every extra decode process costs ~0.5 GB
    (measured: 8 processes on 2 cores peaked at 5.8 GB for no more throughput)."""
    import ray

    if data.decode_concurrency:
        return data.decode_concurrency
    cores = os.cpu_count() or 1
    if len([n for n in ray.nodes() if n["Alive"]]) == 1 and ray.cluster_resources().get("CPU", 0) > cores:
        return cores
    return None


def build_dataset(rows: list[ManifestRow], data: DataConfig, mode: Mode = "eval", skipped_dir: str | None = None):
    """A lazy Ray Dataset of decoded clips: the cache writer's input, or (decode_on_the_fly) training's input,
    re-decoded with fresh random frames every time it is iterated in train mode."""
    import ray.data

    ds = ray.data.from_items(_manifest_items(rows), override_num_blocks=max(1, len(rows) // data.decode_batch_size))
    ds = ds.map_batches(
        decode_batch,
        batch_size=data.decode_batch_size,
        batch_format="numpy",
        fn_kwargs={"data": data, "mode": mode, "skipped_dir": skipped_dir},
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=decode_concurrency(data)),
    )
    return ds if any(r.subtitle for r in rows) else ds.drop_columns(["subtitle"])


def rows_per_shard(data: DataConfig) -> int:
    """Clips per Parquet file for data.shard_mb of decoded tensors."""
    v, a = data.video, data.audio
    clip_bytes = v.num_frames * 3 * v.size * v.size + 4 * a.windows * a.window_frames * a.mel_bins
    return max(1, int(data.shard_mb * 2**20 // clip_bytes))


def _file_signature(path: str | None) -> list:
    if path is None:
        return [None]
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, int(st.st_mtime)]


def cache_key(annotations: str | Path, rows: list[ManifestRow], data: DataConfig, mode: Mode) -> str:
    h = hashlib.sha256()
    h.update(Path(annotations).read_bytes())
    for r in rows:
        h.update(json.dumps([r.id, _file_signature(r.video_path), _file_signature(r.audio_path)]).encode())
    # Only what changes the decoded content: inputs are covered above by their bytes and file signatures, so
    # paths may be spelled differently and scheduling knobs may change without invalidating the cache.
    content = {"video": data.video.model_dump(), "audio": data.audio.model_dump()}
    h.update(json.dumps([content, mode], sort_keys=True).encode())
    return h.hexdigest()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError (disk full, permission denied, not a directory) behind an error, also when a Ray task raised
    it, or None."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def _load_report(out: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(out, REPORT)))
    except (OSError, json.JSONDecodeError):
        return None


def preprocess(
    annotations: str | Path,
    video_dir: str | Path,
    out: str | Path,
    data: DataConfig | None = None,
    audio_dir: str | Path | None = None,
    mode: Mode = "eval",
    force: bool = False,
    log=print,
) -> dict:
    """Decode every clip of an annotation file into a Parquet cache under `out`; returns the report.

    Reuses an existing cache of the same inputs and config unless force. Raises PreprocessError (after writing
    the report and keeping every shard written) when more than data.max_failure_share of the clips failed."""
    data = data or DataConfig()
    out = storage.absolute(out)
    shards, skipped_dir, report_path = (storage.join(out, name) for name in (SHARDS, _SKIPPED, REPORT))
    rows = read_annotations(annotations)
    resolve_media(rows, video_dir, audio_dir)
    key = cache_key(annotations, rows, data, mode)
    previous = _load_report(out)
    if previous and previous.get("cache_key") == key and previous.get("status") == "complete" and not force:
        log(f"cache hit: {out} already holds these {previous['rows_written']} clips (use --force to decode again)")
        return previous | {"reused": True}

    log(f"decoding {len(rows)} clips from {annotations} into {shards} with Ray Data ...")
    start = time.perf_counter()
    try:
        for stale in (shards, skipped_dir):
            storage.delete_dir(stale)
        ds = build_dataset(rows, data, mode, skipped_dir=skipped_dir)
        ds = ds.map_batches(to_parquet_layout, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        # No dictionary pages: the values are megabyte-sized blobs that never repeat.
        ds.write_parquet(shards, min_rows_per_file=rows_per_shard(data), use_dictionary=False)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise PreprocessError(
            f"writing the cache under {out} failed ({cause}). The inputs are untouched and no report marks this "
            "cache complete, so the next run decodes again; free space or fix the folder's permissions (or set "
            "data.cache_dir elsewhere), then rerun."
        ) from e
    wall = time.perf_counter() - start

    skipped = []
    for f in storage.list_files(skipped_dir, ".jsonl"):
        skipped.extend(json.loads(line) for line in storage.read_text(f).splitlines() if line)
    storage.delete_dir(skipped_dir)
    written = len(rows) - len(skipped)
    share = len(skipped) / len(rows)
    report = {
        "status": "complete" if share <= data.max_failure_share else "failed",
        "cache_key": key,
        "annotations": str(annotations),
        "video_dir": str(video_dir),
        "audio_dir": str(audio_dir) if audio_dir else None,
        "mode": mode,
        "rows_total": len(rows),
        "rows_written": written,
        "rows_skipped": sorted(skipped, key=lambda s: s["id"]),
        "config": data.model_dump(),
        "wall_seconds": round(wall, 3),
        "clips_per_second": round(len(rows) / wall, 3) if wall > 0 else None,
        "columns": [c for c in CACHE_COLUMNS if c != _SUBTITLE or any(r.subtitle for r in rows)],
    }
    storage.write_text(report_path, json.dumps(report, indent=2))
    log(
        f"wrote {written} clips, skipped {len(skipped)}, in {wall:.1f} s ({report['clips_per_second']} clips/s); "
        f"report: {report_path}"
    )
    for s in skipped[:10]:
        log(f"  skipped {s['id']}: {s['reason']}")
    if report["status"] == "failed":
        raise PreprocessError(
            f"{len(skipped)} of {len(rows)} clips ({share:.0%}) could not be decoded, more than "
            f"data.max_failure_share={data.max_failure_share:.0%}. "
            f"The {written} good clips are kept in {shards}; "
            f"the reasons are in {report_path}. Fix the inputs, or raise data.max_failure_share to accept them."
        )
    return report
