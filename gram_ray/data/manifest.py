"""Annotation files and manifests -> one row per clip: id, captions, subtitle, optional span, and where its media are.

A manifest is rows whose fields (data.source.fields) name the clip's id, its video, its captions, and optionally
its subtitle, a separate audio file, and a span (start, end seconds) of a longer video. GRAM's annotation files
are manifests with GRAM's field names, the defaults: a JSON list of objects with an id (the first of `clip_id`,
`video_id`, `image_id`, `image`, `id`, as GRAM's loader looks for it; `image` may be a file name such as
"1000092795.jpg") and `desc` or `caption` (a string or a list), optional `subtitle`; VAST-27M's rows (`clip_id`,
`vast_cap`, `vision_cap`, `audio_cap`, `subtitle`) read the same way. Rows come as JSON, JSONL, CSV (several
captions in one cell separated by ` ||| `) or Parquet. Entries of the same clip (and span) are merged.

A row that cannot be used (no id, no caption field, no video) is kept with its reason and skipped at decode time,
counted in the report, so the rest of the set goes on; a file in which more than a share of rows are unusable
(a wrong field name, most likely) stops at once with the reason.

Annotation files and media folders are local paths or storage URIs (s3://bucket/msrvtt/videos): a URI folder is
listed once, and its clips are read by the decode tasks straight from storage.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from gram_ray import storage
from gram_ray.config import SourceFields

__all__ = [
    "ManifestError",
    "ManifestRow",
    "read_annotations",
    "rows_of_entries",
    "caption_split",
    "check_invalid_share",
    "resolve_media",
    "media_finder",
    "check_sources",
    "field_captions",
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "AUDIO_EXTENSIONS",
    "ID_FIELDS",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".JPEG", ".png", ".webp")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".m4a")
CSV_CAPTION_SEPARATOR = " ||| "
ID_FIELDS = ("clip_id", "video_id", "image_id", "image", "id")  # GRAM's loader takes the first present


class ManifestError(ValueError):
    """An annotation file that cannot be read; the message names the file and the entry."""


@dataclass
class ManifestRow:
    id: str
    captions: list[str]
    subtitle: str | None = None
    video_path: str | None = None
    audio_path: str | None = None  # None: use the video's own audio track
    extra: dict = field(default_factory=dict)  # other fields of the entry, kept (e.g. a generator's metadata)
    start: float | None = None  # the clip's span of the video, in seconds (both or neither)
    end: float | None = None
    video_ref: str | None = None  # the manifest's video field: a path, a URI, or a media id (data.source.fields.video)
    audio_ref: str | None = None
    error: str | None = None  # why this row cannot be used: skipped, with this reason, when the clips are decoded
    media_id: str | None = None  # the id its media are found by in media folders (the id before a span suffix)


def _natural(name: str) -> list:
    """caption_2 before caption_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def field_captions(entry: dict, patterns: list[str], split: str | None = None) -> list[str] | None:
    """The captions of an entry by the first caption field (or pattern, e.g. caption_*) present in it: each field a
    string or a list of strings, in numeric order of the fields a pattern matches. None when no field is present.
    split: a separator that joins several captions in one string (CSV cells). ValueError for a field that holds
    something else than text."""
    for pattern in patterns:
        names = (
            sorted((k for k in entry if fnmatch.fnmatchcase(k, pattern)), key=_natural)
            if any(c in pattern for c in "*?[")
            else [pattern] * (pattern in entry)
        )
        values = [entry[n] for n in names if entry[n] not in (None, "")]
        if not values:
            continue
        captions = []
        for name, value in zip(names, values, strict=False):
            if hasattr(value, "tolist"):  # a numpy array from Parquet
                value = value.tolist()
            if isinstance(value, str):
                captions.extend(value.split(split) if split else [value])
            elif isinstance(value, list) and value and all(isinstance(c, str) for c in value):
                captions.extend(value)
            else:
                raise ValueError(
                    f"caption field {name!r} must be a string or a non-empty list of strings, got {value!r}"
                )
        return captions
    return None


