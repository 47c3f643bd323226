"""Annotation files -> one manifest row per video: id, captions, subtitle, and where its media are.

Accepted: the GRAM annotation JSON (a list of objects with `video_id` and `desc` or `caption`, each a string or
a list of strings, optional `subtitle`), VAST-27M's (`clip_id`, `vast_cap` the captions trained on, `vision_cap`
and `audio_cap` kept as extra fields, `subtitle`), JSONL with the same fields, and CSV with the same columns
(several captions in one CSV cell are separated by ` ||| `). Several entries for one video are merged.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ManifestError",
    "ManifestRow",
    "read_annotations",
    "resolve_media",
    "VIDEO_EXTENSIONS",
    "AUDIO_EXTENSIONS",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".m4a")
CSV_CAPTION_SEPARATOR = " ||| "


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
    if "video_id" not in entry and "clip_id" in entry:  # VAST-27M: clip_id, vast_cap (+ vision/audio captions)
        entry = {"video_id": entry["clip_id"], "desc": entry.get("vast_cap")} | {
            k: v for k, v in entry.items() if k not in ("clip_id", "vast_cap")
        }
    if "video_id" not in entry:
        raise ManifestError(f"{where}: no 'video_id' (or VAST-27M 'clip_id') field (fields: {sorted(entry)})")
    text = entry.get("desc", entry.get("caption"))
    if text is None:
        raise ManifestError(f"{where}: video {entry['video_id']!r} has neither 'desc' nor 'caption'")
    subtitle = entry.get("subtitle")
    extra = {k: v for k, v in entry.items() if k not in ("video_id", "desc", "caption", "subtitle")}
    return ManifestRow(str(entry["video_id"]), _captions(text, where), subtitle if subtitle else None, extra=extra)


def _entries(path: Path) -> list[tuple[dict, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append((json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        out = []
        for n, r in enumerate(rows, 2):
            entry = {k: v for k, v in r.items() if v not in (None, "")}
            for key in ("desc", "caption"):
                if key in entry:
                    entry[key] = entry[key].split(CSV_CAPTION_SEPARATOR)
            out.append((entry, f"{path}:{n}"))
        return out
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ManifestError(f"{path}: the GRAM annotation format is a JSON list of objects, got {type(data).__name__}")
    return [(entry, f"{path}[{i}]") for i, entry in enumerate(data)]


def read_annotations(path: str | Path) -> list[ManifestRow]:
    """Parse an annotation file; entries of the same video are merged (captions concatenated, in order)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"annotation file {path} does not exist")
    rows: dict[str, ManifestRow] = {}
    for entry, where in _entries(path):
        row = _row(entry, where)
        if row.id in rows:
            rows[row.id].captions.extend(row.captions)
            rows[row.id].subtitle = rows[row.id].subtitle or row.subtitle
        else:
            rows[row.id] = row
    if not rows:
        raise ManifestError(f"{path}: no entries")
    return list(rows.values())


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


def resolve_media(rows: list[ManifestRow], video_dir: str | Path, audio_dir: str | Path | None = None) -> None:
    """Fill in video_path / audio_path. A video that is not found keeps video_path None (reported as missing
    at decode time, so the other rows go on). Audio: <audio_dir>/<id>.<ext> if present, else the video's track."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise ManifestError(f"video directory {video_dir} does not exist")
    audio_dir = Path(audio_dir) if audio_dir else None
    if audio_dir is not None and not audio_dir.is_dir():
        raise ManifestError(f"audio directory {audio_dir} does not exist")
    for row in rows:
        video = _find(video_dir, row.id, VIDEO_EXTENSIONS)
        row.video_path = str(video) if video else None
        audio = _find(audio_dir, row.id, AUDIO_EXTENSIONS) if audio_dir else None
        row.audio_path = str(audio) if audio else None
