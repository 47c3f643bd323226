"""Annotation files -> one manifest row per video: id, captions, subtitle, and where its media are.

Accepted: the GRAM annotation JSON (a list of objects with an id and `desc` or `caption`, each a string or a list
of strings, optional `subtitle`; the id is the first of `clip_id`, `video_id`, `image_id`, `image`, `id`, as
GRAM's loader looks for it, and `image` may be a file name such as "1000092795.jpg"), VAST-27M's (`clip_id`,
`vast_cap` the captions trained on, `vision_cap` and `audio_cap` kept as extra fields, `subtitle`), JSONL with the
same fields, and CSV with the same columns (several captions in one CSV cell are separated by ` ||| `). Several
entries for one video are merged.

Annotation files and media folders are local paths or storage URIs (s3://bucket/msrvtt/videos): a URI folder is
listed once, and its clips are read by the decode tasks straight from storage.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from gram_ray import storage

__all__ = [
    "ManifestError",
    "ManifestRow",
    "read_annotations",
    "resolve_media",
    "media_finder",
    "check_sources",
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


def _captions(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return list(value)
    raise ManifestError(f"{where}: captions must be a string or a non-empty list of strings, got {value!r}")


def _row(entry: dict, where: str) -> ManifestRow:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected an object with video_id and desc/caption, got {type(entry).__name__}")
    id_field = next((k for k in ID_FIELDS if k in entry), None)
    if id_field is None:
        raise ManifestError(f"{where}: no id field (one of {', '.join(ID_FIELDS)}; fields: {sorted(entry)})")
    text = entry.get("desc", entry.get("caption", entry.get("vast_cap")))  # VAST-27M trains on vast_cap
    if text is None:
        raise ManifestError(f"{where}: {entry[id_field]!r} has neither 'desc' nor 'caption'")
    subtitle = entry.get("subtitle")
    extra = {k: v for k, v in entry.items() if k not in (id_field, "desc", "caption", "vast_cap", "subtitle")}
    return ManifestRow(str(entry[id_field]), _captions(text, where), subtitle if subtitle else None, extra=extra)


def _entries(name: str, text: str) -> list[tuple[dict, str]]:
    suffix = posixpath.splitext(name)[1].lower()
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
        out = []
        for n, r in enumerate(rows, 2):
            entry = {k: v for k, v in r.items() if v not in (None, "")}
            for key in ("desc", "caption"):
                if key in entry:
                    entry[key] = entry[key].split(CSV_CAPTION_SEPARATOR)
            out.append((entry, f"{name}:{n}"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ManifestError(f"{name}: the GRAM annotation format is a JSON list of objects, got {type(data).__name__}")
    return [(entry, f"{name}[{i}]") for i, entry in enumerate(data)]


def read_annotations(path: str | Path) -> list[ManifestRow]:
    """Parse an annotation file (a local path or a storage URI); entries of the same video are merged (captions
    concatenated, in order)."""
    path = str(path)
    _check_file(path, "annotation file")
    try:
        text = storage.read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"annotation file {path} cannot be read ({str(e).splitlines()[0][:200]})") from None
    rows: dict[str, ManifestRow] = {}
    for entry, where in _entries(path, text):
        row = _row(entry, where)
        if row.id in rows:
            rows[row.id].captions.extend(row.captions)
            rows[row.id].subtitle = rows[row.id].subtitle or row.subtitle
        else:
            rows[row.id] = row
    if not rows:
        raise ManifestError(f"{path}: no entries")
    return list(rows.values())


def _kind(path: str) -> pafs.FileType:
    try:
        fs, p = storage.resolve(path)
        return fs.get_file_info(p).type
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


def media_finder(directory: str, extensions: tuple[str, ...]):
    """media id -> its file's path or URI, or None. A storage folder is listed once (one LIST, not a request per
    clip and extension)."""
    if not storage.is_uri(directory):

        def find_local(media_id: str) -> str | None:
            found = _find(Path(directory), media_id, extensions)
            return str(found) if found else None

        return find_local
    names = set(storage.list_names(directory))

    def find(media_id: str) -> str | None:
        for name in (*(f"{media_id}{ext}" for ext in extensions), media_id):
            if name in names:
                return storage.join(directory, name)
        return None

    return find


def resolve_media(
    rows: list[ManifestRow],
    video_dir: str | Path | None,
    audio_dir: str | Path | None = None,
    video_format: str = "video",
) -> None:
    """Fill in video_path / audio_path (local paths, or URIs for folders in storage). A video (or an image, with
    video_format "image") that is not found keeps video_path None (reported as missing at decode time, so the
    other rows go on). Audio: <audio_dir>/<id>.<ext> if present, else the video's track. video_format "none"
    (text-audio sets): no video_dir; every clip's audio from audio_dir."""
    if video_format == "none":
        if not audio_dir:
            raise ManifestError("data.video.format none (audio-only clips) needs an audio directory (data.audio_dir)")
        video_dir = None
    elif not video_dir:
        raise ManifestError(f"no {video_format} directory given (data.video_dir, --video-dir)")
    check_sources([], str(video_dir) if video_dir else None, str(audio_dir) if audio_dir else None)
    extensions = IMAGE_EXTENSIONS if video_format == "image" else VIDEO_EXTENSIONS
    find_video = media_finder(str(video_dir), extensions) if video_dir else None
    find_audio = media_finder(str(audio_dir), AUDIO_EXTENSIONS) if audio_dir else None
    for row in rows:
        row.video_path = find_video(row.id) if find_video else None
        row.audio_path = find_audio(row.id) if find_audio else None
