"""Why a clip cannot be used (DecodeError), and how its bytes reach the decoders (load_media).

A clip's media are a local file, handed to the decoders by path, or an object in storage (s3://, gs://, ...),
read into memory through pyarrow's filesystem and decoded from there: a cluster's decode tasks need no shared
filesystem and no bucket mount. Either way, a file that cannot be used is a DecodeError naming the problem, and
the clip is skipped with that reason like any other bad file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from gram_ray import storage

__all__ = ["DecodeError", "Media", "check_media_file", "load_media", "reader_input", "pyav_or_none"]

Media = str | bytes  # a local file's path, or the bytes of an object read from storage


class DecodeError(Exception):
    """One clip that cannot be used; str(error) is the reason recorded in report.json. absent: the medium is not
    there at all (no audio stream, a silent track, no file to take it from), as opposed to one that is there and
    cannot be read: a clip left out for an absence under a policy the user chose (data.audio.missing=skip) is
    counted apart from the failures (preprocess.py's report)."""

    def __init__(self, reason: str, absent: bool = False) -> None:
        super().__init__(reason)
        self.absent = absent


def check_media_file(path: str | None, what: str) -> None:
    """DecodeError naming what is wrong with a local path before any decoder sees it."""
    if path is None:
        raise DecodeError(f"{what} file not found")
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise DecodeError(f"{what} file is a dangling symlink (to {os.readlink(p)})")
    if p.is_dir():
        raise DecodeError(f"{what} path {p.name} is a folder, not a file")
    if not p.is_file():
        raise DecodeError(f"{what} file not found")
    if p.stat().st_size == 0:
        raise DecodeError(f"{what} file is empty (0 bytes)")


def load_media(source: Media | None, what: str) -> Media:
    """What the decoders read: a local path (checked), or the bytes of a storage URI (bytes pass through, so a
    clip read once serves its frames and its audio track). DecodeError when it cannot be had."""
    if isinstance(source, bytes):
        return source
    if source is None or not storage.is_uri(source):
        check_media_file(source, what)
        return source
    try:
        data = storage.read_bytes(source)
    except FileNotFoundError:
        raise DecodeError(f"{what} file not found in storage ({source})") from None
    except OSError as e:  # unreachable endpoint, refused credentials, a folder
        raise DecodeError(f"{what} file cannot be read from storage ({str(e).splitlines()[0][:200]})") from None
    if not data:
        raise DecodeError(f"{what} file is empty (0 bytes)")
    return data


def reader_input(media: Media):
    """What PyAV and decord open: the path, or a fresh in-memory file over the bytes (each reader seeks its own)."""
    return io.BytesIO(media) if isinstance(media, bytes) else media


def pyav_or_none():
    """PyAV, imported on first use, or None where it is not installed (a bare GPU image has decord only)."""
    try:
        import av
    except ImportError:
        return None
    return av
