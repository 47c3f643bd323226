"""The fine-tuning sets beyond the video ones: still images as one-frame clips (Flickr30k, MSCOCO), text-audio with
no video at all (Clotho v2), GRAM's own annotation files (YouCook2), and a tiny training run of each new
modality set from a real cache."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny import tiny_config

from gram_ray.config import load_config
from gram_ray.data import decode as decode_module
from gram_ray.data import preprocess as preprocess_module
from gram_ray.data.collate import Collate, epoch_batches
from gram_ray.data.manifest import read_annotations
from gram_ray.data.parquet_layout import numpy_rows
from gram_ray.data.preprocess import preprocess
from gram_ray.data.synthetic import _frames
from gram_ray.data.text import build_word_vocab
from gram_ray.train.loop import run_training

DATA = Path(__file__).parent / "data" / "gram-annotations"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_gram_youcook2_annotations_parse_with_subtitles():
    # GRAM's own files (datasets/annotations/youcook/descs_cap_{train,test}.json, first 12 entries of each)
    for split in ("train", "test"):
        rows = read_annotations(DATA / f"youcook2_descs_cap_{split}.json")
        assert len(rows) == 12 and all(len(r.captions) == 1 and r.subtitle for r in rows)
    first = read_annotations(DATA / "youcook2_descs_cap_test.json")[0]
    assert first.id == "xHr8X2Wpmno_47_60" and first.captions == ["pick the ends off the verdalago"]


def test_gram_id_fields_of_image_and_audio_sets(tmp_path):
    # GRAM's loader takes the first of clip_id, video_id, image_id, image, id; an image id may be its file name.
    entries = [
        {"image": "1000092795.jpg", "caption": ["two young guys", "two men outside"]},
        {"image_id": 391895, "caption": "a man riding a motorcycle"},
        {"id": "Distorted AM Radio noise", "desc": ["static crackles", "a radio hisses"]},
    ]
    (tmp_path / "a.json").write_text(json.dumps(entries))
    rows = read_annotations(tmp_path / "a.json")
    assert [r.id for r in rows] == ["1000092795.jpg", "391895", "Distorted AM Radio noise"]
    assert rows[0].captions == ["two young guys", "two men outside"]


def test_new_dataset_configs_have_grams_settings():
    c = {
        n: load_config(CONFIGS / f"{n}.yaml")
        for n in ("clothov2", "flickr30k", "mscoco", "lsmdc", "youcook2", "valor32k")
    }
    assert c["clothov2"].model.modalities == ["text", "audio"] and c["clothov2"].data.video.format == "none"
    assert c["clothov2"].data.audio.windows == 3 and c["clothov2"].train.epochs == 10
    for name in ("flickr30k", "mscoco"):
        assert c[name].model.modalities == ["text", "video"] and c[name].data.video.format == "image"
        assert c[name].data.video.num_frames == 1 and c[name].data.audio.format == "none"
        assert c[name].train.global_batch_size == 256 and c[name].train.epochs == 5
    assert c["lsmdc"].data.video.num_frames == 8 and c["lsmdc"].data.video.eval_num_frames == 32
    assert "subtitle" in c["youcook2"].model.modalities and c["youcook2"].train.epochs == 30
    assert c["valor32k"].train.epochs == 30 and c["valor32k"].model.modalities == ["text", "video", "audio"]
    assert all(cfg.eval.rerank_k == 50 and cfg.model.itm_ratio == 0.1 for cfg in c.values())
    with pytest.raises(ValueError, match="data.video.format is none"):
        load_config(CONFIGS / "clothov2.yaml", ["model.modalities=[text,video,audio]"])


def _image_text_set(synth: dict, out: Path) -> dict:
    """The synthetic clips' first frames as JPEG images, captioned by what they show (Flickr-style entries)."""
    from torchvision.io import write_jpeg

    (out / "images").mkdir(parents=True)
    paths = {}
    for split in ("train", "val"):
        entries = []
        for e in json.loads(Path(synth[split]).read_text()):
            a = e["attributes"]
            frame = _frames(a, 48, 1, np.random.default_rng(0))[0]
            write_jpeg(
                torch.from_numpy(frame).permute(2, 0, 1).contiguous(), str(out / "images" / f"{e['video_id']}.jpg")
            )
            entries.append({"image": f"{e['video_id']}.jpg", "caption": [f"a {a['colour']} {a['shape']}"]})
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(entries))
    return paths


def _audio_text_set(synth: dict, out: Path) -> dict:
    """The synthetic clips' tones alone, captioned by what they sound like (Clotho-style entries, no video)."""
    out.mkdir(parents=True)
    paths = {}
    for split in ("train", "val"):
        entries = [
            {"video_id": e["video_id"], "desc": [f"a {e['attributes']['pitch']} {e['attributes']['rhythm']} tone"]}
            for e in json.loads(Path(synth[split]).read_text())
        ]
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(entries))
    return paths


