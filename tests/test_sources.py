"""The data as users hold it: GRAM's annotations with media folders, manifests (JSON, JSONL, CSV, Parquet) with
field mappings and spans of long videos, video2dataset's WebDataset tars and Parquet files, in a bucket of the
local S3 server. Every shape of the same clips gives the same cache rows; bad shards and rows are skipped with
their reasons counted, and the rest of the set goes on."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packed_data import tar_bytes, v2d_sample, wav_to_m4a, write_long_video
from tiny import cached_fbank

from gram_ray import storage
from gram_ray.config import DataConfig, SourceConfig, SourceFields
from gram_ray.data.errors import DecodeError
from gram_ray.data.manifest import ManifestError, read_annotations
from gram_ray.data.packed import ShardError, expand_braces, parquet_clips, shard_uris, tar_clips

CAPTIONS = 20  # video2dataset's MSR-VTT recipe: caption_0 ... caption_19


# ---- manifests ------------------------------------------------------------------------------------------------


def test_manifest_fields_in_every_format(tmp_path):
    """One clip list written as JSON, JSONL, CSV and Parquet reads the same; captions from a list field, from
    caption_* fields in numeric order (caption_10 after caption_9), or from one field."""
    entries = [
        {"clip": "a", "file": "a.mp4", **{f"caption_{i}": f"a{i}" for i in range(12)}, "start": 1.5, "end": 4},
        {"clip": "b", "file": "b.mp4", "caption_0": "b0", "start": "0", "end": "2.5"},
    ]
    fields = SourceFields(id="clip", video="file", captions=["caption_*"], start="start", end="end")
    (tmp_path / "m.json").write_text(json.dumps(entries))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    pq.write_table(pa.Table.from_pylist([{k: str(v) for k, v in e.items()} for e in entries]), tmp_path / "m.parquet")
    keys = sorted({k for e in entries for k in e})
    (tmp_path / "m.csv").write_text(
        ",".join(keys) + "\n" + "".join(",".join(str(e.get(k, "")) for k in keys) + "\n" for e in entries)
    )
    for name in ("m.json", "m.jsonl", "m.parquet", "m.csv"):
        rows = read_annotations(tmp_path / name, fields)
        got = [(r.id, r.captions, r.video_ref, r.start, r.end) for r in rows]
        assert got == [
            ("a", [f"a{i}" for i in range(12)], "a.mp4", 1.5, 4.0),
            ("b", ["b0"], "b.mp4", 0.0, 2.5),
        ], name
    vast = tmp_path / "vast.json"
    vast.write_text(json.dumps([{"clip_id": "v", "vision_cap": ["x", "y"], "vast_cap": ["z"], "subtitle": "s"}]))
    (row,) = read_annotations(vast, SourceFields(captions=["vision_cap"]))
    assert (row.id, row.captions, row.subtitle) == ("v", ["x", "y"], "s")
    (row,) = read_annotations(vast)  # GRAM's own reading of VAST-27M: vast_cap
    assert row.captions == ["z"]


def test_one_video_gives_a_clip_per_span(tmp_path):
    path = tmp_path / "howto.jsonl"
    rows = [("v1", 0, 5, "open"), ("v1", 5, 9, "pour"), ("v1", 0, 5, "opening"), ("v2", 3, 4, "cut")]
    path.write_text(
        "".join(json.dumps({"video_id": v, "start": s, "end": e, "caption": c}) + "\n" for v, s, e, c in rows)
    )
    got = read_annotations(path, SourceFields(start="start", end="end"))
    assert [(r.id, r.media_id, r.captions, r.start, r.end) for r in got] == [
        ("v1_0-5", "v1", ["open", "opening"], 0, 5),  # the same span's captions merged
        ("v1_5-9", "v1", ["pour"], 5, 9),
        ("v2", "v2", ["cut"], 3, 4),  # one span of its video: the id as written
    ]


def test_unusable_manifest_rows_are_kept_with_their_reason_or_stop_the_read_when_most_are(tmp_path):
    path = tmp_path / "m.jsonl"
    good = [{"video_id": f"g{i}", "caption": "x"} for i in range(18)]
    bad = [{"video_id": "nocap", "text": "x"}, {"caption": "no id"}]
    path.write_text("".join(json.dumps(e) + "\n" for e in good + bad))
    rows = read_annotations(path, max_invalid_share=0.2)
    errors = {r.id: r.error for r in rows if r.error}
    assert len(rows) == 20 and set(errors) == {"nocap", f"{path}:20"}
    assert "no caption field" in errors["nocap"] and "no id field" in errors[f"{path}:20"]
    with pytest.raises(ManifestError, match=r"2 of 20 entries cannot be used: check data.source.fields"):
        read_annotations(path, max_invalid_share=0.05)
    with pytest.raises(ManifestError, match="has no caption field"):
        read_annotations(path, SourceFields(captions=["vision_cap"]))  # a wrong field name: every row


def test_span_fields_come_in_pairs():
    with pytest.raises(ValueError, match="start and end together"):
        SourceConfig(fields=SourceFields(start="s"))


# ---- spans ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_long_video(path)  # 12 s, 10 fps, a keyframe every 2 s, B-frames, an AAC track
    return path


def _direct_span_frames(path: Path, span, num_frames: int, size: int) -> np.ndarray:
    """The reference: decode every frame of the video, keep those shown inside the span, take the middle of each
    of N equal segments, resize and crop as the cache does."""
    import av

    from gram_ray.data.video import _crop, _scaled, segment_indices

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = _scaled(stream.codec_context.width, stream.codec_context.height, size)
        inside = [
            f.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR")
            for f in container.decode(stream)
            if span[0] <= float(f.pts * stream.time_base) < span[1]
        ]
    return _crop(np.stack([inside[i] for i in segment_indices(len(inside), num_frames, "eval")]), size)


SPANS = [(0.0, 3.0), (2.35, 6.8), (7.9, 12.0)]  # from the start, between keyframes, to the end


def test_span_frames_equal_decoding_the_span_directly(long_video):
    from gram_ray.data.video import decode_video

    for span in SPANS:
        want = _direct_span_frames(long_video, span, 4, 32)
        assert np.array_equal(decode_video(str(long_video), 4, 32, "eval", span=span), want), span
        got = decode_video(long_video.read_bytes(), 4, 32, "eval", span=span)  # from bytes (a tar member)
        assert np.array_equal(got, want), span
        decord = decode_video(str(long_video), 4, 32, "eval", span=span, decoder="decord")  # its own scaler
        assert np.abs(decord.astype(int) - want).mean() < 6, span
    with pytest.raises(DecodeError, match=r"span 20-25 s starts past the video's end \(12.00 s\)"):
        decode_video(str(long_video), 4, 32, "eval", span=(20.0, 25.0))
    with pytest.raises(DecodeError, match="ends past the video's end"):
        decode_video(str(long_video), 4, 32, "eval", span=(10.0, 20.0))


def test_span_audio_is_the_span_of_the_track(long_video):
    from gram_ray.data.audio import load_waveform

    whole = load_waveform(str(long_video), 16000)
    for start, end in SPANS:
        cut = load_waveform(str(long_video), 16000, (start, end))
        assert abs(cut.size - (end - start) * 16000) <= 1024  # an AAC frame at most short at the very end
        same = whole[round(start * 16000) : round(start * 16000) + cut.size]
        # After a seek, AAC's decoder rebuilds its overlap over two frames (2,048 samples); then it is exact.
        assert np.array_equal(cut[2048:], same[2048:]) and np.abs(cut[:2048] - same[:2048]).mean() < 0.1


# ---- WebDataset shards ----------------------------------------------------------------------------------------


def test_brace_patterns():
    assert expand_braces("s3://b/{00000..00002}.tar") == [f"s3://b/0000{i}.tar" for i in range(3)]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    # Nested alternatives, and a range padded to its widest end, as webdataset and bash expand them.
    assert expand_braces("{a,{b,c}}.tar") == ["a.tar", "b.tar", "c.tar"]
    assert expand_braces("{1..010}.tar") == [f"{i:03d}.tar" for i in range(1, 11)]
    assert expand_braces("s3://b/{000..001}-{x,y}.tar") == ["s3://b/000-x.tar", "s3://b/000-y.tar", "s3://b/001-x.tar",
                                                             "s3://b/001-y.tar"]  # fmt: skip
    with pytest.raises(ManifestError, match="runs backwards"):
        expand_braces("{3..1}.tar")


def test_shard_listing_leaves_out_sidecars_and_names_what_is_missing(tmp_path):
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar"):
        (tmp_path / name).write_bytes(b"x")
    assert [Path(u).name for u in shard_uris(str(tmp_path), "webdataset")] == ["00000.tar", "00001.tar"]
    assert [Path(u).name for u in shard_uris(str(tmp_path), "parquet")] == ["00000.parquet"]
    with pytest.raises(ManifestError, match=r"shard .*00002.tar does not exist \(from the pattern"):
        shard_uris(str(tmp_path / "{00000..00002}.tar"), "webdataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no .tar"):
        shard_uris(str(tmp_path / "empty"), "webdataset")


def test_tar_samples_and_their_reasons(tmp_path):
    video = b"\x00" * 100  # not decoded here
    members = (
        v2d_sample("000000000", video, ["a0", "a1"], audio=b"m4a", videoid="clipA")
        + v2d_sample("000000001", None, ["b"], status="failed_to_download", error_message="HTTP 404")
        + [("000000002.mp4", video), ("000000002.txt", b"only a txt")]  # no json: the txt is the caption
        + [("000000003.5.mp4", video)]  # a dot inside the key
        + [("000000004.mp4", b"\x01" * 3 * 2**20), ("000000004.txt", b"big")]
        + [("000000005.jpg", b"thumbnail")]  # an extension nobody asked for: ignored
        + [("000000006.mp4", video), ("000000007.mp4", video), ("000000006.txt", b"late"), ("000000006.json", b"{}")]
    )
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    source = SourceConfig(kind="webdataset", max_member_mb=2)
    clips = list(tar_clips(str(tmp_path / "s.tar"), source))
    assert [c.id for c in clips] == [*(f"00000000{i}" for i in range(3)), "000000003.5", "000000004"] + [
        "000000006",  # its mp4 alone (its txt and json come later): no caption
        "000000007",
        "000000006",  # met again after 000000007: counted once, its members not used
    ]
    a, failed, txt, dotted, big, alone, _, again = clips
    assert alone.error.startswith("no caption") and again.error.startswith("members not adjacent: key '000000006'")
    assert (a.captions, a.video, a.audio, a.error) == (["a0"], video, b"m4a", None)  # its json's caption
    assert failed.error == "download status failed_to_download: HTTP 404"
    assert (txt.captions, txt.audio, txt.error) == (["only a txt"], None, None)
    assert dotted.error.startswith("a key with a dot: member '000000003.5.mp4' of s.tar")
    assert "more than data.source.max_member_mb (2): not read" in big.error
    source.fields.id, source.fields.captions = "videoid", ["caption_*"]  # the json's own id; caption_0, caption_1
    first = next(tar_clips(str(tmp_path / "s.tar"), source))
    assert (first.id, first.captions) == ("clipA", ["a0", "a1"])


def test_a_file_that_is_not_a_tar_and_a_tar_cut_mid_member(tmp_path):
    source = SourceConfig(kind="webdataset")
    (tmp_path / "junk.tar").write_bytes(b"<html>Access Denied</html>" * 40)
    with pytest.raises(ShardError, match="not a tar file: junk.tar"):
        list(tar_clips(str(tmp_path / "junk.tar"), source))
    whole = tar_bytes(v2d_sample("k0", b"v" * 3000, ["x"]) + v2d_sample("k1", b"w" * 3000, ["y"]))
    k1 = whole.index(b"k1.mp4")  # its header
    cuts = {  # where: (cut at, error, the samples kept)
        "inside k1.mp4's bytes": (
            whole.index(b"w" * 3000) + 1500,
            r"cut off inside a member: cut.tar \(in k1.mp4.*before it are kept",
            ["k0"],
        ),
        # tarfile reads a cut header as the archive's end; the missing end-of-archive blocks tell it was cut, and
        # the sample being read (here k0, which might have had more members) is not used
        "inside k1.mp4's header": (
            k1 + 100,
            "cut off before its end: cut.tar ends after member k0.json without the end-of-archive",
            [],
        ),
        "after k1's last member": (whole.index(b"w" * 3000) + 3072 + 2 * 1024, "ends after member k1.json", ["k0"]),
    }
    for where, (at, message, kept) in cuts.items():
        (tmp_path / "cut.tar").write_bytes(whole[:at])
        got = []
        with pytest.raises(ShardError, match=message):
            for clip in tar_clips(str(tmp_path / "cut.tar"), source):
                got.append(clip.id)
        assert got == kept, where
    (tmp_path / "whole.tar").write_bytes(whole)
    assert [c.id for c in tar_clips(str(tmp_path / "whole.tar"), source)] == ["k0", "k1"]


# ---- every shape of the same clips gives the same cache -----------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(s3, synth_small, tmp_path_factory):
    """The val clips of the synthetic set with 20 captions each and m4a audio, plus a clip whose download failed
    and a clip without audio, as (1) GRAM JSON + media folders, (2) video2dataset tars with sidecars, (3) a JSONL
    manifest and (4) video2dataset Parquet: all but (1) in a bucket of the local S3 server."""
    root = tmp_path_factory.mktemp("shapes")
    val = json.loads(Path(synth_small["val"]).read_text())
    ids = [e["video_id"] for e in val]
    text = {e["video_id"]: e.get("desc", e.get("caption")) for e in val}
    caption = {i: t if isinstance(t, str) else t[0] for i, t in text.items()}
    captions = {i: [f"{caption[i]} (take {k})" for k in range(CAPTIONS)] for i in ids}
    videos, audios = Path(synth_small["videos"]), root / "audios"
    audios.mkdir()
    for i in ids:
        wav_to_m4a(Path(synth_small["audios"]) / f"{i}.wav", audios / f"{i}.m4a")
    mute = json.loads(Path(synth_small["train"]).read_text())[0]["video_id"]  # its mp4 has no audio track
    failed = "never-downloaded"
    every = [*ids, mute, failed]
    captions[mute], captions[failed] = ["a clip without sound"], ["a download that failed"]

    gram = root / "gram.json"
    gram.write_text(json.dumps([{"video_id": i, "caption": captions[i]} for i in every]))

    bucket = s3.bucket()
    storage.upload_dir(videos, f"{bucket}/media/videos")
    storage.upload_dir(audios, f"{bucket}/media/audios")
    manifest = [{"clip": i, "video": f"{i}.mp4", "audio": f"{i}.m4a"} for i in ids]
    manifest += [{"clip": mute, "video": f"{mute}.mp4"}, {"clip": failed}]
    for entry in manifest:
        entry |= {f"caption_{k}": c for k, c in enumerate(captions[entry["clip"]])}
    storage.write_text(f"{bucket}/manifest.jsonl", "".join(json.dumps(e) + "\n" for e in manifest))
    # The same manifest as CSV, a caption a line (a clip's captions on consecutive lines, merged into one clip), and
    # as Parquet in row groups of 3: both read in pieces by the decode tasks when large (here: forced).
    lines = [
        {"clip": e["clip"], "video": e.get("video", ""), "audio": e.get("audio", ""), "caption": c}
        for e in manifest
        for c in captions[e["clip"]]
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, ["clip", "video", "audio", "caption"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    storage.write_text(f"{bucket}/manifest.csv", text.getvalue())
    table = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(manifest), table, row_group_size=3)
    storage.write_bytes_with(f"{bucket}/manifest.parquet", lambda f: f.write(table.getvalue()))

    def media(i, kind):
        path = (videos / f"{i}.mp4") if kind == "mp4" else (audios / f"{i}.m4a")
        return path.read_bytes() if path.exists() else None

    samples = [
        v2d_sample(f"{n:09d}", media(i, "mp4"), captions[i], audio=media(i, "m4a"), videoid=i)
        for n, i in enumerate([*ids, mute])
    ]
    samples.append(
        v2d_sample(f"{len(samples):09d}", None, captions[failed], videoid=failed, status="failed_to_download")
    )
    half = len(samples) // 2
    for n, part in enumerate((samples[:half], samples[half:])):
        storage.write_bytes_with(f"{bucket}/v2d/{n:05d}.tar", lambda f, p=part: f.write(tar_bytes(sum(p, []))))
        storage.write_text(f"{bucket}/v2d/{n:05d}_stats.json", json.dumps({"count": len(part)}))
        storage.write_text(f"{bucket}/v2d/{n:05d}.parquet", "video2dataset's sidecar, not a shard")

    rows = []
    for n, i in enumerate(every):
        rows.append(
            {"key": f"{n:09d}", "videoid": i, "status": "success" if i != failed else "failed_to_download"}
            | {"caption": captions[i][0], "mp4": media(i, "mp4"), "m4a": media(i, "m4a")}
            | {f"caption_{k}": c for k, c in enumerate(captions[i])}
        )
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=4)
    storage.write_bytes_with(f"{bucket}/v2d-parquet/00000.parquet", lambda f: f.write(buffer.getvalue()))
    return {
        "gram": (str(gram), str(videos), str(audios)),
        "webdataset": f"{bucket}/v2d/{{00000..00001}}.tar",
        "webdataset-folder": f"{bucket}/v2d",
        "manifest": (f"{bucket}/manifest.jsonl", f"{bucket}/media/videos", f"{bucket}/media/audios"),
        "manifest-csv": f"{bucket}/manifest.csv",
        "manifest-parquet": f"{bucket}/manifest.parquet",
        "parquet": f"{bucket}/v2d-parquet",
        "bucket": bucket,
        "ids": ids,
        "mute": mute,
        "failed": failed,
        "captions": captions,
    }


def _small(kind: str = "manifest", **fields) -> DataConfig:
    data = DataConfig(max_failure_share=0.5)
    data.video.num_frames, data.video.size, data.video.train_draws = 4, 32, 2
    data.audio.window_frames = 64
    data.source = SourceConfig(kind=kind, fields=SourceFields(**fields) if fields else SourceFields())
    return data


def _rows(cache: str) -> dict:
    from gram_ray.data.parquet_layout import read_cache

    return {r["id"]: r for r in read_cache(storage.join(cache, "shards")).take_all()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        list(a[k]) == list(b[k]) if k in ("captions", "frames_jpeg") else np.array_equal(a[k], b[k]) for k in a
    )


@pytest.mark.ray
def test_every_shape_of_the_same_clips_gives_the_same_cache(shapes, ray_session, tmp_path, monkeypatch):
    """Each shape gives the same rows; the manifests also read in pieces by the decode tasks, as a large one is
    (JSONL, CSV with a caption a line, Parquet in row groups of 3), with pieces of a few entries."""
    from gram_ray.data import manifest_stream
    from gram_ray.data.preprocess import preprocess

    bucket, reports, caches = shapes["bucket"], {}, {}

    def in_pieces(path: str, **fields):
        def run(out):
            with monkeypatch.context() as patch:
                patch.setattr(manifest_stream, "STREAM_BYTES", 0)  # every manifest is large enough
                data = _small(**fields)
                return preprocess(path, shapes["manifest"][1], out, data, audio_dir=shapes["manifest"][2], mode="train")

        return run

    fields = {"id": "clip", "video": "video", "audio": "audio"}
    runs = {
        "gram": lambda out: preprocess(*shapes["gram"][:2], out, _small(), audio_dir=shapes["gram"][2], mode="train"),
        "webdataset": lambda out: preprocess(
            shapes["webdataset"], None, out, _small("webdataset", id="videoid", captions=["caption_*"]), mode="train"
        ),
        "manifest": lambda out: preprocess(
            shapes["manifest"][0],
            shapes["manifest"][1],
            out,
            _small(id="clip", video="video", audio="audio", captions=["caption_*"]),
            audio_dir=shapes["manifest"][2],
            mode="train",
        ),
        "parquet": lambda out: preprocess(
            shapes["parquet"], None, out, _small("parquet", id="videoid", captions=["caption_*"]), mode="train"
        ),
        "manifest-jsonl-in-pieces": in_pieces(shapes["manifest"][0], **fields, captions=["caption_*"]),
        "manifest-csv-in-pieces": in_pieces(shapes["manifest-csv"], **fields, captions=["caption"]),
        "manifest-parquet-in-pieces": in_pieces(shapes["manifest-parquet"], **fields, captions=["caption_*"]),
    }
    for shape, run in runs.items():
        caches[shape] = f"{bucket}/cache/{shape}"
        reports[shape] = run(caches[shape])
    want = _rows(caches["gram"])
    assert sorted(want) == sorted(shapes["ids"])  # the mute clip and the failed download are not in it
    for row in want.values():
        assert list(row["captions"]) == shapes["captions"][row["id"]] and row["has_audio"]
    for shape in (s for s in runs if s != "gram"):
        got = _rows(caches[shape])
        assert sorted(got) == sorted(want), shape
        assert all(_same(got[i], want[i]) for i in want), shape  # the same JPEG bytes and filterbanks
    for shape, report in reports.items():
        assert report["rows_total"] == len(shapes["ids"]) + 2 and report["rows_written"] == len(shapes["ids"]), shape
        reasons = {s["id"]: s["reason"] for s in report["rows_skipped"]}
        assert set(reasons) == {shapes["mute"], shapes["failed"]}, shape
        assert reasons[shapes["mute"]].startswith("no readable audio track"), shape
        assert sum(report["skipped_by_reason"].values()) == 2, shape
    for shape in (s for s in runs if s.endswith("in-pieces")):  # pieces of a few entries: a clip never cut in two
        assert reports[shape]["shards"] >= 4, (shape, reports[shape]["shards"])
    assert "download status failed_to_download" in reports["webdataset"]["skipped_by_reason"]
    assert "video file not found" in reports["gram"]["skipped_by_reason"]
    again = preprocess(
        shapes["webdataset-folder"],
        None,
        caches["webdataset"],
        _small("webdataset", id="videoid", captions=["caption_*"]),
        mode="train",
    )
    assert again["reused"]  # the folder (sidecars left out) names the same shards as the pattern


@pytest.mark.ray
def test_spans_of_a_long_video_in_the_bucket(s3, long_video, ray_session):
    """3 clips cut from one long video by a manifest in the bucket: the cache holds each span's frames, as
    decoding the span directly gives them, and its audio; a span past the video's end is skipped, counted."""
    from gram_ray.data.audio import fbank_windows, load_waveform
    from gram_ray.data.preprocess import preprocess

    bucket = s3.bucket()
    storage.write_bytes_with(f"{bucket}/videos/yt123.mp4", lambda f: f.write(long_video.read_bytes()))
    spans = [*SPANS, (30.0, 40.0)]
    storage.write_text(
        f"{bucket}/howto.csv",
        "video_id,start,end,text\n" + "".join(f"yt123,{s},{e},step {n}\n" for n, (s, e) in enumerate(spans)),
    )
    data = _small(captions=["text"], start="start", end="end")
    data.video.cache_codec, data.max_failure_share = "raw", 0.3
    report = preprocess(f"{bucket}/howto.csv", f"{bucket}/videos", f"{bucket}/cache", data)
    rows = _rows(f"{bucket}/cache")
    assert sorted(rows) == sorted(f"yt123_{s:g}-{e:g}" for s, e in SPANS)
    whole = load_waveform(str(long_video), 16000)
    for n, (s, e) in enumerate(SPANS):
        row = rows[f"yt123_{s:g}-{e:g}"]
        assert list(row["captions"]) == [f"step {n}"]
        assert np.array_equal(row["frames"], _direct_span_frames(long_video, (s, e), 4, 32))
        direct = fbank_windows(whole[round(s * 16000) : round(e * 16000)], data.audio)
        assert np.abs(cached_fbank(row) - direct).mean() < 0.02
    (skip,) = report["rows_skipped"]
    assert skip["id"] == "yt123_30-40" and skip["reason"] == "span 30-40 s starts past the video's end (12.00 s)"


