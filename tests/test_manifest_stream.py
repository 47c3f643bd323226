"""A large manifest cut into pieces read by reference: every entry in exactly one piece, in order, a clip's
consecutive entries never cut apart, CSV records with newlines inside quotes kept whole; the driver reads the file
in blocks and keeps 24 bytes a piece."""

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gram_ray.config import SourceFields
from gram_ray.data import manifest_stream
from gram_ray.data.manifest import read_annotations
from gram_ray.data.manifest_stream import cut_pieces, read_in_pieces, read_piece, scan_manifest

FIELDS = SourceFields(id="clip", video="video")


def _entries(n: int, per_clip: int = 1) -> list[dict]:
    return [{"clip": f"c{i // per_clip}", "video": f"c{i // per_clip}.mp4", "caption": f"take {i}"} for i in range(n)]


def _pieces(path, per_piece):
    scan = scan_manifest(str(path))
    pieces = cut_pieces(scan, FIELDS, per_piece)
    read = [read_piece(str(path), scan.kind, *map(int, p), scan.header) for p in pieces]
    return scan, pieces, read


@pytest.mark.parametrize("per_clip", [1, 3])
def test_every_jsonl_entry_is_in_one_piece_in_order_and_a_clips_lines_stay_together(tmp_path, per_clip):
    entries = _entries(100, per_clip)
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(json.dumps(e) + "\n" for e in entries[:50])
        + "\n"
        + "".join(json.dumps(e) + "\n" for e in entries[50:]).rstrip("\n")
    )  # fmt: skip  (a blank line, and no newline after the last entry)
    scan, pieces, read = _pieces(path, per_piece=7)
    assert scan.entries == 101 and pieces.dtype.name == "int64" and pieces.shape[1] == 3
    assert [e for piece in read for e, _ in piece] == entries
    for piece in read:  # a cut never falls inside a clip's run of lines
        assert len(piece) >= 6 or piece is read[-1]
    clips = [{e["clip"] for e, _ in piece} for piece in read]
    assert all(not (a & b) for a, b in zip(clips, clips[1:], strict=False))
    (e, where) = read[1][0]
    assert where == f"{path}:{entries.index(e) + 1}"  # where names the line, for an error message


def test_csv_records_with_newlines_inside_quotes_are_kept_whole(tmp_path):
    entries = _entries(40, per_clip=2)
    for e in entries[::5]:
        e["caption"] = 'a caption\nover two lines, with "quotes"'
    text = io.StringIO()
    writer = csv.DictWriter(text, ["clip", "video", "caption"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(entries)
    path = tmp_path / "m.csv"
    path.write_text(text.getvalue())
    scan, pieces, read = _pieces(path, per_piece=5)
    assert scan.header == "clip,video,caption\n" and len(pieces) > 4
    assert [e for piece in read for e, _ in piece] == entries


def test_parquet_is_cut_by_rows_and_read_by_its_row_groups(tmp_path):
    entries = _entries(50, per_clip=2)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(entries), path, row_group_size=8)
    scan, pieces, read = _pieces(path, per_piece=9)
    assert scan.entries == 50 and all((b - a) % 2 == 0 for a, b, _ in pieces.tolist())  # pairs never split
    assert [e for piece in read for e, _ in piece] == entries
    assert read[1][0][1] == f"{path}[{int(pieces[1][0])}]"


def test_the_digest_is_the_files_sha256_and_only_large_cuttable_manifests_are_read_in_pieces(tmp_path, monkeypatch):
    import hashlib

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in _entries(30)))
    monkeypatch.setattr(manifest_stream, "_BLOCK", 100)  # many blocks, lines cut across them
    scan, _, read = _pieces(path, per_piece=4)
    assert scan.digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [e for piece in read for e, _ in piece] == _entries(30)
    assert not read_in_pieces(str(path))  # 2 KB: read whole
    monkeypatch.setattr(manifest_stream, "STREAM_BYTES", 1000)
    assert read_in_pieces(str(path))
    (tmp_path / "m.json").write_text(json.dumps(_entries(300)))
    assert not read_in_pieces(str(tmp_path / "m.json"))  # one JSON document: read whole at any size


def test_pieces_make_the_same_rows_as_the_file_read_whole_when_a_clips_entries_sit_together(tmp_path):
    from gram_ray.data.manifest import rows_of_entries

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in _entries(60, per_clip=4)))
    whole = read_annotations(path, FIELDS)
    _, _, read = _pieces(path, per_piece=5)
    pieced = [r for piece in read for r in rows_of_entries(piece, FIELDS, None)[0]]
    assert [(r.id, r.captions) for r in pieced] == [(r.id, r.captions) for r in whole]
