"""Read an offline W&B run back through wandb's own record schema (`wandb.proto.wandb_internal_pb2.Record`).

A `.wandb` file is a header (":W&B", magic 0xBEE1, version) then wandb's records, protobuf-encoded, framed as
LevelDB log records (32 KiB blocks; each chunk: crc32 4 bytes, length 2, type 1 = full / 2 first / 3 middle /
4 last). Only the framing is spelled out here; what a record means comes from the schema wandb ships.
"""

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # checksum, length, type


def _payloads(data: bytes):
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"not a W&B run file (header {ident!r} {magic:#x} v{version})"
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:  # the rest of a block too small for a chunk header is padding
            pos += room
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 or pos + CHUNK.size + length > len(data):
            return  # zero padding, or a record still being written
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == 1:
            yield body
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            yield pending + body


def read_records(path: Path, timeout_s: float = 30.0) -> list:
    """Every record of a finished run, waiting (bounded) for wandb's writer to flush up to the exit record."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for payload in _payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(records) -> list[dict]:
    """The logged rows: {key: value} per history record."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows
