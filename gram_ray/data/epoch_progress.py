"""Which clips of an epoch have been trained on, in a size bounded by the cache's files, not its clips.

A mid-epoch checkpoint records it, and the resumed run trains on the rest of the epoch: every clip not yet trained
on, once. Each row of a Parquet cache read for training carries the file it was read from (FILE, by
`read_cache(with_files=True)`), and the cache's report says how many rows each file holds (`file_rows`). A file
all of whose rows were trained on is one bit; only the files in progress keep the ids trained on so far. At
VAST-27M's size (27 M clips in ~10,000 files of a few thousand clips) half an epoch is then ~1 KB of bits and the
ids of the few files the workers were reading, where a list of ids was 13.5 M entries.

Rows read without a file (a split decoded on the fly, a cache written before its report held file_rows, or rows
held in memory by tests) are kept by id under the file "": correct, and as large as before, which such splits
are (decode-on-the-fly is for small sets; the older caches resume as they always did).

Imports only pyarrow and the standard library: the rest-of-epoch filter runs in Ray Data tasks, which a restarted
worker group starts cold (see clip_ids.py).
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from gram_ray.data.clip_ids import without_ids

__all__ = ["FILE", "EpochProgress", "rest_of_epoch_filter", "file_names"]

FILE = "_file"  # the cache file a training row was read from: its name (shard-00012.parquet)
_NO_FILE = ""


def file_names(paths: Iterable[str]) -> list[str]:
    """The FILE values of rows read from these paths (local paths or bucket keys)."""
    return [posixpath.basename(str(p)) for p in paths]


@dataclass
class EpochProgress:
    """The clips of one epoch trained on so far, across every rank (rank 0 keeps it; add() folds each rank's clips
    in). file_rows: {file name: rows} of the cache, or None when the rows come without files."""

    file_rows: dict[str, int] | None = None
    done: set[str] = field(default_factory=set)  # files every row of which was trained on
    partial: dict[str, set[str]] = field(default_factory=dict)  # file -> the ids of it trained on so far
    repeats: int = 0  # clips trained on more than once in the epoch (a check: 0 in a correct run)

    def add(self, files: Iterable[str], ids: Iterable[str]) -> None:
        """Clips trained on: each row's file (FILE) and id."""
        for name, clip in zip(files, ids, strict=True):
            name = self._file(name)
            if name in self.done:
                self.repeats += 1
                continue
            seen = self.partial.setdefault(name, set())
            if clip in seen:
                self.repeats += 1
                continue
            seen.add(clip)
            if name != _NO_FILE and len(seen) == self.file_rows[name]:
                self.done.add(name)
                del self.partial[name]

    @property
    def trained(self) -> int:
        """Distinct clips trained on."""
        rows = self.file_rows or {}
        return sum(rows[name] for name in self.done) + sum(len(ids) for ids in self.partial.values())

    def copy(self) -> EpochProgress:
        return EpochProgress(
            self.file_rows, set(self.done), {name: set(ids) for name, ids in self.partial.items()}, self.repeats
        )

    def __bool__(self) -> bool:
        return bool(self.done or self.partial)

    def ids(self) -> list[str]:
        """The ids of the files in progress (and of rows without a file), for a filter."""
        return sorted(i for ids in self.partial.values() for i in ids)

    def contains(self, files: Iterable[str], ids: Iterable[str]) -> list[bool]:
        """For each row (its file and id): already trained on in this epoch."""
        return [
            name in self.done or clip in self.partial.get(self._file(name), ())
            for name, clip in zip(files, ids, strict=True)
        ]

    def _file(self, name: str) -> str:
        """A row's file as the progress keeps it: a file of the cache, or "" (by id) for any other."""
        return name if self.file_rows is not None and name in self.file_rows else _NO_FILE

    # ---- as a checkpoint records it (JSON) ----

    def to_json(self) -> dict:
        """{"files": how many, "done": the files trained on whole as bits over the sorted file names (base64),
        "ids": {file: sorted ids} of the files in progress only, "trained" and "repeats": the counts, for people}."""
        names = sorted(self.file_rows or {})
        bits = bytearray((len(names) + 7) // 8)
        for i, name in enumerate(names):
            if name in self.done:
                bits[i // 8] |= 1 << (i % 8)
        return {
            "files": len(names),
            "done": base64.b64encode(bytes(bits)).decode(),
            "ids": {name: sorted(ids) for name, ids in sorted(self.partial.items())},
            "trained": self.trained,
            "repeats": self.repeats,
        }

    @classmethod
    def from_json(cls, state: dict | None, file_rows: dict[str, int] | None) -> EpochProgress:
        """The progress a checkpoint recorded, over the cache's files (file_rows, as the run reads them now)."""
        progress = cls(file_rows)
        if not state:
            return progress
        names = sorted(file_rows or {})
        if state.get("files", 0) != len(names):
            raise ValueError(
                f"the checkpoint's epoch position is over {state.get('files', 0)} cache files, this run's train "
                f"cache has {len(names)}: it was decoded again since (another config or inputs); resume from an "
                "epoch's end, or with the cache the checkpoint was taken with"
            )
        bits = base64.b64decode(state["done"])
        progress.done = {name for i, name in enumerate(names) if bits[i // 8] >> (i % 8) & 1}
        progress.partial = {name: set(ids) for name, ids in state["ids"].items()}
        progress.repeats = state.get("repeats", 0)
        return progress

    @classmethod
    def of_ids(cls, ids: Iterable[str], file_rows: dict[str, int] | None = None) -> EpochProgress:
        """The progress of a checkpoint written before files were recorded: the ids it lists, without files."""
        progress = cls(file_rows)
        ids = set(ids)
        if ids:
            progress.partial[_NO_FILE] = ids
        return progress


def rest_of_epoch_filter(batch: pa.Table, done: pa.Array, ids: pa.Array) -> pa.Table:
    """The batch's rows not yet trained on: neither from a file done whole (done, by FILE) nor among `ids`."""
    if len(done) and FILE in batch.column_names:
        batch = batch.filter(pc.invert(pc.is_in(batch[FILE], value_set=done)))
    return without_ids(batch, ids) if len(ids) else batch