@pytest.mark.ray
def test_bad_shards_and_rows_are_counted_and_the_rest_goes_on(s3, synth_small, ray_session):
    from gram_ray.data.preprocess import preprocess

    bucket = s3.bucket()
    val = json.loads(Path(synth_small["val"]).read_text())
    good = [(e["video_id"], (Path(synth_small["videos"]) / f"{e['video_id']}.mp4").read_bytes()) for e in val[:4]]
    cut_in_second = tar_bytes(sum((v2d_sample(i, v, ["ok"]) for i, v in good[2:]), []))  # cut inside its 2nd mp4
    shards = {
        "00000.tar": tar_bytes(sum((v2d_sample(i, v, ["ok"]) for i, v in good[:2]), [])),
        "00001.tar": b"<Error><Code>AccessDenied</Code></Error>" * 20,  # not a tar
        "00002.tar": cut_in_second[: cut_in_second.index(f"{good[3][0]}.mp4".encode()) + 2000],
        "00003.tar": tar_bytes([("x.1.mp4", good[0][1]), ("x.1.txt", b"dotted")]),
    }
    for name, blob in shards.items():
        storage.write_bytes_with(f"{bucket}/wds/{name}", lambda f, b=blob: f.write(b))
    data = _small("webdataset")
    data.audio.missing, data.max_failure_share = "silence", 0.9
    report = preprocess(f"{bucket}/wds", None, f"{bucket}/cache-wds", data)
    assert sorted(_rows(f"{bucket}/cache-wds")) == sorted([good[0][0], good[1][0], good[2][0]])
    reasons = {s["id"]: s["reason"] for s in report["rows_skipped"]}
    assert reasons["00001.tar"].startswith("not a tar file: 00001.tar")
    assert reasons["00002.tar"].startswith("shard cut off inside a member: 00002.tar")
    assert reasons["x.1"].startswith("a key with a dot: member 'x.1.mp4' of 00003.tar")
    assert report["skipped_by_reason"] == {
        "not a tar file": 1,
        "shard cut off inside a member": 1,
        "a key with a dot": 1,
    }
    assert report["rows_total"] == 6  # a shard that failed counts as one

    videos = f"{bucket}/videos"
    storage.upload_dir(Path(synth_small["videos"]), videos)
    lines = [
        {"video_id": good[0][0], "caption": "fine", "file": f"{good[0][0]}.mp4"},
        {"video_id": "novideo", "caption": "no video field"},
        {"video_id": good[1][0], "text": "the caption field is missing", "file": f"{good[1][0]}.mp4"},
        {"video_id": good[2][0], "caption": "late", "file": f"{good[2][0]}.mp4", "s": 50, "e": 60},
        {"video_id": good[3][0], "caption": "early", "file": f"{good[3][0]}.mp4", "s": 0, "e": 0.5},
    ]
    storage.write_text(f"{bucket}/rows.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    data = _small(video="file", start="s", end="e")
    data.audio.missing, data.max_failure_share = "silence", 0.7
    strict = _small(video="file", start="s", end="e")
    strict.max_failure_share = 0.1
    with pytest.raises(ManifestError, match="missing or empty"):  # 2 of 5 rows cannot be read: a wrong mapping?
        preprocess(f"{bucket}/rows.jsonl", videos, f"{bucket}/cache-rows", strict)
    report = preprocess(f"{bucket}/rows.jsonl", videos, f"{bucket}/cache-rows", data)
    reasons = {s["id"]: s["reason"] for s in report["rows_skipped"]}
    assert "names no video" in reasons["novideo"] and "has no caption field" in reasons[good[1][0]]
    assert "starts past the video's end" in reasons[good[2][0]]
    assert sorted(_rows(f"{bucket}/cache-rows")) == sorted([good[0][0], good[3][0]])


def test_the_source_configs_keep_grams_settings():
    from gram_ray.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    base = load_config(configs / "vast150k.yaml")
    webvid, vast = load_config(configs / "webvid-v2d.yaml"), load_config(configs / "vast27m-rows.yaml")
    for cfg in (webvid, vast):
        assert cfg.train == base.train and cfg.model == base.model and cfg.data.video == base.data.video
        assert cfg.data.val_source.kind == "manifest" and cfg.eval.protocol == "seed"
    assert webvid.data.source.kind == "webdataset" and webvid.data.train_annotations.endswith("{00000..00999}.tar")
    assert vast.data.source.fields.captions == ["vast_cap"] and vast.data.source.fields.id == "clip_id"
    with pytest.raises(ValueError, match="decoded into a cache once"):
        load_config(configs / "webvid-v2d.yaml", ["data.decode_on_the_fly=true"])


@pytest.mark.ray
def test_a_manifest_chunk_of_exactly_a_parts_size_is_written_once(synth_small, ray_session, tmp_path):
    """With data.shard_mb so small that a part is one clip, every chunk of the plan is exactly a part: each clip
    must still be in the cache once (a second write of the chunk's file must not replace it with nothing)."""
    from gram_ray.data.preprocess import preprocess

    data = _small()
    data.shard_mb = 0.001
    report = preprocess(
        synth_small["val"], synth_small["videos"], tmp_path / "c", data, audio_dir=synth_small["audios"]
    )
    rows = _rows(str(tmp_path / "c"))
    assert report["shards"] == report["rows_written"] == len(rows) == 8


def test_video2dataset_parquet_without_a_key_column_gives_every_row_its_own_key(tmp_path):
    """The fallback key is the row's place in its file: it once restarted every 8 rows (the reader's batch), so
    the rows of a 20-row file shared 8 ids."""
    path = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"mp4": [b"not decoded here"] * 20, "txt": [f"clip {i}" for i in range(20)]}), path)
    source = DataConfig().source.model_copy(update={"kind": "parquet"})
    ids = [clip.id for clip in parquet_clips(str(path), source)]
    assert ids == [f"00000.parquet[{n}]" for n in range(20)]


