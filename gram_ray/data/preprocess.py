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
import math
import os
import posixpath
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gram_ray import storage
from gram_ray.config import DataConfig
from gram_ray.data.audio import decode_audio
from gram_ray.data.errors import DecodeError, load_media
from gram_ray.data.frame_codec import encode_frames
from gram_ray.data.image import decode_image
from gram_ray.data.manifest import ManifestRow, read_annotations, resolve_media
from gram_ray.data.parquet_layout import to_parquet_layout
from gram_ray.data.schema import CACHE_COLUMNS, FRAMES_JPEG, HAS_AUDIO, MODALITIES, object_column
from gram_ray.data.video import Mode, decode_video

__all__ = [
    "PreprocessError",
    "decode_batch",
    "decode_rows",
    "decode_concurrency",
    "build_dataset",
    "preprocess",
    "cache_key",
    "SHARDS",
    "REPORT",
]

SHARDS = "shards"
REPORT = "report.json"
_SKIPPED = "_skipped"  # side files of the lazily decoded dataset's skipped clips
_DONE = "_done"  # the cache writer's progress: plan.json and one record per shard written
_SUBTITLE = MODALITIES["subtitle"].cache_column
_FRAMES = MODALITIES["video"].cache_column


class PreprocessError(RuntimeError):
    """Preprocessing stopped; the message says why and where the report is."""


