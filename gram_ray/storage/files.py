"""Reading, writing, listing and deleting files and objects, each with the storage settings' retries: whole
or not at all."""

from __future__ import annotations

import io
import json
import mmap
import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from gram_ray.storage.filesystems import is_uri, join, resolve
from gram_ray.storage.retries import with_retries

__all__ = [
    "exists",
    "kind",
    "read_bytes",
    "read_range",
    "iter_blocks",
    "file_size",
    "read_text",
    "read_table",
    "read_json",
    "CorruptFileError",
    "write_text",
    "write_bytes_with",
    "put_bytes",
    "put_whole",
    "delete_file",
    "delete_dir",
    "list_files",
    "list_names",
    "file_infos",
    "upload_dir",
    "copy_files_to",
    "total_bytes",
]


def exists(path: str | Path) -> bool:
    return kind(path) != pafs.FileType.NotFound


def kind(path: str | Path) -> pafs.FileType:
    """File, Directory (a prefix with objects under it, in object storage) or NotFound, with the settings' retries;
    an OSError when storage cannot be reached or refuses."""

    def look():
        fs, p = resolve(path)
        return fs.get_file_info(p).type

    return with_retries("looking up", str(path), look)


def read_bytes(path: str | Path) -> bytes:
    def read():
        fs, p = resolve(path)
        with fs.open_input_stream(p) as f:
            return f.read()

    return with_retries("reading", str(path), read)


def file_size(path: str | Path) -> int:
    def look():
        fs, p = resolve(path)
        info = fs.get_file_info(p)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{path} is not a file")
        return info.size

    return with_retries("looking up", str(path), look)


def read_range(path: str | Path, offset: int, length: int) -> bytes:
    """length bytes of a file from offset (fewer at its end): one ranged GET of an object."""

    def read():
        fs, p = resolve(path)
        with fs.open_input_file(p) as f:
            return f.read_at(length, offset)

    return with_retries("reading", f"{path} [{offset}, {offset + length})", read)


def iter_blocks(path: str | Path, block: int = 16 * 2**20, start: int = 0, end: int | None = None):
    """A file's bytes [start, end) in blocks of `block`, each read (and retried) on its own: a failure part way
    through a large manifest repeats one block, not the file."""
    end = file_size(path) if end is None else end
    for offset in range(start, end, block):
        yield read_range(path, offset, min(block, end - offset))


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def read_table(path: str | Path, columns: list[str] | None = None):
    """A Parquet file (or a folder of them) as one Arrow table, read again whole if storage fails part way: a
    read is many ranged GETs, and the client's attempts cover each one alone."""
    import pyarrow.parquet as pq

    def read():
        fs, p = resolve(path)
        return pq.read_table(p, columns=columns, filesystem=fs)

    return with_retries("reading", str(path), read)


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
    write_bytes_with(path, lambda f: f.write(text.encode()))


def write_bytes_with(path: str | Path, write) -> None:
    """write(stream) into a new file at path (parent folders made as needed), whole or not at all.

    In object storage the bytes are gathered first and sent in one go: pyarrow's output stream completes the
    upload when it is closed, even by an exception (apache/arrow#40502), so writing into it directly would store
    whatever came before an error in write() as a whole object. Locally, the file is written beside and renamed.
    """
    if not is_uri(path):
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        partial = f"{p}.partial"
        try:
            with fs.open_output_stream(partial) as f:
                write(f)
            fs.move(partial, p)
        except BaseException:
            if fs.get_file_info(partial).type == pafs.FileType.File:
                fs.delete_file(partial)
            raise
        return
    buffer = io.BytesIO()
    write(buffer)
    put_bytes(path, buffer.getbuffer())


def put_bytes(path: str | Path, data) -> None:
    """Store data (bytes-like) as the object at path, with the storage settings' retries."""

    def put():
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        put_whole(fs, p, data)

    with_retries("writing", str(path), put)


def put_whole(fs: pafs.FileSystem, path: str, data) -> None:
    """data stored as the object at path on fs in one upload."""
    with fs.open_output_stream(path) as out:
        out.write(data)  # one write, then close: an error leaves the upload uncompleted, never a cut object


def delete_file(path: str | Path) -> None:
    """Remove a file; nothing happens if it is not there."""
    _delete(path, pafs.FileType.File, lambda fs, p: fs.delete_file(p))


def delete_dir(path: str | Path) -> None:
    """Remove a folder and everything under it; nothing happens if it is not there."""
    _delete(path, pafs.FileType.Directory, lambda fs, p: fs.delete_dir(p))


def _delete(path: str | Path, kind: pafs.FileType, remove) -> None:
    def delete():
        fs, p = resolve(path)
        if fs.get_file_info(p).type == kind:
            remove(fs, p)

    with_retries("deleting", str(path), delete)


def _files(path: str | Path, suffix: str) -> list[pafs.FileInfo]:
    def listing():
        fs, p = resolve(path)
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(p, recursive=False))

    infos = with_retries("listing", str(path), listing)
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


def upload_dir(local: str | Path, dest: str | Path, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder's files to dest (a path or URI), replacing what is there under the same names. Files
    named in last go after all others, in that order (a manifest a reader trusts only once it is there)."""
    fs, p = resolve(dest)
    copy_files_to(Path(local), fs, p, last=last, target=str(dest))


def copy_files_to(local: Path, fs: pafs.FileSystem, dest: str, last: tuple[str, ...] = (), target: str = "") -> None:
    """Copy a local folder's files (subfolders' too) into dest on fs, one file at a time, each with the storage
    settings' retries; the files named in last go at the end, in that order."""
    remote = not isinstance(fs, pafs.LocalFileSystem)
    target = target or dest
    local = Path(local).resolve()
    names = sorted(f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file())
    names = [n for n in names if n not in last] + [n for n in last if n in names]
    for folder in sorted({posixpath.dirname(n) for n in names} | {""}):
        where = posixpath.join(dest, folder) if folder else dest
        with_retries("creating", target, lambda where=where: fs.create_dir(where, recursive=True), remote=remote)
    for name in names:
        with_retries(
            "uploading",
            posixpath.join(target, name),
            lambda name=name: _upload_file(local / name, fs, posixpath.join(dest, name)),
            remote=remote,
        )


def _upload_file(local: Path, fs: pafs.FileSystem, dest: str) -> None:
    """One local file into dest on fs, whole or not at all. Not pyarrow's copy_files: when a part of its upload
    fails past the client's attempts it returns as if done, the object never completed (pyarrow 26, found with
    the fault layer: the checkpoint's state.pt missing, the rest of the folder uploaded). The file goes in as one
    write of its memory map, so nothing (an exception, an interrupt) can come between two writes and have the
    stream's close complete a cut-off object (apache/arrow#40502); close's own error is raised."""
    with open(local, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        data = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            with fs.open_output_stream(dest) as out:
                out.write(data)
        finally:
            if size:
                data.close()


def total_bytes(path: str | Path, suffix: str = "") -> int:
    return sum(info.size for info in _files(path, suffix))