def _webvid_like_shards(synth_small, folder: Path, copies: int = 1) -> tuple[list[str], dict, dict]:
    """video2dataset tars as WebVid's come: per tar, 6 clips with their sound as a separate member, 2 videos with no
    audio stream, 2 failed downloads (a json and a txt, no videoid) and one clip that is not a video at all.
    Returns (the first tar's clip ids, their video bytes, their audio bytes)."""
    val = json.loads(Path(synth_small["val"]).read_text())
    video = {e["video_id"]: (Path(synth_small["videos"]) / f"{e['video_id']}.mp4").read_bytes() for e in val[:8]}
    audio = {i: (Path(synth_small["audios"]) / f"{i}.wav").read_bytes() for i in video}
    folder.mkdir()
    for copy in range(copies):
        name = (lambda i: i) if copy == 0 else (lambda i, c=copy: f"{i}-{c}")  # distinct ids in every tar
        members = []
        for i in list(video)[:6]:  # a clip with its sound as a separate member
            members += [(f"{name(i)}.wav", audio[i]), *v2d_sample(name(i), video[i], ["with sound"], videoid=name(i))]
        for i in list(video)[6:]:  # a video without an audio stream, and no audio member
            members += v2d_sample(name(i), video[i], ["silent film"], videoid=name(i))
        for n in range(2):  # failed downloads: no video, no videoid in the json
            members += v2d_sample(
                name(f"gone{n}"), None, ["rotted url"], status="failed_to_download", error_message="404"
            )
        members += v2d_sample(name("broken"), b"not a video at all" * 100, ["broken"], videoid=name("broken"))
        (folder / f"{copy:05d}.tar").write_bytes(tar_bytes(members))
    return list(video), video, audio


