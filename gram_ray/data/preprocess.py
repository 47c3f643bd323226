"""Ray Data preprocessing: a data source -> decoded clips -> Parquet cache (or a lazily decoded dataset).

Sources (data.source.kind): a manifest (GRAM's annotation files are manifests) next to media files or objects, read
on the driver into one row per clip; WebDataset tar shards or video2dataset Parquet files, whose media are inside
them and which only the decode tasks read (data/packed.py). Either way the clips are decoded by data/decode.py
into the same cache rows. Decoding runs inside `map_batches`, so Ray Data spreads it over every CPU of the cluster
and streams: only a few pieces per worker are in flight whatever the dataset's size. A clip that cannot be used is
left out of the output and recorded with its reason; report.json gathers them and counts them by reason. Nothing
is zero-filled silently: clips without audible audio are either skipped or kept with an explicit
has_audio=false, as data.audio.missing says.

Cache: `<out>/shards/*.parquet` (tensor columns as fixed-size binary, see parquet_layout; read it back with
`parquet_layout.read_cache`) plus `<out>/report.json`, whose `cache_key` hashes the inputs (annotations, the media
files' or shards' names, sizes and mtimes) and the data config. The same inputs and config reuse the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import posixpath
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gram_ray import storage
from gram_ray.config import DataConfig, SourceConfig
from gram_ray.data.decode import ClipColumns, ClipInput, clip_rng, columns_to_arrow, frame_draws
from gram_ray.data.manifest import (
    ManifestRow,
    caption_split,
    check_invalid_share,
    check_sources,
    read_annotations,
    resolve_media,
    rows_of_entries,
)
from gram_ray.data.manifest_stream import (
    ManifestScan,
    cut_pieces,
    read_in_pieces,
    read_piece,
    scan_manifest,
)
from gram_ray.data.packed import PACKED, ShardError, parquet_clips, shard_uris, tar_clips
from gram_ray.data.parquet_layout import to_parquet_layout
from gram_ray.data.pieces import DONE, drive, read_records, record_done
from gram_ray.data.schema import (
    AUDIO_FBANK_RANGE,
    AUDIO_FBANK_U8,
    CACHE_COLUMNS,
    FRAMES_JPEG,
    HAS_AUDIO,
    MODALITIES,
)
from gram_ray.data.video import Mode
from gram_ray.storage.uploads import abort_orphans_of_a_dead_run, now

__all__ = [
    "PreprocessError",
    "decode_batch",
    "decode_rows",
    "decode_concurrency",
    "check_inputs",
    "build_dataset",
    "preprocess",
    "cache_key",
    "SHARDS",
    "REPORT",
]

SHARDS = "shards"
REPORT = "report.json"
_SKIPPED = "_skipped"  # side files of the lazily decoded dataset's skipped clips
_SUBTITLE = MODALITIES["subtitle"].cache_column
_FRAMES = MODALITIES["video"].cache_column
AUDIO_U8 = {AUDIO_FBANK_U8, AUDIO_FBANK_RANGE}


class PreprocessError(RuntimeError):
    """Preprocessing stopped; the message says why and where the report is."""


def _text_list(value) -> list[str]:
    return [str(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]


def _manifest_clip(item: dict) -> ClipInput:
    """A manifest item (_manifest_items' shape: a dict, or one row of a numpy batch of them) as a ClipInput. A batch
    written before spans and errors existed has neither key."""
    end = item.get("end")
    return ClipInput(
        str(item["id"]),
        _text_list(item["captions"]),
        subtitle=str(item["subtitle"] or ""),
        video=str(item["video_path"]) or None,
        audio=str(item["audio_path"]) or None,
        span=(float(item["start"]), float(end)) if end is not None and float(end) >= 0 else None,
        error=str(item.get("error") or "") or None,
    )


def decode_rows(batch: dict, data: DataConfig, mode: Mode, seeded: bool = False) -> tuple[dict, list[dict]]:
    """Decode each row of a manifest batch: (the decoded columns of those that decode, [{"id", "reason"}] of the
    others). seeded: train-mode draws seeded by clip id (caches); otherwise fresh draws every call. Frames are
    left out with data.video.format none, the audio columns with data.audio.format none."""
    fresh = np.random.default_rng() if mode == "train" else None
    out = ClipColumns(data, mode)
    for i in range(len(batch["id"])):
        clip = _manifest_clip({k: v[i] for k, v in batch.items()})
        out.decode(clip, clip_rng(clip.id) if seeded and mode == "train" else fresh)
    return out.columns(), out.failures


def decode_batch(batch: dict, data: DataConfig, mode: Mode, skipped_dir: str | None) -> pa.Table:
    """The map_batches UDF of the lazily decoded dataset (decode_on_the_fly): decode each row, keep those that
    decode, record the others with their reason in a side file. Returns an Arrow table (see columns_to_arrow)."""
    columns, failures = decode_rows(batch, data, mode)
    if failures and skipped_dir:
        # Named by the batch's ids, so a retried task overwrites its own record instead of adding a second one.
        # Through storage: on a cluster this task may run on another node than the driver that reads them.
        name = hashlib.sha1("\n".join(map(str, batch["id"])).encode()).hexdigest()[:16]
        storage.write_text(storage.join(skipped_dir, f"{name}.jsonl"), "".join(json.dumps(f) + "\n" for f in failures))
    return columns_to_arrow(columns)


def _manifest_items(rows: list[ManifestRow]) -> list[dict]:
    # Empty strings, not None: an all-None column would reach the UDF as float NaN.
    return [
        {
            "id": r.id,
            "captions": r.captions,
            "subtitle": r.subtitle or "",
            "video_path": r.video_path or "",
            "audio_path": r.audio_path or "",
            "start": -1.0 if r.start is None else r.start,
            "end": -1.0 if r.end is None else r.end,
            "error": r.error or "",
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


def rows_per_shard(data: DataConfig, mode: Mode) -> int:
    """Clips per Parquet file for about data.shard_mb of stored tensors: a training cache's clip holds
    data.video.train_draws draws of its frames."""
    v, a = data.video, data.audio
    codec_share = _JPEG_SHARE if v.cache_codec == "jpeg" else 1
    frame_bytes = frame_draws(v, mode) * v.num_frames * 3 * v.size * v.size * codec_share
    value_bytes = 1 if a.cache_codec == "uint8" else 4
    clip_bytes = (frame_bytes if v.format != "none" else 0) + (
        value_bytes * a.windows * a.window_frames * a.mel_bins if a.format != "none" else 0
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


def _config_content(data: DataConfig, mode: Mode) -> bytes:
    """Only what changes the decoded content: inputs are hashed by their bytes and file signatures, so paths may be
    spelled differently and scheduling knobs may change without invalidating the cache. decode_device is where a
    cached JPEG is decoded, not what is stored; a raw cache stays valid across the JPEG settings (and across the
    versions before they existed), a cache of GRAM's annotation files across the versions before data.source and
    data.audio.missing (which was allow_missing)."""
    video = data.video.model_dump(exclude={"decode_device"})
    if data.video.cache_codec == "raw":
        video = {k: v for k, v in video.items() if k not in ("cache_codec", "jpeg_quality")}
    audio = data.audio.model_dump(exclude={"missing", "cache_codec"}) | {
        "allow_missing": data.audio.missing == "silence"
    }
    if data.audio.cache_codec != "float32":  # a float32 cache stays valid across the versions before the codec
        audio["cache_codec"] = data.audio.cache_codec
    content = {"video": video, "audio": audio}
    if data.source != SourceConfig():
        content["source"] = data.source.model_dump()
    return json.dumps([content, mode], sort_keys=True).encode()


def cache_key(annotations: str | Path, rows: list[ManifestRow], data: DataConfig, mode: Mode) -> str:
    """The cache key of a manifest's clips: the manifest's bytes, each clip's media files' signatures, the config."""
    h = hashlib.sha256()
    h.update(storage.read_bytes(str(annotations)))
    signatures = _file_signatures([p for r in rows for p in (r.video_path, r.audio_path)])
    for r in rows:
        h.update(json.dumps([r.id, *(signatures.get(p, [None]) for p in (r.video_path, r.audio_path))]).encode())
    h.update(_config_content(data, mode))
    return h.hexdigest()


def packed_cache_key(uris: list[str], data: DataConfig, mode: Mode) -> str:
    """The cache key of a packed source: its shard files' names, sizes and mtimes, and the config."""
    h = hashlib.sha256()
    signatures = _file_signatures(uris)
    h.update(json.dumps([signatures.get(u) for u in uris]).encode())
    h.update(_config_content(data, mode))
    return h.hexdigest()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError (disk full, permission denied, not a directory) behind an error, also when a Ray task raised
    it, or None."""
    seen = error
    while seen is not None:
        inner = getattr(seen, "cause", None)
        if isinstance(seen, OSError) and not isinstance(inner, BaseException):  # not Ray's wrapper of a task's
            return seen
        seen = inner if isinstance(inner, BaseException) else seen.__cause__
    return None


def _load_report(out: str) -> dict | None:
    """The cache's report, or None when it has none (or one cut off: the cache is then not complete). Storage
    that fails past its settings is an error, not a missing report (that would decode the whole cache again)."""
    try:
        return json.loads(storage.read_text(storage.join(out, REPORT)))
    except storage.StorageError:
        raise
    except (OSError, json.JSONDecodeError):
        return None


def _shard_rows(n: int, data: DataConfig, mode: Mode) -> int:
    """Clips per shard: data.shard_mb of decoded tensors, but small enough that the clips spread over at least
    four shards per decode task at once (a small split would otherwise decode in one task)."""
    import ray

    tasks = decode_concurrency(data) or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(rows_per_shard(data, mode), math.ceil(n / (4 * tasks))))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _cache_columns(data: DataConfig, subtitles: bool) -> list[str]:
    """The columns a cache of these settings holds (schema.CACHE_COLUMNS, less what is not decoded)."""
    absent = {FRAMES_JPEG if data.video.cache_codec == "raw" else _FRAMES}
    absent |= {MODALITIES["audio"].cache_column} if data.audio.cache_codec == "uint8" else AUDIO_U8
    if data.video.format == "none":
        absent |= {_FRAMES, FRAMES_JPEG}
    if data.audio.format == "none":
        absent |= {MODALITIES["audio"].cache_column, HAS_AUDIO, *AUDIO_U8}
    if not subtitles:
        absent.add(_SUBTITLE)
    return [c for c in CACHE_COLUMNS if c not in absent]


def _write_part(columns: ClipColumns, out: str, name: str, subtitles: bool) -> int:
    """Write the decoded clips as <out>/shards/<name>.parquet; returns the rows written."""
    table = to_parquet_layout(columns_to_arrow(columns.cache_columns(subtitles)))
    storage.write_bytes_with(
        storage.join(out, SHARDS, name + ".parquet"),
        lambda f: pq.write_table(table, f, use_dictionary=False),  # blobs that never repeat
    )
    return table.num_rows


@dataclass
class PiecedManifest:
    """A large manifest planned in pieces (data/manifest_stream.py): what a decode task needs to read its piece and
    make its clips. Pickled to every task: its pieces are 24 bytes each."""

    scan: ManifestScan
    pieces: np.ndarray  # [N, 3] (start, end, first line) per piece
    video_dir: str | None
    audio_dir: str | None

    def __getstate__(self) -> dict:  # the scan's digest (a hash object) stays with the driver
        return self.__dict__ | {"scan": dataclasses.replace(self.scan, digest=None)}

    def clips(self, index: int, data: DataConfig):
        start, end, line = (int(v) for v in self.pieces[index])
        scan = self.scan
        entries = read_piece(scan.path, scan.kind, start, end, line, scan.header)
        rows, invalid = rows_of_entries(entries, data.source.fields, caption_split(scan.path))
        # Found here, by the piece's own task: a bucket folder of millions of media is not listed by every piece.
        resolve_media(rows, self.video_dir, self.audio_dir, data.video.format, list_folders=False)
        yield from map(_manifest_clip, _manifest_items([*rows, *invalid]))


def _piece_clips(item: dict, data: DataConfig, manifest: PiecedManifest | None = None):
    """The clips of one piece of work: a chunk of manifest rows, a piece of a large manifest (read here), or one
    shard file of a packed source."""
    if "rows" in item:
        yield from map(_manifest_clip, json.loads(item["rows"]))
    elif manifest is not None:
        yield from manifest.clips(int(item["shard"]), data)
    elif data.source.kind == "webdataset":
        yield from tar_clips(item["uri"], data.source)
    else:
        yield from parquet_clips(item["uri"], data.source)


@dataclass(frozen=True)
class PieceWriter:
    """What every decode task of one preprocess run writes its pieces with (pickled to each task once)."""

    data: DataConfig
    mode: Mode
    out: str
    key: str  # the cache key each piece's record carries
    subtitles: bool
    manifest: PiecedManifest | None = None  # a large manifest's pieces, read by the tasks themselves
    decoder: object = None  # preprocess's decoder (None: decode_clip)

    def write(self, item: dict) -> dict:
        """Decode one piece (a chunk of manifest rows, a piece of a large manifest, or a shard of a packed source)
        into <out>/shards/shard-NNNNN[-PPPP].parquet, then record it as done in <out>/_done/shard-NNNNN.json with
        its skipped clips. A packed shard is written in parts of about data.shard_mb, so a long tar never sits
        whole in memory. The record is written after every part is whole, so a piece without one is redone; a
        retried task rewrites the same files."""
        data, mode, out = self.data, self.mode, self.out
        index, packed = int(item["shard"]), "uri" in item
        per_part = rows_per_shard(data, mode)
        part, files, rows, clips = ClipColumns(data, mode, self.decoder), [], [], 0
        failures: list[dict] = []

        def flush() -> None:
            nonlocal part
            name = _shard_name(index) + (f"-{len(files):04d}" if packed else "")
            rows.append(_write_part(part, out, name, self.subtitles))
            files.append(name + ".parquet")
            failures.extend(part.failures)
            part = ClipColumns(data, mode, self.decoder)

        try:
            for clip in _piece_clips(item, data, self.manifest):
                clips += 1
                part.decode(clip, clip_rng(clip.id) if mode == "train" else None)
                if packed and len(part) >= per_part:  # a manifest chunk is one file, sized by the plan
                    flush()
        except ShardError as e:  # not a tar, cut off mid-member: the clips before it are kept, the shard counted once
            clips += 1
            part.fail(posixpath.basename(item["uri"]), str(e))
        if len(part) or not packed:  # a manifest chunk gets its file even when no clip of it decodes
            flush()
        else:
            failures.extend(part.failures)
        record = {"cache_key": self.key, "clips": clips, "written": sum(rows), "skipped": failures,
                  "files": files, "rows": rows}  # fmt: skip
        record_done(out, _shard_name(index), record)
        return record


def write_shards(batch: dict, writer: PieceWriter) -> dict:
    """The map_batches UDF of the cache writer: each input row is one piece (PieceWriter.write). Returns one small
    row per piece, with its done record (the decoded clips never pass through Ray's object store; the driver reads
    no record back)."""
    written, records = [], []
    for i, index in enumerate(batch["shard"]):
        item = {"shard": int(index)} | {k: str(batch[k][i]) for k in ("rows", "uri") if k in batch}
        record = writer.write(item)
        written.append(record["written"])
        records.append(json.dumps(record))
    return {
        "shard": np.asarray(batch["shard"]),
        "clips": np.asarray(written),
        "record": np.asarray(records, dtype=object),
    }


_PIECE = re.compile(r"shard-(\d+)(?:-\d+)?(?:\.json|\.parquet)?")


def _piece_index(name: str) -> int:
    """shard-00012[.json], shard-00012.parquet, shard-00012-0003.parquet -> 12; shard-100012 -> 100012 (names
    are padded to 5 digits, not cut to them: VAST-27M's clips make far more than 100,000 pieces)."""
    match = _PIECE.fullmatch(name)
    if match is None:
        raise ValueError(f"{name} is not a cache piece's name (shard-N[.json], shard-N.parquet, shard-N-P.parquet)")
    return int(match.group(1))


def _done_shards(out: str, key: str) -> dict[int, dict]:
    """The pieces an earlier run of the same inputs and config finished: {index: its record}."""
    records = read_records(out, prefix="shard-")
    return {_piece_index(piece): r for piece, r in records.items() if r.get("cache_key") == key}


def reason_kind(reason: str) -> str:
    """A skip reason without its particulars (sizes, names, times), for counting: "no readable audio track (the
    file has no audio stream)" -> "no readable audio track"."""
    kind = re.split(r" \(|: ", reason, maxsplit=1)[0]
    return re.sub(r"\S*\d\S*", "#", kind).strip()


def check_inputs(inputs: list[str | None], video_dir: str | None, audio_dir: str | None, data: DataConfig) -> None:
    """ManifestError naming the first input (annotation file, manifest, shard) or media folder that is not there:
    checked before a job starts Ray, so a typo costs a second, not Ray's start-up."""
    if data.source.kind in PACKED:
        for spec in filter(None, inputs):
            shard_uris(str(spec), data.source.kind)
        return
    check_sources(inputs, video_dir, audio_dir)


@dataclass
class _Inputs:
    """What a source gives the plan: manifest rows read whole, or a large manifest's scan (read in pieces by the
    decode tasks), or a packed source's shard URIs; the cache key; whether its clips have subtitles."""

    key: str
    rows: list[ManifestRow] | None = None
    scan: ManifestScan | None = None
    uris: list[str] = field(default_factory=list)
    subtitles: bool = False


def _sources(annotations, video_dir, audio_dir, data: DataConfig, mode: Mode) -> _Inputs:
    if data.source.kind in PACKED:
        uris = shard_uris(str(annotations), data.source.kind)
        return _Inputs(packed_cache_key(uris, data, mode), uris=uris)
    check_sources([str(annotations)], None, None)
    if read_in_pieces(str(annotations)):
        scan = scan_manifest(str(annotations))
        sample = _first_rows(scan, data, video_dir, audio_dir)
        key = pieced_cache_key(scan, video_dir, audio_dir, data, mode)
        return _Inputs(key, scan=scan, subtitles=any(r.subtitle for r in sample))
    rows = read_annotations(annotations, data.source.fields, data.max_failure_share)
    resolve_media(rows, video_dir, audio_dir, data.video.format)
    return _Inputs(cache_key(annotations, rows, data, mode), rows=rows, subtitles=any(r.subtitle for r in rows))


_SAMPLE_BYTES = 256 * 2**10  # the first entries of a large manifest, checked before anything starts


def _first_rows(scan: ManifestScan, data: DataConfig, video_dir, audio_dir) -> list[ManifestRow]:
    """A large manifest's first entries, checked as a manifest read whole is, before Ray starts: too many entries
    that cannot be used (a wrong field name, most likely) or a media folder that is not there stop here."""
    if scan.kind == "parquet":
        entries = read_piece(scan.path, scan.kind, 0, min(scan.entries, 1000), 0)
    else:
        head = storage.read_range(scan.path, scan.data_start, _SAMPLE_BYTES)
        whole = head[: head.rfind(b"\n") + 1] or head  # whole entries only
        first = 1 + (scan.kind == "csv")
        entries = read_piece(scan.path, scan.kind, scan.data_start, scan.data_start + len(whole), first, scan.header)
    rows, invalid = rows_of_entries(entries, data.source.fields, caption_split(scan.path))
    check_invalid_share(scan.path, rows, invalid, data.max_failure_share)
    resolve_media(rows[:8], video_dir, audio_dir, data.video.format, list_folders=False)
    return rows


def pieced_cache_key(scan: ManifestScan, video_dir, audio_dir, data: DataConfig, mode: Mode) -> str:
    """The cache key of a manifest read in pieces: its bytes, the media folders (by name: media are not stat'ed or
    listed up front, see data/manifest_stream.py) and the config."""
    h = scan.digest.copy()
    h.update(json.dumps({"media": [storage.absolute(d) if d else None for d in (video_dir, audio_dir)]}).encode())
    h.update(_config_content(data, mode))
    return h.hexdigest()


@dataclass
class _Job:
    """One preprocess run: what it decodes and how (fixed), and its plan (the pieces, and those done before)."""

    annotations: str
    video_dir: str | None
    audio_dir: str | None
    out: str
    data: DataConfig
    mode: Mode
    subtitles: bool
    inputs: _Inputs
    decoder: object = None  # preprocess's decoder
    pieces: list[dict] = field(default_factory=list)
    done: dict[int, dict] = field(default_factory=dict)  # the records of pieces done before this run (its plan)
    done_now: dict[int, dict] = field(default_factory=dict)  # the records this run's tasks returned
    manifest: PiecedManifest | None = None  # a large manifest's pieces, read by the decode tasks

    @property
    def rows(self) -> list[ManifestRow] | None:
        return self.inputs.rows

    @property
    def key(self) -> str:
        return self.inputs.key

    @property
    def entries(self) -> int | None:
        """The manifest's entries (rows read whole, or a large manifest's scan), None for a packed source."""
        if self.rows is not None:
            return len(self.rows)
        return self.inputs.scan.entries if self.inputs.scan is not None else None

    @property
    def todo(self) -> list[int]:
        return [i for i in range(len(self.pieces)) if i not in self.done]

    @property
    def reused(self) -> int:
        return sum(record["clips"] for record in self.done.values())


def preprocess(
    annotations: str | Path,
    video_dir: str | Path | None,
    out: str | Path,
    data: DataConfig | None = None,
    audio_dir: str | Path | None = None,
    mode: Mode = "eval",
    force: bool = False,
    log=print,
    subtitles: bool | None = None,
    decoder=None,
) -> dict:
    """Decode every clip of a source (data.source.kind: annotations or a manifest with media, or WebDataset or
    Parquet shards, named by `annotations`) into a Parquet cache under `out`; returns the report.

    Reuses an existing cache of the same inputs and config unless force. Resumable (data/pieces.py): the clips are
    decoded in pieces (a chunk of manifest rows, or one shard), each recorded when written, so a run killed
    mid-way is continued by the next run of the same inputs and config, which decodes only the pieces not yet
    recorded (the report counts both). subtitles: keep a subtitle column; default: when a manifest has subtitles
    (never for packed sources, whose samples are only read by the decode tasks). Raises PreprocessError (after
    writing the report and keeping every shard written) when more than data.max_failure_share of the clips
    failed. decoder: what makes a clip's columns (data/decode.py's decode_clip); `gram-ray bench scale` passes a
    stand-in that writes a tiny row, to measure the bookkeeping at 27 M clips without video."""
    started = now()
    data = data or DataConfig()
    out = storage.absolute(out)
    inputs = _sources(annotations, video_dir, audio_dir, data, mode)
    previous = _load_report(out)
    if previous and previous.get("cache_key") == inputs.key and previous.get("status") == "complete" and not force:
        log(f"cache hit: {out} already holds these {previous['rows_written']} clips (use --force to decode again)")
        return previous | {"reused": True}
    if subtitles is None:
        subtitles = inputs.subtitles
    job = _Job(str(annotations), _text(video_dir), _text(audio_dir), out, data, mode, subtitles, inputs, decoder)
    start = time.perf_counter()
    with _cache_write_errors(out):
        _plan(job, force, started, log)
        _run(job, log)
    return _report(job, time.perf_counter() - start, log)


def _text(path: str | Path | None) -> str | None:
    return str(path) if path else None


@contextlib.contextmanager
def _cache_write_errors(out: str):
    """A failed write under the cache as a PreprocessError that says what was kept and what to do."""
    try:
        yield
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        kept = "The inputs are untouched; the shards written so far are kept and a rerun continues from them."
        if isinstance(cause, storage.StorageError):  # it says what failed and what to check
            raise PreprocessError(f"writing the cache under {out} failed: {cause}. {kept}") from e
        raise PreprocessError(
            f"writing the cache under {out} failed ({cause}). {kept} Free space or fix the folder's permissions (or "
            "set data.cache_dir elsewhere), then rerun."
        ) from e


def _plan(job: _Job, force: bool, started, log) -> None:
    """The job's pieces, and those an earlier run of the same inputs and config recorded as done (kept); what that
    run left unfinished is removed. A plan of other inputs (or force) starts the cache clean."""
    shards, plan_path = storage.join(job.out, SHARDS), storage.join(job.out, DONE, "plan.json")
    plan = None if force or not storage.exists(plan_path) else json.loads(storage.read_text(plan_path))
    if plan is None or plan.get("cache_key") != job.key:  # nothing of these inputs yet: start clean
        for stale in (shards, storage.join(job.out, DONE), storage.join(job.out, _SKIPPED)):
            storage.delete_dir(stale)
        storage.delete_file(storage.join(job.out, REPORT))
        size = _shard_rows(job.entries, job.data, job.mode) if job.entries is not None else None
        plan = {"cache_key": job.key, "rows_per_shard": size}
        storage.write_text(plan_path, json.dumps(plan))
    if job.inputs.scan is not None:  # cut again on a resume: the same file and size cut the same way
        scan = job.inputs.scan
        log(f"planning {scan.entries:,} entries of {scan.path} in pieces of {plan['rows_per_shard']:,} ...")
        pieces = cut_pieces(scan, job.data.source.fields, plan["rows_per_shard"])
        job.manifest = PiecedManifest(scan, pieces, job.video_dir, job.audio_dir)
        job.pieces = [{}] * len(pieces)  # what each decode task needs of its piece is in job.manifest
    elif job.rows is None:
        job.pieces = [{"uri": uri} for uri in job.inputs.uris]
    else:
        size, rows = plan["rows_per_shard"], job.rows
        job.pieces = [{"rows": json.dumps(_manifest_items(rows[i : i + size]))} for i in range(0, len(rows), size)]
    job.done = _done_shards(job.out, job.key)
    for path in storage.list_files(shards, ".parquet"):  # files of pieces a kill cut off: redone
        if _piece_index(posixpath.basename(path)) not in job.done:
            storage.delete_file(path)
    if job.done:
        log(
            f"resuming: {len(job.done)} of {len(job.pieces)} shards ({job.reused} clips) were written by an earlier run"
        )
        abort_orphans_of_a_dead_run(job.out, started, log=log)  # the parts of the shards the earlier run was writing


# Pieces go to the decode tasks one a block up to this many blocks (or 16 a CPU of the cluster), several a block
# past it: each block is an object the driver owns and a task Ray Data schedules and reports on, and at 130,000
# blocks (VAST-27M's pieces) the driver grew past 1.4 GB and Ray Data's stats actor took a core before a tenth of
# the pieces were done (`gram-ray bench scale`). A task then writes its pieces one after another; a retried task
# writes them again, whole.
_MAX_INPUT_BLOCKS = 4096


def _input_blocks(pieces: int) -> int:
    import ray

    return min(pieces, max(_MAX_INPUT_BLOCKS, 16 * int(ray.cluster_resources().get("CPU", 1))))


def _run(job: _Job, log) -> None:
    """Decode the pieces not done, in Ray Data tasks that write their shards and records themselves."""
    import ray.data

    todo, kind = job.todo, job.data.source.kind
    what = f"the clips of {len(todo)} {kind} shards"
    if job.entries is not None:
        what = f"{job.entries - job.reused:,} clips"
    log(f"decoding {what} from {job.annotations} into {storage.join(job.out, SHARDS)} with Ray Data ...")
    if not todo:
        return
    items = [{"shard": i} | job.pieces[i] for i in todo]
    ds = ray.data.from_items(items, override_num_blocks=_input_blocks(len(items))).map_batches(
        write_shards,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "writer": PieceWriter(job.data, job.mode, job.out, job.key, job.subtitles, job.manifest, job.decoder)
        },  # fmt: skip
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=decode_concurrency(job.data)),
    )

    def recorded(rows):  # each piece's record as its task returned it: the report reads none back from storage
        for row in rows:
            job.done_now[int(row["shard"])] = json.loads(row["record"])
            yield row

    clips = job.entries - job.reused if job.entries is not None else None
    drive(recorded(ds.iter_rows()), len(todo), "shards", log, clips=clips)