def _text_list(value) -> list[str]:
    return [str(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]


def _draw_shape(data: DataConfig, mode: Mode) -> tuple[int, ...]:
    draws = data.video.train_draws if mode == "train" else 1
    return (draws,) if draws > 1 else ()


def _clip_rng(media_id: str) -> np.random.Generator:
    """The random frame draws of a clip in a cache: seeded by its id, so that a cache decoded in pieces (a resumed
    run) holds the same bytes as one decoded in one go."""
    return np.random.default_rng(zlib.crc32(str(media_id).encode()))


def _decode_frames(path: str | None, data: DataConfig, mode: Mode, rng) -> tuple[np.ndarray, object]:
    """(frames, the media as read: a path or a storage object's bytes, so its audio track is not read twice) of a
    video or an image (data.video.format). Training caches keep train_draws independent draws (a random frame
    per segment each), so that epochs see different frames without decoding again; Collate picks one per clip
    per epoch. An image's draws are all the same still."""
    video = data.video
    media = load_media(path, video.format)
    draws = video.train_draws if mode == "train" else 1
    if video.format == "image":
        still = decode_image(media, video.num_frames, video.size)
        return (np.stack([still] * draws) if draws > 1 else still), None  # an image has no audio track
    frames = [decode_video(media, video.num_frames, video.size, mode, rng, decoder=video.decoder) for _ in range(draws)]
    return (np.stack(frames) if draws > 1 else frames[0]), media


def decode_rows(batch: dict, data: DataConfig, mode: Mode, seeded: bool = False) -> tuple[dict, list[dict]]:
    """Decode each row of a manifest batch: (the decoded columns of those that decode, [{"id", "reason"}] of the
    others). seeded: train-mode draws seeded by clip id (caches); otherwise fresh draws every call. Frames are
    left out with data.video.format none, the audio columns with data.audio.format none."""
    fresh = np.random.default_rng() if mode == "train" else None
    with_frames, with_audio = data.video.format != "none", data.audio.format != "none"
    keep, failures = {"id": [], "captions": [], "frames": [], "audio_fbank": [], "has_audio": [], "subtitle": []}, []
    for i, media_id in enumerate(batch["id"]):
        video_path, audio_path = str(batch["video_path"][i]) or None, str(batch["audio_path"][i]) or None
        rng = _clip_rng(media_id) if seeded and mode == "train" else fresh
        track = None
        if with_frames:
            try:
                frames, track = _decode_frames(video_path, data, mode, rng)
            except DecodeError as e:
                failures.append({"id": str(media_id), "reason": str(e)})
                continue
            keep["frames"].append(frames)
        if with_audio:
            try:
                fbank, has_audio = decode_audio(audio_path, track, data.audio, mode, rng), True
            except DecodeError as e:
                if not data.audio.allow_missing or not with_frames:  # an audio-only clip without audio is nothing
                    hint = " (set data.audio.allow_missing=true to keep it)" if with_frames else ""
                    failures.append({"id": str(media_id), "reason": f"{e}{hint}"})
                    if with_frames:
                        keep["frames"].pop()
                    continue
                shape = (data.audio.windows, data.audio.window_frames, data.audio.mel_bins)
                fbank, has_audio = np.zeros(shape, dtype=np.float32), False  # flagged, never used as real audio
            keep["audio_fbank"].append(fbank)
            keep["has_audio"].append(has_audio)
        keep["id"].append(str(media_id))
        keep["captions"].append(_text_list(batch["captions"][i]))
        keep["subtitle"].append(str(batch["subtitle"][i] or ""))
    video, audio = data.video, data.audio
    columns = {"id": np.array(keep["id"], dtype=object), "captions": object_column(keep["captions"])}
    if with_frames:
        columns["frames"] = (
            np.stack(keep["frames"])
            if keep["frames"]
            else np.zeros((0, *_draw_shape(data, mode), video.num_frames, 3, video.size, video.size), np.uint8)
        )
    if with_audio:
        columns["audio_fbank"] = (
            np.stack(keep["audio_fbank"])
            if keep["audio_fbank"]
            else np.zeros((0, audio.windows, audio.window_frames, audio.mel_bins), np.float32)
        )
        columns["has_audio"] = np.array(keep["has_audio"], dtype=bool)
    columns["subtitle"] = np.array(keep["subtitle"], dtype=object)
    return columns, failures


def decode_batch(batch: dict, data: DataConfig, mode: Mode, skipped_dir: str | None) -> pa.Table:
    """The map_batches UDF of the lazily decoded dataset (decode_on_the_fly): decode each row, keep those that
    decode, record the others with their reason in a side file. Returns an Arrow table (see _columns_to_arrow)."""
    columns, failures = decode_rows(batch, data, mode)
    if failures and skipped_dir:
        # Named by the batch's ids, so a retried task overwrites its own record instead of adding a second one.
        # Through storage: on a cluster this task may run on another node than the driver that reads them.
        name = hashlib.sha1("\n".join(map(str, batch["id"])).encode()).hexdigest()[:16]
        storage.write_text(storage.join(skipped_dir, f"{name}.jsonl"), "".join(json.dumps(f) + "\n" for f in failures))
    return _columns_to_arrow(columns)


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


# A JPEG frame at quality ~90 is about 1/13 of the raw frame (real clips at 224 px: README, Performance).
_JPEG_SHARE = 0.08


def rows_per_shard(data: DataConfig) -> int:
    """Clips per Parquet file for about data.shard_mb of stored tensors."""
    v, a = data.video, data.audio
    frame_bytes = v.num_frames * 3 * v.size * v.size * (_JPEG_SHARE if v.cache_codec == "jpeg" else 1)
    clip_bytes = (frame_bytes if v.format != "none" else 0) + (
        4 * a.windows * a.window_frames * a.mel_bins if a.format != "none" else 0
    )
    return max(1, int(data.shard_mb * 2**20 // max(clip_bytes, 1024)))


def _file_signatures(paths: list[str | None]) -> dict[str, list]:
    """{path: [name, size, mtime]} of the media files (None where they cannot be stat'ed: skipped at decode time
    with the reason). A storage folder is listed once for all its files, not asked about each."""
    out: dict[str, list] = {}
    folders: dict[str, list[str]] = {}
    for path in filter(None, paths):
        if storage.is_uri(path):
            folders.setdefault(posixpath.dirname(path), []).append(path)
            continue
        try:
            st = os.stat(path)
        except OSError:  # a dangling symlink: skipped at decode time with that reason
            out[path] = [os.path.basename(path), None, None]
            continue
        out[path] = [os.path.basename(path), st.st_size, int(st.st_mtime)]
    for folder, members in folders.items():
        infos = storage.file_infos(folder)
        for path in members:
            info = infos.get(posixpath.basename(path))
            mtime = int(info.mtime.timestamp()) if info is not None and info.mtime is not None else None
            out[path] = [posixpath.basename(path), info.size if info else None, mtime]
    return out


def cache_key(annotations: str | Path, rows: list[ManifestRow], data: DataConfig, mode: Mode) -> str:
    h = hashlib.sha256()
    h.update(storage.read_bytes(str(annotations)))
    signatures = _file_signatures([p for r in rows for p in (r.video_path, r.audio_path)])
    for r in rows:
        h.update(json.dumps([r.id, *(signatures.get(p, [None]) for p in (r.video_path, r.audio_path))]).encode())
    # Only what changes the decoded content: inputs are covered above by their bytes and file signatures, so
    # paths may be spelled differently and scheduling knobs may change without invalidating the cache.
    # decode_device is where a cached JPEG is decoded, not what is stored; a raw cache stays valid across the
    # JPEG settings (and across the versions before they existed).
    video = data.video.model_dump(exclude={"decode_device"})
    if data.video.cache_codec == "raw":
        video = {k: v for k, v in video.items() if k not in ("cache_codec", "jpeg_quality")}
    content = {"video": video, "audio": data.audio.model_dump()}
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


def _shard_rows(n: int, data: DataConfig) -> int:
    """Clips per shard: data.shard_mb of decoded tensors, but small enough that the clips spread over at least
    four shards per decode task at once (a small split would otherwise decode in one task)."""
    import ray

    tasks = decode_concurrency(data) or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(rows_per_shard(data), math.ceil(n / (4 * tasks))))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _columns_to_arrow(columns: dict) -> pa.Table:
    """Decoded columns -> an Arrow table with tensor columns (Ray's tensor type), built here rather than by Ray
    Data: Ray converts a numpy batch of zero rows (every clip of a decode batch failed) through pyarrow's native
    path, which cannot hold an n-d array, and falls back to pickling the column ("Failed to convert column
    'frames' into pyarrow array ... falling back to pickled python objects"): slow and large in the object store,
    and a column type that differs from the other blocks'."""
    from ray.data.extensions import ArrowTensorArray

    table = {
        "id": pa.array(list(columns["id"]), pa.string()),
        "captions": pa.array([list(c) for c in columns["captions"]], pa.list_(pa.string())),
    }
    if FRAMES_JPEG in columns:
        table[FRAMES_JPEG] = pa.array(list(columns[FRAMES_JPEG]), pa.list_(pa.binary()))
    elif "frames" in columns:
        table["frames"] = ArrowTensorArray.from_numpy(columns["frames"])
    if "audio_fbank" in columns:
        table["audio_fbank"] = ArrowTensorArray.from_numpy(columns["audio_fbank"])
        table["has_audio"] = pa.array(columns["has_audio"], pa.bool_())
    if "subtitle" in columns:
        table["subtitle"] = pa.array(list(columns["subtitle"]), pa.string())
    return pa.table(table)


def _columns_to_table(columns: dict) -> pa.Table:
    """Decoded columns -> an Arrow table in the cache's Parquet layout."""
    return to_parquet_layout(_columns_to_arrow(columns))


def _cache_columns(data: DataConfig, subtitles: bool) -> list[str]:
    """The columns a cache of these settings holds (schema.CACHE_COLUMNS, less what is not decoded)."""
    absent = {FRAMES_JPEG if data.video.cache_codec == "raw" else _FRAMES}
    if data.video.format == "none":
        absent |= {_FRAMES, FRAMES_JPEG}
    if data.audio.format == "none":
        absent |= {MODALITIES["audio"].cache_column, HAS_AUDIO}
    if not subtitles:
        absent.add(_SUBTITLE)
    return [c for c in CACHE_COLUMNS if c not in absent]


def write_shards(batch: dict, data: DataConfig, mode: Mode, out: str, key: str, subtitles: bool) -> dict:
    """The map_batches UDF of the cache writer: each input row is one shard (its manifest rows as JSON), decoded
    and written as <out>/shards/shard-NNNNN.parquet, then recorded as done in <out>/_done/shard-NNNNN.json with
    its skipped clips. The record is written after the file is whole, so a shard without one is redone; a retried
    task rewrites the same two files. Returns one small row per shard (the decoded clips never pass through Ray's
    object store)."""
    written = []
    for index, rows_json in zip(batch["shard"], batch["rows"], strict=True):
        items = json.loads(rows_json)
        manifest = {
            k: np.array([it[k] for it in items], dtype=object) for k in ("id", "subtitle", "video_path", "audio_path")
        }
        manifest["captions"] = object_column([it["captions"] for it in items])
        columns, failures = decode_rows(manifest, data, mode, seeded=True)
        if not subtitles:
            columns.pop("subtitle")
        if data.video.cache_codec == "jpeg" and "frames" in columns:  # each frame of each draw, one JPEG
            frames = columns.pop("frames")
            columns[FRAMES_JPEG] = [encode_frames(clip, data.video.jpeg_quality) for clip in frames]
        table = _columns_to_table(columns)
        name = _shard_name(int(index))
        storage.write_bytes_with(
            storage.join(out, SHARDS, name + ".parquet"),
            lambda f, table=table: pq.write_table(table, f, use_dictionary=False),  # blobs that never repeat
        )
        record = {"cache_key": key, "clips": len(items), "written": table.num_rows, "skipped": failures}
        storage.write_text(storage.join(out, _DONE, name + ".json"), json.dumps(record))
        written.append(table.num_rows)
    return {"shard": np.asarray(batch["shard"]), "written": np.asarray(written)}


def _drive(ds, shards: int, clips: int, log, every_s: float = 30.0) -> None:
    """Run the writer, saying how far it is every every_s seconds (and at the end) on long decodes."""
    start = last = time.perf_counter()
    finished = decoded = 0
    for row in ds.iter_rows():
        finished += 1
        decoded += int(row["written"])
        now = time.perf_counter()
        if now - last >= every_s and finished < shards:
            rate = decoded / (now - start)
            eta = (clips - decoded) / rate if rate > 0 else float("nan")
            log(f"  {finished}/{shards} shards, {decoded} clips, {rate:.1f} clips/s, about {eta:.0f} s left")
            last = now


def _done_shards(out: str, key: str) -> dict[int, dict]:
    """The shards an earlier run of the same inputs and config finished: {index: its record}."""
    done = {}
    for path in storage.list_files(storage.join(out, _DONE), ".json"):
        name = posixpath.basename(path)
        if not name.startswith("shard-"):
            continue
        try:
            record = json.loads(storage.read_text(path))
        except (OSError, json.JSONDecodeError):
            continue  # cut off while being written: the shard is redone
        if record.get("cache_key") == key:
            done[int(name.removeprefix("shard-").removesuffix(".json"))] = record
    return done


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

    Reuses an existing cache of the same inputs and config unless force. Resumable: the clips are decoded in
    shards, each recorded when written, so a run killed mid-way is continued by the next run of the same inputs
    and config, which decodes only the shards not yet recorded (the report counts both). Raises PreprocessError
    (after writing the report and keeping every shard written) when more than data.max_failure_share of the clips
    failed."""
    import ray.data

    data = data or DataConfig()
    out = storage.absolute(out)
    shards, report_path, plan_path = (
        storage.join(out, SHARDS),
        storage.join(out, REPORT),
        storage.join(out, _DONE, "plan.json"),
    )
    rows = read_annotations(annotations)
    resolve_media(rows, video_dir, audio_dir, data.video.format)
    key = cache_key(annotations, rows, data, mode)
    previous = _load_report(out)
    if previous and previous.get("cache_key") == key and previous.get("status") == "complete" and not force:
        log(f"cache hit: {out} already holds these {previous['rows_written']} clips (use --force to decode again)")
        return previous | {"reused": True}

    start = time.perf_counter()
    try:
        plan = None if force or not storage.exists(plan_path) else json.loads(storage.read_text(plan_path))
        if plan is None or plan.get("cache_key") != key:  # nothing of these inputs yet: start clean
            for stale in (shards, storage.join(out, _DONE), storage.join(out, _SKIPPED)):
                storage.delete_dir(stale)
            storage.delete_file(report_path)
            plan = {"cache_key": key, "rows_per_shard": _shard_rows(len(rows), data)}
            storage.write_text(plan_path, json.dumps(plan))
        size = plan["rows_per_shard"]
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        done = _done_shards(out, key)
        for path in storage.list_files(shards, ".parquet"):  # files of shards a kill cut off: redone
            if int(posixpath.basename(path).removeprefix("shard-").removesuffix(".parquet")) not in done:
                storage.delete_file(path)
        todo = [i for i in range(len(chunks)) if i not in done]
        reused = sum(done[i]["clips"] for i in done)
        if done:
            log(f"resuming: {len(done)} of {len(chunks)} shards ({reused} clips) were written by an earlier run")
        log(f"decoding {len(rows) - reused} clips from {annotations} into {shards} with Ray Data ...")
        if todo:
            items = [{"shard": i, "rows": json.dumps(_manifest_items(chunks[i]))} for i in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                write_shards,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={
                    "data": data,
                    "mode": mode,
                    "out": out,
                    "key": key,
                    "subtitles": any(r.subtitle for r in rows),
                },
                num_cpus=1,
                compute=ray.data.TaskPoolStrategy(size=decode_concurrency(data)),
            )
            _drive(ds, len(todo), sum(len(chunks[i]) for i in todo), log)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise PreprocessError(
            f"writing the cache under {out} failed ({cause}). The inputs are untouched; the shards written so far "
            "are kept and a rerun continues from them. Free space or fix the folder's permissions (or set "
            "data.cache_dir elsewhere), then rerun."
        ) from e
    wall = time.perf_counter() - start

    records = _done_shards(out, key)
    skipped = [s for record in records.values() for s in record["skipped"]]
    written = sum(record["written"] for record in records.values())
    share = len(skipped) / len(rows)
    report = {
        "status": "complete" if share <= data.max_failure_share else "failed",
        "cache_key": key,
        "annotations": str(annotations),
        "video_dir": str(video_dir) if video_dir else None,
        "audio_dir": str(audio_dir) if audio_dir else None,
        "mode": mode,
        "rows_total": len(rows),
        "rows_written": written,
        "rows_decoded_now": len(rows) - reused,
        "rows_reused": reused,
        "shards": len(chunks),
        "shards_reused": len(done),
        "rows_skipped": sorted(skipped, key=lambda s: s["id"]),
        "config": data.model_dump(),
        "wall_seconds": round(wall, 3),
        "clips_per_second": round((len(rows) - reused) / wall, 3) if wall > 0 else None,
        "columns": _cache_columns(data, subtitles=any(r.subtitle for r in rows)),
    }
    storage.write_text(report_path, json.dumps(report, indent=2))
    log(
        f"wrote {written} clips, skipped {len(skipped)}, in {wall:.1f} s ({report['clips_per_second']} clips/s"
        + (f"; {reused} clips kept from an earlier run" if reused else "")
        + "); "
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