def test_images_are_one_frame_clips_decoded_without_a_video_decoder(synth_small, tmp_path, monkeypatch):
    paths = _image_text_set(synth_small, tmp_path)
    cfg = tiny_config("model.modalities=[text,video]", "data.video.format=image", "data.audio.format=none")

    def no_video_decoder(*args, **kwargs):
        raise AssertionError("an image went through the video decoder")

    monkeypatch.setattr(decode_module, "decode_video", no_video_decoder)
    rows = read_annotations(paths["val"])
    from gram_ray.data.manifest import resolve_media

    resolve_media(rows, tmp_path / "images", None, "image")
    batch = {k: np.array([getattr(r, k) or "" for r in rows], dtype=object) for k in ("id", "video_path", "audio_path")}
    batch |= {"captions": np.array([r.captions for r in rows], dtype=object), "subtitle": np.array([""] * len(rows))}
    columns, failures = preprocess_module.decode_rows(batch, cfg.data, "train")
    assert failures == [] and set(columns) == {"id", "captions", "frames", "subtitle"}  # no audio columns
    s = cfg.data.video.size
    assert columns["frames"].shape == (len(rows), cfg.data.video.num_frames, 3, s, s)
    assert (columns["frames"][:, 0] == columns["frames"][:, -1]).all()  # the still, repeated to num_frames


@pytest.mark.ray
@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("text-audio", ["model.modalities=[text,audio]", "data.video.format=none"]),
        ("text-image", ["model.modalities=[text,video]", "data.video.format=image", "data.audio.format=none",
                        "data.video.num_frames=1", "data.video.train_draws=1"]),
    ],
)  # fmt: skip
def test_tiny_training_from_a_cache_of_each_new_modality_set(kind, overrides, synth_small, ray_session, tmp_path):
    cfg = tiny_config(*overrides, "train.epochs=2", "model.itm_ratio=0.1", "model.text.cross_attention=true")
    if kind == "text-audio":
        paths, video_dir, audio_dir = _audio_text_set(synth_small, tmp_path / "set"), None, synth_small["audios"]
    else:
        paths, video_dir, audio_dir = (
            _image_text_set(synth_small, tmp_path / "set"),
            str(tmp_path / "set" / "images"),
            None,
        )
    # One cache (train mode) serves both: what is tested is that these modality sets cache and train at all.
    report = preprocess(paths["train"], video_dir, tmp_path / "train", cfg.data, audio_dir=audio_dir, mode="train")
    assert report["rows_skipped"] == [] and report["video_dir"] == video_dir
    rows = numpy_rows(pq.read_table(tmp_path / "train" / "shards"))
    splits = {"train": rows, "val": rows}
    cached = set(splits["train"])
    if kind == "text-audio":
        assert "audio_fbank_u8" in cached and not {"frames", "frames_jpeg"} & cached
    else:
        assert "frames_jpeg" in cached and not {"audio_fbank", "audio_fbank_u8", "has_audio"} & cached
        assert all(len(clip) == 1 for clip in splits["train"]["frames_jpeg"])  # one JPEG: the image
    vocab = build_word_vocab(c for rows in splits.values() for caps in rows["captions"] for c in caps)
    collate, reports = Collate(cfg, vocab, train=True), []
    last = run_training(
        cfg,
        train_batches=lambda epoch, skip: epoch_batches(splits["train"], 4, collate, epoch, skip),
        val_batches=lambda: [Collate(cfg, vocab, train=False)(splits["val"])],
        steps_per_epoch=len(splits["train"]["id"]) // 4,
        report=lambda metrics, checkpoint: reports.append(metrics),
        vocab=vocab,
    )
    name = "-".join(cfg.model.modalities)
    assert np.isfinite(last["train/loss"]) and last["train/matching_loss"] > 0
    for key in (f"val/{name}/t2v/R@1", f"val/rerank/{name}/t2v/R@1", f"val/rerank_plus_volume/{name}/t2v/R@1"):
        assert 0 <= last[key] <= 100, key


@pytest.mark.ray
def test_the_rest_of_a_streamed_epoch_reads_no_file_trained_on_whole(synth_small, ray_session, tmp_path):
    """A mid-epoch checkpoint of a cache streamed every epoch records the files trained on whole by name (its
    report's file_rows count their rows); the rest of the epoch skips those files at the read, and leaves out the
    ids trained on of the others: every other clip comes once."""
    from gram_ray.data.epoch_progress import FILE, EpochProgress
    from gram_ray.train.datasets import streamed

    cfg = tiny_config("data.materialize=never", "train.shuffle=blocks")
    report = preprocess(synth_small["train"], synth_small["videos"], tmp_path / "cache", cfg.data,
                        audio_dir=synth_small["audios"])  # fmt: skip
    file_rows = report["file_rows"]
    names = sorted(file_rows)
    assert len(names) > 2 and sum(file_rows.values()) == report["rows_written"] == 16
    shards = str(tmp_path / "cache" / "shards")
    rows = {r["id"]: r[FILE] for r in streamed(shards, cfg, 0).take_all()}
    assert len(rows) == 16 and set(rows.values()) == set(names)  # every row says its file

    progress = EpochProgress(file_rows)
    whole = [i for i, name in rows.items() if name == names[0]]
    partly = [i for i, name in rows.items() if name == names[1]][:1]
    progress.add([names[0]] * len(whole) + [names[1]], whole + partly)
    assert progress.done == {names[0]} and progress.ids() == partly
    rest = streamed(shards, cfg, 0, progress)
    assert not [f for f in rest.input_files() if f.endswith(names[0])]  # not read at all
    assert sorted(r["id"] for r in rest.take_all()) == sorted(set(rows) - set(whole) - set(partly))