def _report(job: _Job, wall: float, log) -> dict:
    """The cache's report from every piece's record (those the plan found and those this run's tasks returned:
    each record is read from storage once a run), written and summarised; PreprocessError (after writing it)
    when more than data.max_failure_share of the clips failed."""
    records = job.done | job.done_now
    skipped = sorted((s for record in records.values() for s in record["skipped"]), key=lambda s: s["id"])
    written = sum(record["written"] for record in records.values())
    total = sum(record["clips"] for record in records.values())
    # Absences the data or the user's settings foretell (failed downloads, no audio under data.audio.missing=skip)
    # are left out and counted, but are not failures: only failures count against data.max_failure_share.
    failed = [s for s in skipped if not s.get("expected")]
    absent = [s for s in skipped if s.get("expected")]
    decoded_now, share = total - job.reused, len(failed) / max(total, 1)
    mostly_absent = len(absent) > total / 2  # expected absences, but they alone took most of the clips
    report_path, data = storage.join(job.out, REPORT), job.data
    report = {
        "status": "complete" if share <= data.max_failure_share and total and not mostly_absent else "failed",
        "cache_key": job.key,
        "source": data.source.kind,
        "annotations": job.annotations,
        "video_dir": job.video_dir,
        "audio_dir": job.audio_dir,
        "mode": job.mode,
        "rows_total": total,
        "rows_written": written,
        "rows_decoded_now": decoded_now,
        "rows_reused": job.reused,
        "shards": len(job.pieces),
        "shards_reused": len(job.done),
        "rows_skipped": skipped,  # each left out clip and why; "expected": true on an expected absence
        "rows_failed": len(failed),
        "rows_absent": len(absent),
        "skipped_by_reason": dict(Counter(reason_kind(s["reason"]) for s in skipped).most_common()),
        "absent_by_reason": dict(Counter(reason_kind(s["reason"]) for s in absent).most_common()),
        "config": data.model_dump(),
        "wall_seconds": round(wall, 3),
        "clips_per_second": round(decoded_now / wall, 3) if wall > 0 else None,
        "columns": _cache_columns(data, job.subtitles),
        # {file: rows}: a mid-epoch checkpoint records the files trained on whole by name (data/epoch_progress.py).
        # None when a piece was recorded by a version that did not count them.
        "file_rows": _file_rows(records.values()),
    }
    storage.write_text(report_path, json.dumps(report, indent=2))
    _summarise(report, report_path, log)
    if report["status"] == "failed" and share <= data.max_failure_share and mostly_absent:
        raise PreprocessError(_mostly_absent(report, written, total, report_path))
    if report["status"] == "failed":
        expected = f" ({len(absent)} more left out as expected: not counted)" if absent else ""
        raise PreprocessError(
            f"{len(failed)} of {total} clips ({share:.0%}) could not be decoded{expected}, more than "
            f"data.max_failure_share={data.max_failure_share:.0%}. The {written} good clips are kept in "
            f"{storage.join(job.out, SHARDS)}; the reasons are in {report_path}. Fix the inputs, or raise "
            "data.max_failure_share to accept them."
        )
    return report