@pytest.mark.ray
def test_failed_downloads_and_clips_without_audio_under_skip_are_expected_absences_not_failures(
    synth_small, ray_session, tmp_path
):
    """video2dataset's shards at WebVid's scale: failed downloads (a json and a txt, status failed_to_download)
    and clips without sound are what the user expects, not decoding failures: they are counted by reason and do
    not count against data.max_failure_share (4 of 11 here, against a share of 10%; they once stopped the run).
    A failed download's json lacks the id field it is mapped to: it is reported as the failed download it is."""
    from gram_ray.data.preprocess import PreprocessError, preprocess

    ids, video, audio = _webvid_like_shards(synth_small, tmp_path / "wds")
    data = _small("webdataset", id="videoid")
    data.audio.missing, data.max_failure_share = "skip", 0.1
    lines: list[str] = []
    report = preprocess(str(tmp_path / "wds"), None, str(tmp_path / "cache"), data, log=lines.append)
    assert report["status"] == "complete"
    assert sorted(_rows(str(tmp_path / "cache"))) == sorted(ids[:6])
    assert (report["rows_total"], report["rows_failed"], report["rows_absent"]) == (11, 1, 4)
    assert report["absent_by_reason"] == {"download status failed_to_download": 2, "no readable audio track": 2}
    reasons = {s["id"]: s["reason"] for s in report["rows_skipped"]}
    assert reasons["gone0"] == "download status failed_to_download: 404"
    assert "  left out 2 as expected: download status failed_to_download" in lines
    assert "  left out 2 as expected: no readable audio track" in lines
    assert any(line.startswith("wrote 6 clips, skipped 1, left out 4 as expected") for line in lines), lines

    # Expected absences that leave the cache nearly empty still stop it, saying why and what to do.
    (tmp_path / "webvid").mkdir()
    sound = [(f"{ids[0]}.wav", audio[ids[0]]), *v2d_sample(ids[0], video[ids[0]], ["with sound"], videoid=ids[0])]
    silent = [m for i in ids[6:] for m in v2d_sample(i, video[i], ["silent film"], videoid=i)]
    (tmp_path / "webvid" / "00000.tar").write_bytes(tar_bytes(sound + silent))
    with pytest.raises(PreprocessError) as error:
        preprocess(str(tmp_path / "webvid"), None, str(tmp_path / "cache-webvid"), data, log=lines.append)
    assert str(error.value).startswith(
        "only 1 of 3 clips were kept: 2 have no sound (WebVid, for one, has none). Left out as expected (not "
        "failures), but they leave the cache nearly empty: use data.audio.missing: silence"
    )
    assert json.loads((tmp_path / "cache-webvid" / "report.json").read_text())["status"] == "failed"

    data.max_failure_share = 0.05  # the one broken clip is 9%: a failure still stops the run, naming the others
    with pytest.raises(PreprocessError, match=r"1 of 11 clips \(9%\) could not be decoded \(4 more left out as"):
        preprocess(str(tmp_path / "wds"), None, str(tmp_path / "cache2"), data, log=lines.append)