def _seconds(entry: dict, name: str) -> float:
    value = entry.get(name)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"span field {name!r} is {value!r}, not a number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError(f"span field {name!r} is {value!r}, not a number of seconds")
    return seconds


def _row(entry, where: str, fields: SourceFields, split: str | None) -> ManifestRow:
    """One entry as a row; a row that cannot be used carries its reason in .error."""
    if not isinstance(entry, dict):
        return ManifestRow(
            where, [], error=f"{where}: expected an object with an id and captions, got {type(entry).__name__}"
        )
    id_fields = (fields.id,) if fields.id else ID_FIELDS
    id_field = next((k for k in id_fields if entry.get(k) not in (None, "")), None)
    if id_field is None:
        return ManifestRow(
            where, [], error=f"{where}: no id field (one of {', '.join(id_fields)}; fields: {sorted(entry)})"
        )
    clip_id = str(entry[id_field])
    try:
        captions = field_captions(entry, fields.captions, split)
        start = end = None
        if fields.start and (entry.get(fields.start) not in (None, "") or entry.get(fields.end) not in (None, "")):
            start, end = _seconds(entry, fields.start), _seconds(entry, fields.end)  # else the whole video
    except ValueError as e:
        return ManifestRow(clip_id, [], error=f"{where}: {e}")
    if captions is None:
        return ManifestRow(
            clip_id,
            [],
            error=f"{where}: {clip_id!r} has no caption field (looked for "
            f"{', '.join(fields.captions)}; fields: {sorted(entry)})",
        )
    video_ref = audio_ref = None
    if fields.video:
        video_ref = entry.get(fields.video)
        if video_ref in (None, ""):
            return ManifestRow(
                clip_id,
                captions,
                error=f"{where}: {clip_id!r} names no video (field {fields.video!r} is missing or empty)",
            )
        video_ref = str(video_ref)
    if fields.audio and entry.get(fields.audio) not in (None, ""):
        audio_ref = str(entry[fields.audio])
    subtitle = entry.get(fields.subtitle) if fields.subtitle else None
    used = {id_field, fields.subtitle, fields.video, fields.audio, fields.start, fields.end, "desc", "caption"}
    extra = {k: v for k, v in entry.items() if k not in used and not isinstance(v, bytes)}
    return ManifestRow(
        clip_id,
        captions,
        str(subtitle) if subtitle else None,
        extra=extra,
        start=start,
        end=end,
        video_ref=video_ref,
        audio_ref=audio_ref,
        media_id=clip_id,
    )


