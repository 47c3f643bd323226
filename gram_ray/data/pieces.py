"""Work done in pieces that a rerun continues: each piece's output is written whole, then a small record of it
at <out>/_done/<piece>.json; a piece without a record is redone, and what a killed run left of it is replaced.
The cache writer (data/preprocess.py: a chunk of manifest rows or a packed shard a piece) and the search index
(retrieval/index.py: a cache file a piece) both work this way, through Ray Data tasks or actors that write their
pieces themselves, so only a count per piece reaches the driver.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Iterable

from gram_ray import storage

__all__ = ["DONE", "done_pieces", "drive", "read_records", "record_done"]

DONE = "_done"


def record_done(out: str, piece: str, record: dict) -> None:
    """Record a piece as done, after its output is whole."""
    storage.write_text(storage.join(out, DONE, piece + ".json"), json.dumps(record))


def done_pieces(out: str) -> set[str]:
    """The pieces recorded as done under out: one listing, no record read."""
    return {posixpath.basename(p).removesuffix(".json") for p in storage.list_files(storage.join(out, DONE), ".json")}


def read_records(out: str, prefix: str = "") -> dict[str, dict]:
    """{piece: its record} of the pieces recorded under out whose names start with prefix; a record cut off while
    being written is left out (its piece is redone)."""
    records = {}
    for path in storage.list_files(storage.join(out, DONE), ".json"):
        piece = posixpath.basename(path).removesuffix(".json")
        if not piece.startswith(prefix):
            continue
        try:
            records[piece] = json.loads(storage.read_text(path))
        except (OSError, json.JSONDecodeError):
            continue
    return records


def drive(rows: Iterable[dict], pieces: int, what: str, log, clips: int | None = None, every_s: float = 30.0) -> int:
    """Consume a pipeline's rows (one per piece, its "clips" count), saying how far it is every every_s seconds
    while pieces are left: pieces done of `pieces` (`what`: shards, cache files), clips, rate, and with `clips`
    (the clips to go) the time left. Returns the clips counted."""
    start = last = time.perf_counter()
    finished = counted = 0
    for row in rows:
        finished += 1
        counted += int(row["clips"])
        now = time.perf_counter()
        if now - last >= every_s and finished < pieces:
            rate = counted / (now - start)
            eta = f", about {(clips - counted) / rate:.0f} s left" if clips and rate > 0 else ""
            log(f"  {finished}/{pieces} {what}, {counted} clips, {rate:.1f} clips/s{eta}")
            last = now
    return counted