@pytest.mark.ray
def test_training_from_video2dataset_shards_with_failed_downloads_and_silent_clips(synth_small, ray_session, tmp_path):
    """Issue 38's done-when: WebVid-like shards (a third of the samples failed downloads or silent) decode through
    training's own path (decode_split, train mode) with each kind counted, none against data.max_failure_share,
    and the model trains on what is left. It once stopped with 26 of 159 clips "could not be decoded"."""
    from tiny import in_memory, tiny_config

    from gram_ray.data.parquet_layout import numpy_rows
    from gram_ray.data.text import build_word_vocab
    from gram_ray.train.datasets import decode_split
    from gram_ray.train.loop import run_training

    _webvid_like_shards(synth_small, tmp_path / "wds", copies=3)
    cfg = tiny_config(
        f"data.train_annotations={tmp_path / 'wds'}", "data.source.kind=webdataset", "data.source.fields.id=videoid",
        "data.audio.missing=skip", "data.max_failure_share=0.1", "train.epochs=2", "train.batch_size=4",
    )  # fmt: skip
    lines: list[str] = []
    report = decode_split(cfg, "train", str(tmp_path / "cache"), log=lines.append)
    assert report["status"] == "complete" and report["mode"] == "train"
    # 3 tars of 11: 18 kept, 6 failed downloads and 6 silent left out as expected, 3 broken (9% < 10%).
    assert (report["rows_total"], report["rows_written"], report["rows_failed"], report["rows_absent"]) == (
        33,
        18,
        3,
        12,
    )
    assert report["absent_by_reason"] == {"download status failed_to_download": 6, "no readable audio track": 6}
    assert "  left out 6 as expected: download status failed_to_download" in lines
    assert [line for line in lines if line.startswith("  skipped 3: ")], lines  # the broken clips, by reason

    rows = numpy_rows(pq.read_table(tmp_path / "cache" / "shards"))
    assert len(rows["id"]) == 18 and rows["has_audio"].all()
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    last = run_training(cfg, **in_memory(cfg, rows, vocab), report=lambda metrics, checkpoint: None)
    assert last["step"] == 2 * (18 // 4) and np.isfinite(last["train/loss"])