def _entries(name: str, data: bytes) -> list[tuple[dict, str]]:
    suffix = posixpath.splitext(name)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as e:  # pyarrow's errors for a file that is not Parquet
            raise ManifestError(f"{name}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
        return [(r, f"{name}[{i}]") for i, r in enumerate(rows)]
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ManifestError(f"annotation file {name} cannot be read ({e})") from None
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((json.loads(line), f"{name}:{n}"))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{name}:{n}: not valid JSON ({e.msg})") from None
        return out
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        return [({k: v for k, v in r.items() if v not in (None, "")}, f"{name}:{n}") for n, r in enumerate(rows, 2)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ManifestError(f"{name}: the GRAM annotation format is a JSON list of objects, got {type(data).__name__}")
    return [(entry, f"{name}[{i}]") for i, entry in enumerate(data)]


def _span_id(row: ManifestRow) -> str:
    return f"{row.id}_{row.start:g}-{row.end:g}"


def caption_split(path: str) -> str | None:
    """The separator of several captions in one cell: CSV's ` ||| `; None for the other formats."""
    return CSV_CAPTION_SEPARATOR if posixpath.splitext(str(path))[1].lower() == ".csv" else None


def rows_of_entries(entries, fields: SourceFields, split: str | None) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(rows, rows that cannot be used) of (entry, where) pairs: entries of the same clip (and span) merged,
    captions concatenated in order; with spans, one video gives a clip per span, its id suffixed with the span
    where the video has several."""
    rows: dict[tuple, ManifestRow] = {}
    invalid: list[ManifestRow] = []
    for entry, where in entries:
        row = _row(entry, where, fields, split)
        if row.error:
            invalid.append(row)
            continue
        key = (row.id, row.start, row.end)
        if key in rows:
            rows[key].captions.extend(row.captions)
            rows[key].subtitle = rows[key].subtitle or row.subtitle
        else:
            rows[key] = row
    spans_of: dict[str, int] = {}
    for clip_id, _, _ in rows:
        spans_of[clip_id] = spans_of.get(clip_id, 0) + 1
    for row in rows.values():
        if row.start is not None and spans_of[row.id] > 1:
            row.id = _span_id(row)
    return list(rows.values()), invalid


def check_invalid_share(path: str, rows: list, invalid: list[ManifestRow], max_invalid_share: float) -> None:
    """ManifestError when more than max_invalid_share of the entries cannot be used (a wrong field name, most
    likely), naming the first."""
    total = len(rows) + len(invalid)
    if not total:
        raise ManifestError(f"{path}: no entries")
    if len(invalid) / total > max_invalid_share:
        raise ManifestError(
            f"{invalid[0].error} ({len(invalid)} of {total} entries cannot be used: check data.source.fields)"
            if total > 1
            else invalid[0].error
        )


def read_annotations(
    path: str | Path, fields: SourceFields | None = None, max_invalid_share: float = 0.1
) -> list[ManifestRow]:
    """Parse an annotation file or manifest (a local path or a storage URI), whole (rows_of_entries). Rows that
    cannot be used come back with .error set; ManifestError when more than max_invalid_share of them cannot, or
    the file itself cannot be read."""
    path, fields = str(path), fields or SourceFields()
    _check_file(path, "annotation file")
    try:
        data = storage.read_bytes(path)
    except OSError as e:
        raise ManifestError(f"annotation file {path} cannot be read ({str(e).splitlines()[0][:200]})") from None
    rows, invalid = rows_of_entries(_entries(path, data), fields, caption_split(path))
    check_invalid_share(path, rows, invalid, max_invalid_share)
    return [*rows, *invalid]


def _kind(path: str) -> pafs.FileType:
    try:
        return storage.kind(path)
    except OSError as e:  # storage unreachable, credentials refused, a bucket that does not exist
        raise ManifestError(f"cannot reach {path}: {str(e).splitlines()[0][:300]}") from None


def _check_file(path: str, what: str) -> None:
    kind = _kind(path)
    if kind == pafs.FileType.Directory:
        raise ManifestError(f"{what} {path} is a folder, not a file")
    if kind != pafs.FileType.File:
        raise ManifestError(f"{what} {path} does not exist")


def _check_dir(path: str, what: str) -> None:
    if _kind(path) != pafs.FileType.Directory:
        raise ManifestError(f"{what} {path} does not exist")


def check_sources(annotations: list[str | None], video_dir: str | None, audio_dir: str | None = None) -> None:
    """ManifestError naming the first annotation file or media folder that is not there: checked before a job
    starts Ray, so a typo costs a second, not Ray's start-up."""
    for path in annotations:
        if path:
            _check_file(str(path), "annotation file")
    if video_dir:
        _check_dir(str(video_dir), "video directory")
    if audio_dir:
        _check_dir(str(audio_dir), "audio directory")


def _find(directory: Path, media_id: str, extensions: tuple[str, ...]) -> Path | None:
    # A path that is there but unusable (a folder, a dangling symlink, an empty file) is returned too, so that
    # decoding skips it with that reason instead of "not found".
    for ext in extensions:
        candidate = directory / f"{media_id}{ext}"
        if candidate.is_file():
            return candidate
    for ext in extensions:
        candidate = directory / f"{media_id}{ext}"
        if candidate.is_symlink() or candidate.is_dir():
            return candidate
    as_named = directory / media_id  # the id may already be a file name ("clip.mp4")
    return as_named if as_named.is_file() or as_named.is_symlink() else None


def media_finder(directory: str, extensions: tuple[str, ...], list_folder: bool = True):
    """media id -> its file's path or URI, or None. A storage folder is listed once (one LIST, not a request per
    clip and extension); list_folder False (a piece of a large manifest, in its decode task: a folder of millions
    of objects is not listed by each piece) looks each candidate up (a request per extension tried, .mp4 first)."""
    if not storage.is_uri(directory):

        def find_local(media_id: str) -> str | None:
            found = _find(Path(directory), media_id, extensions)
            return str(found) if found else None

        return find_local
    if not list_folder:

        def look_up(media_id: str) -> str | None:
            for name in (*(f"{media_id}{ext}" for ext in extensions), media_id):
                if storage.kind(storage.join(directory, name)) == pafs.FileType.File:
                    return storage.join(directory, name)
            return None

        return look_up
    names = set(storage.list_names(directory))

    def find(media_id: str) -> str | None:
        for name in (*(f"{media_id}{ext}" for ext in extensions), media_id):
            if name in names:
                return storage.join(directory, name)
        return None

    return find


def _is_path(ref: str, extensions: tuple[str, ...]) -> bool:
    """A manifest's media field: a path (it has a media file's extension, or is absolute or a URI) or a media id to
    look up in the media folder (a YouTube id, say)."""
    return storage.is_uri(ref) or posixpath.isabs(ref) or posixpath.splitext(ref)[1].lower() in extensions


def _locate(ref: str, folder: str | None, find, extensions: tuple[str, ...], what: str) -> str | None:
    if storage.is_uri(ref) or posixpath.isabs(ref):
        return ref
    if folder is None:
        raise ManifestError(f"the manifest names {what} {ref!r} relative to a folder: set data.{what}_dir")
    if _is_path(ref, extensions):
        return storage.join(folder, ref) if storage.is_uri(folder) else str(Path(folder) / ref)
    return find(ref)


def resolve_media(
    rows: list[ManifestRow],
    video_dir: str | Path | None,
    audio_dir: str | Path | None = None,
    video_format: str = "video",
    list_folders: bool = True,
) -> None:
    """Fill in video_path / audio_path (local paths, or URIs for folders in storage). A video (or an image, with
    video_format "image") that is not found keeps video_path None (reported as missing at decode time, so the
    other rows go on). Video: the manifest's video field (a path under video_dir, an absolute path or URI, or a
    media id), else the clip's id looked up in video_dir. Audio: the manifest's audio field, else
    <audio_dir>/<id>.<ext> if present, else the video's track. video_format "none" (text-audio sets): no
    video_dir; every clip's audio from audio_dir. list_folders: see media_finder."""
    needs_folder = any(r.error is None and not (r.video_ref and _is_path(r.video_ref, ())) for r in rows)
    if video_format == "none":
        if not audio_dir:
            raise ManifestError("data.video.format none (audio-only clips) needs an audio directory (data.audio_dir)")
        video_dir = None
    elif not video_dir and needs_folder:
        raise ManifestError(f"no {video_format} directory given (data.video_dir, --video-dir)")
    check_sources([], str(video_dir) if video_dir else None, str(audio_dir) if audio_dir else None)
    video_dir, audio_dir = (str(d) if d else None for d in (video_dir, audio_dir))
    extensions = IMAGE_EXTENSIONS if video_format == "image" else VIDEO_EXTENSIONS
    find_video = media_finder(video_dir, extensions, list_folders) if video_dir and video_format != "none" else None
    find_audio = media_finder(audio_dir, AUDIO_EXTENSIONS, list_folders) if audio_dir else None
    for row in rows:
        if row.error:
            continue
        media_id = row.media_id or row.id
        if row.video_ref and video_format != "none":
            row.video_path = _locate(row.video_ref, video_dir, find_video, extensions, "video")
        elif find_video:
            row.video_path = find_video(media_id)
        if row.audio_ref:
            row.audio_path = _locate(row.audio_ref, audio_dir, find_audio, AUDIO_EXTENSIONS, "audio")
        else:
            row.audio_path = find_audio(media_id) if find_audio else None
