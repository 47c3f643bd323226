"""Hostile and odd media (tests/hostile_media.py writes 23 kinds): each is skipped with a reason that names the
problem, or decodes correctly; never a zero-filled row, never the whole job lost because of one file."""

import numpy as np
import pytest
from hostile_media import DECODE, SKIP, generate_in_subprocess

from gram_ray.config import DataConfig
from gram_ray.data.manifest import read_annotations, resolve_media
from gram_ray.data.preprocess import _manifest_items, decode_rows
from gram_ray.data.schema import object_column


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, generate_in_subprocess(root)


def _data() -> DataConfig:
    data = DataConfig()
    data.video.num_frames, data.video.size, data.audio.window_frames = 8, 32, 256
    return data


def _batch(items: list[dict]) -> dict:
    """Manifest items as the numpy batch a decode UDF receives."""
    batch = {k: np.array([it[k] for it in items], dtype=object) for k in ("id", "subtitle", "video_path", "audio_path")}
    batch["captions"] = object_column([it["captions"] for it in items])
    return batch


def _decode_one(root, media_id: str, data: DataConfig, mode: str = "eval"):
    rows = [r for r in read_annotations(root / "ann.json") if r.id == media_id]
    resolve_media(rows, root / "videos", root / "audios")
    return decode_rows(_batch(_manifest_items(rows)), data, mode)


KINDS = [
    "good", "random", "empty", "truncated", "header", "text", "audioonly", "folder", "dangling", "noaudio", "silent",
    "garbageaudio", "cutaudio", "corrupt", "vp9", "mjpeg", "yuv444", "tiny", "strip", "short", "mislabelled",
    "unicode", "longcap",
]  # fmt: skip


def test_there_are_at_least_20_kinds(hostile):
    _, cases = hostile
    assert sorted(cases) == sorted(KINDS) and len(KINDS) >= 20


@pytest.mark.parametrize("media_id", KINDS)
def test_each_hostile_file_is_skipped_with_its_reason_or_decodes_correctly(hostile, media_id):
    root, cases = hostile
    kind, expect, reason = cases[media_id]
    data = _data()
    columns, failures = _decode_one(root, media_id, data)
    if expect == SKIP:
        assert len(columns["id"]) == 0 and len(failures) == 1, kind
        assert failures[0]["id"] == media_id and reason.lower() in failures[0]["reason"].lower(), failures
        assert len(failures[0]["reason"]) < 400  # one line a person can read in the report
        return
    assert not failures, (kind, failures)
    frames, fbank = columns["frames"][0], columns["audio_fbank"][0]
    assert frames.shape == (8, 3, 32, 32) and frames.dtype == np.uint8
    assert frames.std() > 5 and fbank.std() > 0.1  # real pictures and sound, never a zero-filled row
    assert columns["has_audio"][0]
    if media_id == "short":  # 3 frames for 8 samples: each repeated in order, none invented
        steps = [not np.array_equal(a, b) for a, b in zip(frames[:-1], frames[1:], strict=True)]
        assert sum(steps) == 2
        train, _ = _decode_one(root, media_id, data, mode="train")
        assert train["frames"].shape == (1, 8, 3, 32, 32)
    if media_id == "unicode":
        assert columns["captions"][0] == ["ein Hund bellt – 狗在叫 🐕 à côté"]
    if media_id == "longcap":
        assert len(columns["captions"][0][0]) == 25_000


def test_a_long_and_a_non_ascii_caption_tokenize_within_the_model_limit(hostile):
    from tiny import tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab

    root, _ = hostile
    cfg = tiny_config("data.video.num_frames=8", "data.video.size=32", "data.audio.window_frames=256")
    rows = {"unicode": _decode_one(root, "unicode", cfg.data)[0], "longcap": _decode_one(root, "longcap", cfg.data)[0]}
    batch = {k: np.concatenate([rows["unicode"][k], rows["longcap"][k]]) for k in rows["unicode"]}
    batch["captions"] = object_column(list(rows["unicode"]["captions"]) + list(rows["longcap"]["captions"]))
    vocab = build_word_vocab(c for caps in batch["captions"] for c in caps)
    out = Collate(cfg, vocab, train=False)(batch)
    assert out["input_ids"].shape == (2, cfg.model.max_text_length)


@pytest.mark.ray
def test_one_preprocessing_job_over_every_kind_keeps_the_good_and_reports_the_rest(hostile, ray_session, tmp_path):
    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.data.preprocess import preprocess

    root, cases = hostile
    data = _data()
    data.max_failure_share = 1.0
    report = preprocess(root / "ann.json", root / "videos", tmp_path / "cache", data, audio_dir=root / "audios")
    skipped = {s["id"]: s["reason"] for s in report["rows_skipped"]}
    assert set(skipped) == {m for m, (_, expect, _) in cases.items() if expect == SKIP}
    rows = read_cache(str(tmp_path / "cache" / "shards")).take_all()
    assert sorted(r["id"] for r in rows) == sorted(m for m, (_, expect, _) in cases.items() if expect == DECODE)
    from tiny import cached_frames

    for r in rows:
        assert cached_frames(r).std() > 5 and r["has_audio"], r["id"]  # no zero-filled row


def test_a_decode_batch_whose_clips_all_fail_keeps_the_tensor_columns_out_of_pickle(hostile):
    # Ray Data turns a numpy batch of zero rows into a pickled-object column (its native path cannot hold an n-d
    # array): the "Failed to convert column 'frames' ... falling back to pickled python objects" warning seen on
    # real clips with broken ones beside them. The decoders hand Ray Arrow tables with tensor columns instead.
    from ray.data.extensions import ArrowTensorType, ArrowTensorTypeV2

    from gram_ray.data.preprocess import decode_batch

    root, _ = hostile
    data = _data()
    data.decode_batch_size = 2
    rows = {r.id: r for r in read_annotations(root / "ann.json")}
    chosen = [rows[m] for m in ("random", "empty", "good", "vp9")]  # the first batch of 2 fails entirely
    resolve_media(chosen, root / "videos", root / "audios")
    empty = decode_batch(_batch(_manifest_items(chosen[:2])), data, "eval", None)
    assert empty.num_rows == 0 and isinstance(empty.schema.field("frames").type, (ArrowTensorType, ArrowTensorTypeV2))
    mixed = decode_batch(_batch(_manifest_items(chosen[1:3])), data, "eval", None)  # one fails, one decodes
    assert mixed.num_rows == 1 and mixed.schema.field("frames").type == empty.schema.field("frames").type
