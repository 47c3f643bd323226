"""Local paths and storage URIs go through the same helpers (checkpoints, results and caches on clusters)."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from s3 import S3Server

from gram_ray import storage
from gram_ray.cli import main


def test_uris_keep_their_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert storage.join("s3://bucket/runs", "exp", "cache") == "s3://bucket/runs/exp/cache"
    assert storage.join("gs://bucket", "a") == "gs://bucket/a"
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x"
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs") == str(tmp_path / "runs")


def test_read_write_list_delete_through_a_uri(tmp_path):
    root = f"file://{tmp_path}/store"
    storage.write_text(storage.join(root, "run", "result.json"), "{}")
    storage.write_text(storage.join(root, "run", "b.jsonl"), "x\n")
    assert storage.exists(storage.join(root, "run", "result.json"))
    assert storage.read_text(storage.join(root, "run", "result.json")) == "{}"
    assert storage.list_files(storage.join(root, "run"), ".jsonl") == [storage.join(root, "run", "b.jsonl")]
    assert storage.total_bytes(storage.join(root, "run")) == 4
    assert (tmp_path / "store" / "run" / "result.json").read_text() == "{}"  # the same bytes, seen locally
    storage.delete_dir(storage.join(root, "run"))
    storage.delete_dir(storage.join(root, "run"))  # nothing there: no error
    assert not Path(tmp_path, "store", "run").exists() and storage.list_files(storage.join(root, "run")) == []


def test_cli_takes_uris_where_storage_may_be_remote(tmp_path):
    """click.Path would collapse s3://bucket into s3:/bucket: the options that may name storage are strings."""
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", f"file://{tmp_path}/nope", "--data", str(tmp_path)])
    assert result.exit_code != 0 and f"--checkpoint=file://{tmp_path}/nope: no such folder" in result.output


# Through the S3 API: a local S3 server (moto) on 127.0.0.1, the same pyarrow client and code path as AWS.


@pytest.fixture(scope="module")
def data_in_bucket(s3, synth_small):
    """The small synthetic dataset uploaded to a fresh bucket: {"train", "val", "videos", "audios"} as URIs."""
    return s3.upload_dataset(synth_small)


def test_storage_helpers_through_the_s3_api(s3, tmp_path):
    root = s3.bucket()
    storage.write_text(storage.join(root, "run", "result.json"), '{"a": 1}')
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"x" * 1000)
    storage.upload_dir(tmp_path / "ckpt", storage.join(root, "run", "checkpoint_1"))
    assert storage.read_text(f"{root}/run/result.json") == '{"a": 1}'
    assert storage.list_files(f"{root}/run/checkpoint_1") == [f"{root}/run/checkpoint_1/state.pt"]
    assert storage.total_bytes(f"{root}/run/checkpoint_1") == 1000
    storage.delete_dir(f"{root}/run")
    assert not storage.exists(f"{root}/run/result.json")


def test_annotations_and_media_are_read_from_the_bucket(data_in_bucket, synth_small):
    """s3://bucket/x keeps both slashes (pathlib would make it s3:/bucket/x), the media folder is listed once, and
    a clip's bytes are decoded from memory to exactly the frames and filterbank of the same file on disk."""
    from gram_ray.config import AudioConfig
    from gram_ray.data.audio import decode_audio
    from gram_ray.data.manifest import read_annotations, resolve_media
    from gram_ray.data.video import decode_video

    remote = read_annotations(data_in_bucket["val"])
    local = read_annotations(synth_small["val"])
    assert [(r.id, r.captions) for r in remote] == [(r.id, r.captions) for r in local]
    resolve_media(remote, data_in_bucket["videos"], data_in_bucket["audios"])
    resolve_media(local, synth_small["videos"], synth_small["audios"])
    row, disk = remote[0], local[0]
    assert row.video_path == f"{data_in_bucket['videos']}/{Path(disk.video_path).name}"
    assert row.audio_path == f"{data_in_bucket['audios']}/{Path(disk.audio_path).name}"
    assert np.array_equal(decode_video(row.video_path, 4, 32, "eval"), decode_video(disk.video_path, 4, 32, "eval"))
    for decoder in ("pyav", "decord"):
        frames = decode_video(row.video_path, 4, 32, "eval", decoder=decoder)
        assert np.array_equal(frames, decode_video(disk.video_path, 4, 32, "eval", decoder=decoder))
    audio = AudioConfig(window_frames=64)
    assert np.array_equal(decode_audio(row.audio_path, None, audio), decode_audio(disk.audio_path, None, audio))


