"""The filesystem Ray Train and Tune get for a run's storage (RunConfig): every operation of theirs with gram-ray's
retries, every small file they write stored in one upload."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.fs as pafs

from gram_ray.storage.files import put_whole
from gram_ray.storage.filesystems import SettledS3FileSystem, filesystem, is_uri
from gram_ray.storage.retries import with_retries

__all__ = [
    "run_storage",
    "unwrapped",
    "PatientHandler",
]


def run_storage(path: str | Path) -> dict:
    """Ray Train's and Tune's RunConfig arguments for a storage path: a URI goes with a filesystem that gives Ray's
    own reads and writes (the checkpoint registry Ray Train's controller rewrites at every checkpoint, Tune's
    state) the storage settings and gram-ray's retries. Without them, Ray Train's controller ends the run on the
    first write of its registry that fails past the client's attempts (found with the fault layer: a 12 s blip)."""
    if not is_uri(path):
        return {"storage_path": str(path)}
    fs, inside = filesystem(str(path))
    return {"storage_path": inside, "storage_filesystem": pafs.PyFileSystem(PatientHandler(fs))}


def unwrapped(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem under a run_storage() one (large uploads go to it directly: the wrapper buffers writes)."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, PatientHandler):
        return fs.handler.fs
    return fs


class PatientHandler(pafs.FileSystemHandler):
    """A filesystem whose every operation is tried again on transient errors until the storage settings'
    outage_s (with_retries), for code that is not gram-ray's (Ray Train, Tune). A file written through it is
    gathered in memory and stored in one upload when closed: Ray writes small files (JSON state) this way."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        # Writes go through a twin that uploads in the calling thread: Ray Tune syncs through pyarrow's copy_files,
        # which calls this handler from pyarrow's I/O threads, and an upload that waited there for a background
        # write on the same pool deadlocked (found by the shared-storage sweep test).
        self._writer = (
            SettledS3FileSystem(fs._options | {"background_writes": False}, fs.settings)
            if isinstance(fs, SettledS3FileSystem)
            else fs
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, PatientHandler) and self.fs.equals(other.fs)

    def __reduce__(self):
        return (PatientHandler, (self.fs,))

    def _try(self, action: str, path: str, operation):
        return with_retries(action, f"{self.fs.type_name}://{path}", operation, remote=True)

    def get_type_name(self) -> str:
        return f"patient-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._try("looking up", ",".join(paths), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._try("listing", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._try("creating", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._try("deleting", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._try("deleting", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._try("deleting", "/", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._try("deleting", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._try("moving", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._try("copying", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._try("reading", path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path):
        return self._try("reading", path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        return pa.PythonFile(
            _GatheredUpload(lambda data: self._try("writing", path, lambda: put_whole(self._writer, path, data)))
        )

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("object storage has no appends")


class _GatheredUpload(io.RawIOBase):
    """A writable file that stores what was written in one upload when closed."""

    def __init__(self, store) -> None:
        self._buffer, self._store = io.BytesIO(), store

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buffer.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._store(self._buffer.getbuffer())
            finally:
                super().close()
