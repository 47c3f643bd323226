"""Paths that may be local or in cloud storage (s3://, gs://, file://, anything pyarrow.fs knows).

On a cluster, checkpoints, results and the Parquet cache must live where every node can read them, so every
file gram-ray writes outside the driver's own output folder goes through these helpers. Credentials come from
the environment (instance roles, workload identity, AWS_* / GOOGLE_* variables), never from configs.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs

__all__ = [
    "is_uri",
    "resolve",
    "join",
    "absolute",
    "exists",
    "read_bytes",
    "read_text",
    "write_text",
    "write_bytes_with",
    "delete_file",
    "delete_dir",
    "list_files",
    "total_bytes",
]


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def join(base: str | Path, *parts: str) -> str:
    """base/part/...: posix joins for URIs (s3://bucket/a + b -> s3://bucket/a/b), pathlib for local paths."""
    if is_uri(base):
        return posixpath.join(str(base), *parts)
    return str(Path(base, *parts))


def absolute(path: str | Path) -> str:
    """URIs unchanged, local paths made absolute (Ray workers run in other working directories)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def exists(path: str | Path) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str | Path) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_text(path: str | Path, text: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def write_bytes_with(path: str | Path, write) -> None:
    """write(stream) into a new file at path (parent folders made as needed)."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        write(f)


def delete_file(path: str | Path) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def delete_dir(path: str | Path) -> None:
    """Remove a folder and everything under it; nothing happens if it is not there."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def _files(path: str | Path, suffix: str) -> list[pafs.FileInfo]:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)), key=lambda i: i.path
    )


def list_files(path: str | Path, suffix: str = "") -> list[str]:
    """Files directly in a folder whose names end with suffix, as paths (or URIs) that resolve() accepts."""
    return [join(path, info.base_name) for info in _files(path, suffix)]


def total_bytes(path: str | Path, suffix: str = "") -> int:
    return sum(info.size for info in _files(path, suffix))
