"""A large manifest planned in pieces by reference: the driver reads the file twice in blocks (its digest and
entry count, then where to cut it) and holds none of its rows; each decode task reads its own piece (a byte range
of JSONL or CSV, a row range of Parquet) and makes its rows there (manifest.rows_of_entries).

Read this way: JSONL, CSV and Parquet manifests larger than STREAM_BYTES (VAST-27M's rows, WebVid's CSV: from
~100,000 entries). A JSON list is one document and is read whole, as are smaller manifests (every GRAM annotation
file): those merge the entries of a clip wherever they sit in the file, and key the cache by each media file's
size and time as well. Here the cache is keyed by the manifest's bytes, the media folders and the config: a media
file replaced in place under the same name is not noticed (`--force` decodes again); stat'ing or listing tens of
millions of media objects before the first clip is decoded is what this avoids. The entries of a clip are merged
within a piece, and a cut never falls between consecutive entries of the same id, so a clip whose captions are on
consecutive lines (or rows) is one clip; one whose entries are scattered over a file of millions gets a row per
piece it appears in (every such manifest we know holds one entry a clip). Media looked up by id in a bucket folder
are found by each piece's task with a request per extension tried (not a listing of the whole folder).

Measured by `gram-ray bench scale` (docs/performance.md): the driver's memory does not grow with the entries.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from gram_ray import storage
from gram_ray.config import SourceFields
from gram_ray.data.manifest import ID_FIELDS, ManifestError

__all__ = ["STREAM_BYTES", "ManifestScan", "scan_manifest", "cut_pieces", "read_piece", "read_in_pieces"]

STREAM_BYTES = 16 * 2**20  # a JSONL, CSV or Parquet manifest larger than this is planned in pieces
_BLOCK = 16 * 2**20  # bytes read at a time by the driver's two passes


def read_in_pieces(path: str) -> bool:
    """Whether a manifest is planned in pieces: a format that can be cut (JSONL, CSV, Parquet), larger than
    STREAM_BYTES."""
    if posixpath.splitext(str(path))[1].lower() not in (".jsonl", ".csv", ".parquet"):
        return False
    return storage.file_size(path) > STREAM_BYTES


def _kind(path: str) -> str:
    return posixpath.splitext(str(path))[1].lower().lstrip(".")


@dataclass
class ManifestScan:
    """The first pass over a manifest: what its pieces are cut from."""

    path: str
    kind: str  # jsonl, csv or parquet
    entries: int  # lines (JSONL, CSV; a record spread over lines counts each) or rows (Parquet)
    digest: object = field(repr=False)  # hashlib.sha256 of the file's bytes, to continue into the cache key
    header: str = ""  # CSV: the header line, read again by every piece
    data_start: int = 0  # CSV: the byte after the header


def scan_manifest(path: str) -> ManifestScan:
    """Pass 1, in blocks: the file's sha256 (the cache key starts from it, as for a manifest read whole) and how
    many entries it holds (the pieces' size depends on it)."""
    kind, digest = _kind(path), hashlib.sha256()
    lines, last, header, data_start = 0, b"\n", "", 0
    for block in storage.iter_blocks(path, _BLOCK):
        digest.update(block)
        if kind == "parquet":
            continue
        if not header and lines == 0:
            newline = block.find(b"\n")
            if kind == "csv" and newline >= 0:
                header, data_start = block[: newline + 1].decode(), newline + 1
        lines += block.count(b"\n")
        last = block[-1:] or last
    lines += last != b"\n"  # a last line without its newline
    if kind == "parquet":
        import pyarrow.parquet as pq

        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            lines = pq.ParquetFile(f).metadata.num_rows
    elif kind == "csv":
        lines -= 1  # the header
    return ManifestScan(str(path), kind, max(lines, 0), digest, header, data_start)


def _raw_id(entry, fields: SourceFields):
    """The entry's clip id as the manifest holds it (before a span suffix), or None."""
    if not isinstance(entry, dict):
        return None
    for name in (fields.id,) if fields.id else ID_FIELDS:
        if entry.get(name) not in (None, ""):
            return str(entry[name])
    return None


def _lines(blocks, start: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) of the lines of consecutive blocks starting at byte `start`."""
    offset, carry = start, b""
    for block in blocks:
        parts = (carry + block).split(b"\n")
        carry = parts.pop()
        for part in parts:
            yield offset, part + b"\n"
            offset += len(part) + 1
    if carry:
        yield offset, carry


def _records(kind: str, lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, int, bytes]]:
    """(start byte, end byte, record) of each record: a JSONL line, or a CSV record (a quoted field may hold
    newlines: a record ends where its quotes balance; a quote inside a field is doubled, which keeps the balance)."""
    pending: list[bytes] = []
    begin, quotes = 0, 0
    for offset, line in lines:
        if not pending:
            begin = offset
        pending.append(line)
        if kind == "csv":
            quotes += line.count(b'"')
            if quotes % 2:
                continue
            quotes = 0
        record = b"".join(pending)
        yield begin, begin + len(record), record
        pending = []
    if pending:
        record = b"".join(pending)
        yield begin, begin + len(record), record


def _parse(scan: ManifestScan, record: bytes):
    text = record.decode()
    if scan.kind == "jsonl":
        return json.loads(text) if text.strip() else None
    row = next(csv.DictReader(io.StringIO(scan.header + text, newline="")), None)
    return {k: v for k, v in row.items() if v not in (None, "")} if row else None


def _entry_id(scan: ManifestScan, record: bytes, fields: SourceFields):
    try:
        return _raw_id(_parse(scan, record), fields)
    except (ValueError, UnicodeDecodeError):
        return None  # an unreadable entry: its piece reports it


def cut_pieces(scan: ManifestScan, fields: SourceFields, per_piece: int) -> np.ndarray:
    """Pass 2: the pieces, [N, 3] int64 rows of (start, end, first line) (text: bytes, and the first entry's line
    number; Parquet: rows [start, end), 0). About per_piece entries each, never cut between consecutive entries of
    one id (only the entries around a cut are parsed); 24 bytes a piece is what the driver holds."""
    if scan.kind == "parquet":
        return _cut_parquet(scan, fields, per_piece)
    out: list[tuple[int, int, int]] = []
    start = first_line = None
    count, line_no, last_id, stop = 0, 1 + (scan.kind == "csv"), None, scan.data_start
    lines = _lines(storage.iter_blocks(scan.path, _BLOCK, start=scan.data_start), scan.data_start)
    for begin, end, record in _records(scan.kind, lines):
        if start is not None and count >= per_piece:  # a cut is due, where the id changes
            current = _entry_id(scan, record, fields)
            if current is None or current != last_id:
                out.append((start, begin, first_line))
                start, count = None, 0
        if start is None:
            start, first_line = begin, line_no
        count += 1
        if count == per_piece:  # the id a cut must not fall inside
            last_id = _entry_id(scan, record, fields)
        line_no += record.count(b"\n")
        stop = end
    if start is not None:
        out.append((start, stop, first_line))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _cut_parquet(scan: ManifestScan, fields: SourceFields, per_piece: int) -> np.ndarray:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(scan.path)
    with fs.open_input_file(p) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        id_field = next((n for n in ((fields.id,) if fields.id else ID_FIELDS) if n in names), None)
        if id_field is None:  # every row will say so; the pieces are cut by count
            bounds = list(range(0, scan.entries, per_piece)) + [scan.entries]
            return np.asarray([(a, b, 0) for a, b in zip(bounds, bounds[1:], strict=False)], np.int64).reshape(-1, 3)
        out, start, row, previous = [], 0, 0, None
        for batch in parquet.iter_batches(columns=[id_field], batch_size=65_536):
            for value in batch.column(0).to_pylist():
                current = None if value is None else str(value)
                if row - start >= per_piece and current != previous:
                    out.append((start, row, 0))
                    start = row
                previous, row = current, row + 1
        if row > start:
            out.append((start, row, 0))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def read_piece(path: str, kind: str, start: int, end: int, line: int, header: str = "") -> list[tuple[dict, str]]:
    """In a decode task: a piece's entries, each with where it is in the manifest (name:line, or name[row])."""
    name = str(path)
    if kind == "parquet":
        return _parquet_rows(name, start, end)
    scan = ManifestScan(name, kind, 0, None, header)
    out, line_no = [], line
    for _, _, record in _records(kind, _lines([storage.read_range(path, start, end - start)], start)):
        try:
            entry = _parse(scan, record)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{name}:{line_no}: not valid {kind.upper()} ({e})") from None
        if entry is not None:
            out.append((entry, f"{name}:{line_no}"))
        line_no += record.count(b"\n")
    return out


def _parquet_rows(name: str, start: int, end: int) -> list[tuple[dict, str]]:
    """Rows [start, end) of a Parquet manifest: only the row groups that hold them are read."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(name)
    with fs.open_input_file(p) as f:
        parquet = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(g).num_rows
            if offset < end and offset + rows > start:
                groups.append(g)
                first = offset if first is None else first
            offset += rows
        table = parquet.read_row_groups(groups).slice(start - (first or 0), end - start)
    return [(r, f"{name}[{start + i}]") for i, r in enumerate(table.to_pylist())]