def _file_rows(records) -> dict[str, int] | None:
    out: dict[str, int] = {}
    for record in records:
        if "rows" not in record:
            return None
        out.update(zip(record["files"], record["rows"], strict=True))
    return out


# What to do about a cache that expected absences left nearly empty, by the absence's kind (reason_kind).
_ABSENCE_ADVICE = {
    "no readable audio track": "have no sound (WebVid, for one, has none)",
    "audio is silent": "have a silent track",
    "no audio file and no video to take the audio track from": "have no audio file",
}
_NO_SOUND_REMEDY = (
    "use data.audio.missing: silence (such clips are kept, flagged has_audio false) or a text-video config "
    "(data.audio.format: none)"
)


def _mostly_absent(report: dict, written: int, total: int, report_path: str) -> str:
    """The error of a cache that expected absences left empty or nearly so: what most clips lacked and what to do."""
    parts, sound = [], 0
    for reason, count in report["absent_by_reason"].items():
        if reason in _ABSENCE_ADVICE:
            sound += count
            parts.append(f"{count} {_ABSENCE_ADVICE[reason]}")
        else:  # a download that failed: the status's own words
            parts.append(f"{count} were not downloaded ({reason})")
    remedy = _NO_SOUND_REMEDY if sound >= report["rows_absent"] / 2 else "download the missing samples again"
    return (
        f"only {written} of {total} clips were kept: {', '.join(parts)}. Left out as expected (not failures), but "
        f"they leave the cache {'empty' if not written else 'nearly empty'}: {remedy}. The reasons are in "
        f"{report_path}."
    )


def _summarise(report: dict, report_path: str, log) -> None:
    reused, skipped = report["rows_reused"], report["rows_skipped"]
    absent = report["rows_absent"]
    log(
        f"wrote {report['rows_written']} clips, skipped {report['rows_failed']}"
        + (f", left out {absent} as expected" if absent else "")
        + f", in {report['wall_seconds']:.1f} s ({report['clips_per_second']} clips/s"
        + (f"; {reused} clips kept from an earlier run" if reused else "")
        + f"); report: {report_path}"
    )
    expected = report["absent_by_reason"]
    for reason, count in report["skipped_by_reason"].items():
        if count > expected.get(reason, 0):
            log(f"  skipped {count - expected.get(reason, 0)}: {reason}")
    for reason, count in expected.items():
        log(f"  left out {count} as expected: {reason}")
    for s in [s for s in skipped if not s.get("expected")][:10]:
        log(f"  skipped {s['id']}: {s['reason']}")
