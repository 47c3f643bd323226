"""How tensor columns are laid out in the Parquet cache: one fixed-size binary value per row.

In Arrow (Ray Data batches, training) frames and filterbanks are tensor columns (Ray's ArrowTensorType). Parquet
would store those as list<uint8> / list<float>, with a repetition and a definition level for every byte, and
reading them back runs at ~120 MB/s per core: slower per clip than the GPU consumes. Stored instead as one
fixed-size binary value per row, with the shape and dtype in the field's metadata, a page is a plain memcpy
(~20x faster here), and reading restores the same tensor columns without copying.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.extensions import ArrowTensorArray, ArrowTensorType, ArrowTensorTypeV2

from gram_ray import storage

__all__ = ["TENSOR_KEY", "to_parquet_layout", "from_parquet_layout", "numpy_rows", "read_cache"]

TENSOR_KEY = b"gram_ray.tensor"  # field metadata: {"shape": per-row shape, "dtype": numpy dtype name}


def _tensor_to_binary(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, dict]:
    rows = np.ascontiguousarray(column.combine_chunks().to_numpy())
    meta = {"shape": list(rows.shape[1:]), "dtype": rows.dtype.name}
    width = rows[0].nbytes if len(rows) else int(np.prod(meta["shape"])) * rows.itemsize
    buffer = pa.py_buffer(rows.reshape(-1).view(np.uint8))
    return pa.chunked_array([pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, buffer])]), meta


def _binary_to_tensor(chunk: pa.FixedSizeBinaryArray, meta: dict) -> pa.ExtensionArray:
    dtype, shape = np.dtype(meta["dtype"]), tuple(meta["shape"])
    width = chunk.type.byte_width
    values = np.frombuffer(chunk.buffers()[1], np.uint8, count=len(chunk) * width, offset=chunk.offset * width)
    return ArrowTensorArray.from_numpy(values.view(dtype).reshape((len(chunk), *shape)))


def to_parquet_layout(table: pa.Table) -> pa.Table:
    """Tensor columns -> fixed-size binary columns carrying their shape and dtype in the field metadata."""
    for i, field in enumerate(table.schema):
        if isinstance(field.type, (ArrowTensorType, ArrowTensorTypeV2)):
            column, meta = _tensor_to_binary(table.column(i))
            new_field = pa.field(field.name, column.type, nullable=False, metadata={TENSOR_KEY: json.dumps(meta)})
            table = table.set_column(i, new_field, column)
    return table


def from_parquet_layout(table: pa.Table) -> pa.Table:
    """The inverse of to_parquet_layout: binary columns marked with TENSOR_KEY back to tensor columns."""
    for i, field in enumerate(table.schema):
        if field.metadata and TENSOR_KEY in field.metadata:
            meta = json.loads(field.metadata[TENSOR_KEY])
            chunks = [_binary_to_tensor(c, meta) for c in table.column(i).chunks]
            column = (
                pa.chunked_array(chunks)
                if chunks
                else ArrowTensorArray.from_numpy(np.zeros((0, *meta["shape"]), meta["dtype"]))
            )
            table = table.set_column(i, field.name, column)
    return table


def numpy_rows(table: pa.Table) -> dict:
    """A table read straight from cache files (not through Ray Data) as the numpy batch Ray Data would give a UDF:
    tensor columns as arrays, lists as object arrays."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(from_parquet_layout(table)).to_batch_format("numpy")


# A read task a file plans a task on the driver for each: at VAST-27M's 130,435 files the driver peaked at 1,541 MB
# and took 180 s to the first batch, against 1,101 MB and 22 s with 4,096 tasks of several files each (`gram-ray
# bench scale`). A cache of fewer files keeps a task a file.
_MAX_READ_TASKS = 4096


def read_cache(
    shards: str,
    shuffle_seed: int | None = None,
    block_per_file: bool = False,
    with_files: bool = False,
    files: list[str] | None = None,
):
    """A Ray Dataset over a cache's Parquet shards, with its tensor columns restored. shuffle_seed: the files are
    read in a random order, a new one at every execution of the dataset (an epoch), derived from the seed: a
    shuffle that streams, for caches read from storage every epoch. block_per_file: one read task and one block
    a file (up to 4,096 tasks, several files each past that), for a cache streamed every epoch; its files are
    already sized for it (data.shard_mb), where Ray Data would cut a cache of fewer than 200 files into smaller
    blocks, each a task of its own every epoch (measured: 2 MB blocks of 8 clips kept 2 training workers waiting on
    ~1 s of task overhead a block, on 2 cores).
    with_files: each row carries the name of the file it was read from (epoch_progress.FILE), which a mid-epoch
    checkpoint records the epoch's progress by. files: read only these files of the cache (names), not all."""
    import ray.data
    from ray.data import DataContext
    from ray.data.datasource import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    # Ray 2.60's Parquet datasource v2 (ListFiles -> ReadFiles) is not held back by the streaming executor's
    # object-store budget: a cache four times the object store was read into it whole, and spilled to disk, every
    # epoch (418 MB spilled of a 418 MB cache, 100 MB store), even with a slow consumer. The v1 read streams
    # (peak 97 MB, nothing spilled). The flag is read when the read is planned, so it is set around this call only.
    context = DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        count = None
        if block_per_file:  # up to _MAX_READ_TASKS; past it, a read task takes several files
            count = len(files) if files is not None else len(storage.list_files(shards, ".parquet"))
            count = min(count, _MAX_READ_TASKS)
        # A URI's filesystem goes with the read: its read tasks then use the storage settings (retries, timeouts).
        fs, path = storage.resolve(shards) if storage.is_uri(shards) else (None, shards)
        paths = path if files is None else [posixpath.join(path, name) for name in files]
        ds = ray.data.read_parquet(
            paths, filesystem=fs, shuffle=shuffle, override_num_blocks=count or None, include_paths=with_files
        )
    finally:
        context.use_datasource_v2 = previous
    restore = _restored_with_files if with_files else from_parquet_layout
    return ds.map_batches(restore, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def _restored_with_files(table: pa.Table) -> pa.Table:
    """from_parquet_layout, with Ray Data's path column (include_paths) as each row's file name (FILE)."""
    from gram_ray.data.epoch_progress import FILE

    table = from_parquet_layout(table)
    names = pc.replace_substring_regex(table["path"], pattern=r"^.*/", replacement="")  # the file's name
    return table.drop_columns(["path"]).append_column(FILE, names)
