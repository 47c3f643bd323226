"""Paths that may be local or in cloud storage (s3://, gs://, file://, anything pyarrow.fs knows).

On a cluster, checkpoints, results, the Parquet cache and the media must live where every node can read them, so
every file gram-ray reads or writes outside the driver's own output folder goes through these helpers.

Where storage is and who may use it comes from the environment, as every AWS tool takes it: AWS_ENDPOINT_URL (an
S3-compatible server: MinIO, Ceph, a local test server; pyarrow reads it), AWS_REGION, AWS_PROFILE, the
credentials variables or files, instance roles, workload identity (GOOGLE_* for gs://). Nothing of it is written
into a config or any file of a run. gram-ray forwards the variables that say where storage is (FORWARDED_ENV, no
secrets) to the Ray workers it schedules; credentials must be on every node (a role, or the node's environment).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

__all__ = [
    "FORWARDED_ENV",
    "forwarded_env",
    "is_uri",
    "resolve",
    "join",
    "absolute",
    "exists",
    "read_bytes",
    "read_text",
    "read_json",
    "CorruptFileError",
    "write_text",
    "write_bytes_with",
    "delete_file",
    "delete_dir",
    "list_files",
    "list_names",
    "file_infos",
    "upload_dir",
    "total_bytes",
]

# Where storage is (not who may use it): safe to hand to every worker of a job.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV variables set in this process, for a Ray runtime environment's env_vars."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), _resolved(path)


def join(base: str | Path, *parts: str) -> str:
    """base/part/...: posix joins for URIs (s3://bucket/a + b -> s3://bucket/a/b), pathlib for local paths."""
    if is_uri(base):
        return posixpath.join(str(base), *parts)
    return str(Path(base, *parts))


def absolute(path: str | Path) -> str:
    """URIs unchanged, local paths made absolute (Ray workers run in other working directories)."""
    return str(path) if is_uri(path) else _resolved(path)


def _resolved(path: str | Path) -> str:
    """An absolute local path; a symbolic link loop is the OSError it is (pathlib raises RuntimeError)."""
    try:
        return str(Path(path).resolve())
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def exists(path: str | Path) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str | Path) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


class CorruptFileError(ValueError):
    """A file that is there but does not hold what it should (cut off, or another file under its name)."""


def read_json(path: str | Path):
    """The JSON a file or object holds; a CorruptFileError naming it when it is not JSON."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}): was it cut off, or another file?"
        ) from None


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


def file_infos(path: str | Path) -> dict[str, pafs.FileInfo]:
    """{name: FileInfo (size, mtime)} of the files directly in a folder: one listing, one request on object
    storage."""
    return {info.base_name: info for info in _files(path, "")}


def list_names(path: str | Path) -> list[str]:
    """Names of the files directly in a folder (one listing)."""
    return list(file_infos(path))


def upload_dir(local: str | Path, dest: str | Path) -> None:
    """Copy a local folder's files to dest (a path or URI), replacing what is there under the same names."""
    fs, p = resolve(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(Path(local).resolve()), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def total_bytes(path: str | Path, suffix: str = "") -> int:
    return sum(info.size for info in _files(path, suffix))