def test_a_clip_that_cannot_be_read_from_storage_is_skipped_with_the_reason(data_in_bucket, s3):
    from gram_ray.config import DataConfig
    from gram_ray.data.errors import DecodeError, load_media
    from gram_ray.data.preprocess import decode_rows
    from gram_ray.data.schema import object_column

    missing = f"{data_in_bucket['videos']}/not-there.mp4"
    with pytest.raises(DecodeError, match="video file not found in storage"):
        load_media(missing, "video")
    empty = f"{data_in_bucket['videos']}/empty.mp4"
    storage.write_text(empty, "")
    batch = {
        "id": np.array(["gone", "empty"], dtype=object),
        "captions": object_column([["a"], ["b"]]),
        "subtitle": np.array(["", ""], dtype=object),
        "video_path": np.array([missing, empty], dtype=object),
        "audio_path": np.array(["", ""], dtype=object),
    }
    columns, failures = decode_rows(batch, DataConfig(), "eval")
    assert len(columns["id"]) == 0
    assert [f["reason"] for f in failures] == [
        f"video file not found in storage ({missing})",
        "video file is empty (0 bytes)",
    ]


def test_missing_inputs_in_storage_are_named_before_ray_starts(data_in_bucket, monkeypatch):
    """A typo in a bucket path is an error in about a second, not after Ray's start-up."""
    import gram_ray.cli.common

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(gram_ray.cli.common, "init_ray", no_ray)
    bucket = S3Server.bucket_of(data_in_bucket)
    result = CliRunner().invoke(
        main,
        ["preprocess", "--annotations", f"{bucket}/data/nope.json", "--video-dir", data_in_bucket["videos"]]
        + ["--out", f"{bucket}/cache"],
    )
    assert result.exit_code != 0 and f"annotation file {bucket}/data/nope.json does not exist" in result.output
    result = CliRunner().invoke(
        main,
        ["train", "--config", "configs/demo.yaml", "--set", f"data.train_annotations={data_in_bucket['train']}"]
        + ["--set", f"data.video_dir={bucket}/data/no-videos"],
    )
    assert result.exit_code != 0 and f"data.video_dir={bucket}/data/no-videos: no such folder" in result.output


@pytest.mark.ray
def test_preprocess_from_the_bucket_into_the_bucket_equals_the_local_cache(data_in_bucket, synth_small, ray_session):
    from gram_ray.config import DataConfig
    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.data.preprocess import preprocess

    data = DataConfig()
    data.video.num_frames, data.video.size, data.audio.window_frames = 4, 32, 64
    bucket = S3Server.bucket_of(data_in_bucket)
    remote = preprocess(
        data_in_bucket["val"], data_in_bucket["videos"], f"{bucket}/cache/val", data, audio_dir=data_in_bucket["audios"]
    )
    assert remote["rows_written"] == 8 and not remote["rows_skipped"]
    assert storage.exists(f"{bucket}/cache/val/report.json")
    again = preprocess(
        data_in_bucket["val"], data_in_bucket["videos"], f"{bucket}/cache/val", data, audio_dir=data_in_bucket["audios"]
    )
    assert again["reused"]  # the media's listing (sizes, times) keys the cache as a local folder's files do
    rows = {r["id"]: r for r in read_cache(f"{bucket}/cache/val/shards").take_all()}
    local = Path(synth_small["videos"]).parent / "local-cache"
    preprocess(synth_small["val"], synth_small["videos"], local, data, audio_dir=synth_small["audios"])
    for row in read_cache(str(local / "shards")).take_all():
        assert list(rows[row["id"]]["frames_jpeg"]) == list(row["frames_jpeg"])  # the same JPEG bytes
        assert np.array_equal(rows[row["id"]]["audio_fbank_u8"], row["audio_fbank_u8"])
