import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gram_ray.config import AudioConfig, DataConfig
from gram_ray.data.audio import decode_audio, fbank_windows, window_starts
from gram_ray.data.errors import DecodeError
from gram_ray.data.manifest import ManifestError, read_annotations, resolve_media
from gram_ray.data.parquet_layout import read_cache
from gram_ray.data.pieces import record_done
from gram_ray.data.preprocess import (
    PreprocessError,
    _done_shards,
    _piece_index,
    _shard_name,
    cache_key,
    preprocess,
    rows_per_shard,
)
from gram_ray.data.synthetic import AUDIO_COMBOS
from gram_ray.data.video import decode_video, segment_indices


def test_real_annotation_files_parse(shared_data):
    msrvtt = read_annotations(shared_data / "annotations" / "msrvtt_descs_ret_test.json")
    assert len(msrvtt) == 1000 and all(len(r.captions) == 1 for r in msrvtt)
    assert sum(r.subtitle is not None for r in msrvtt) > 500
    audiocaps = read_annotations(shared_data / "annotations" / "audiocaps_descs_ret_test.json")
    assert len(audiocaps) == 729 and all(len(r.captions) >= 1 for r in audiocaps)
    assert max(len(r.captions) for r in audiocaps) == 5
    clips = read_annotations(shared_data / "real-clips" / "annotations.json")
    assert [len(r.captions) for r in clips] == [1, 2, 1, 1]
    # GRAM's other test splits: paragraphs (DiDeMo, ActivityNet), 10 captions a clip with subtitles (VATEX)
    didemo = read_annotations(shared_data / "annotations" / "didemo_descs_ret_test.json")
    assert len(didemo) == 1003 and max(len(r.captions[0].split()) for r in didemo) > 40  # why 70 tokens
    activitynet = read_annotations(shared_data / "annotations" / "activitynet_descs_ret_test.json")
    assert len(activitynet) == 4917
    vatex = read_annotations(shared_data / "annotations" / "vatex_descs_ret_test.json")
    assert len(vatex) == 1500 and all(len(r.captions) == 10 for r in vatex)
    assert any(r.subtitle for r in vatex)


def test_vast27m_annotations_parse(tmp_path):
    entry = {"clip_id": "c1", "vast_cap": ["a dog barks"], "vision_cap": ["a dog"], "audio_cap": ["barking"],
             "subtitle": "good dog"}  # fmt: skip
    (tmp_path / "vast.json").write_text(json.dumps([entry]))
    (row,) = read_annotations(tmp_path / "vast.json")
    assert (row.id, row.captions, row.subtitle) == ("c1", ["a dog barks"], "good dog")
    assert row.extra["vision_cap"] == ["a dog"] and row.extra["audio_cap"] == ["barking"]


def test_every_dataset_config_loads_and_validates():
    from gram_ray.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    names = {c.stem for c in configs}
    datasets = {"msrvtt", "msrvtt-hf", "didemo", "activitynet", "vatex", "audiocaps", "vast150k"}
    assert datasets | {"demo", "demo-dam"} <= names
    loaded = {c.stem: load_config(c) for c in configs}
    assert loaded["vatex"].train.epochs == 2.5 and "subtitle" in loaded["vatex"].model.modalities
    assert loaded["didemo"].data.audio.windows == 2 and loaded["didemo"].model.max_text_length == 70
    assert loaded["vast150k"].train.global_batch_size == 128 and loaded["vast150k"].data.video.num_frames == 2
    assert loaded["msrvtt"].worker_batch * loaded["msrvtt"].scaling.num_workers == 32
    assert loaded["demo-dam"].model.itm_ratio == 0.1 and loaded["demo-dam"].model.text.cross_attention


def test_jsonl_and_csv_with_the_same_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"video_id": "v1", "caption": ["x", "y"]}\n\n{"video_id": "v2", "desc": "z"}\n')
    rows = read_annotations(tmp_path / "a.jsonl")
    assert [(r.id, r.captions) for r in rows] == [("v1", ["x", "y"]), ("v2", ["z"])]
    (tmp_path / "a.csv").write_text("video_id,desc,subtitle\nv1,a dog ||| a puppy,hello\nv1,another,\n")
    (row,) = read_annotations(tmp_path / "a.csv")
    assert row.captions == ["a dog", "a puppy", "another"] and row.subtitle == "hello"


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"a": 1}', "JSON list"),
        ('[{"desc": "x"}]', "video_id"),
        ('[{"video_id": "v"}]', "desc"),
        ("[", "not valid JSON"),
    ],
)
def test_bad_annotation_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_annotations(path)


def test_real_clips_decode(shared_data):
    for i in range(1, 5):
        video = str(shared_data / "real-clips" / "videos" / f"video{i}.mp4")
        frames = decode_video(video, 8, 224, "eval")
        assert frames.shape == (8, 3, 224, 224) and frames.dtype == np.uint8
        assert frames.std() > 10 and all(f.std() > 5 for f in frames)  # not blank
        for fbank in (
            decode_audio(None, video, AudioConfig()),  # the video's own track
            decode_audio(str(shared_data / "real-clips" / "audios" / f"audio{i}.mp3"), None, AudioConfig()),
        ):
            assert fbank.shape == (1, 1024, 64) and fbank.dtype == np.float32
            assert np.isfinite(fbank).all() and fbank.std() > 0.1


def test_decord_decoder_works_without_pyav(shared_data, monkeypatch):
    # A bare GPU image has decord but no PyAV: the decord path must not need it, and give the same frames
    # (the size then comes from the first decoded frame instead of the container header).
    import gram_ray.data.video as video

    path = str(shared_data / "real-clips" / "videos" / "video1.mp4")
    with_pyav, size = decode_video(path, 4, 64, "eval", decoder="decord"), video.probe_size(path)
    monkeypatch.setattr(video, "_pyav", lambda: None)
    assert video.probe_size(path) == size
    np.testing.assert_array_equal(decode_video(path, 4, 64, "eval", decoder="decord"), with_pyav)
    with pytest.raises(RuntimeError, match="needs PyAV"):
        decode_video(path, 4, 64, "eval", decoder="pyav")


def _full_decode(path: str, num_frames: int) -> np.ndarray:
    """Reference: decode every frame, sort into presentation order, keep the eval-mode samples at native size."""
    import av

    with av.open(path) as container:
        frames = sorted(container.decode(video=0), key=lambda f: f.pts)
        return np.stack(
            [frames[i].to_ndarray(format="rgb24") for i in segment_indices(len(frames), num_frames, "eval")]
        )


def test_pyav_decoder_skips_only_frames_nothing_depends_on(shared_data):
    """The sampled frames are bit-identical to a full decode although non-reference frames were skipped, and match
    decord's frames up to the resampling filter."""
    for i in (1, 3):
        video = str(shared_data / "real-clips" / "videos" / f"video{i}.mp4")
        ours = decode_video(video, 8, 360, "eval", decoder="pyav")  # 360 = the native short side: no resize
        reference = _full_decode(video, 8)
        top, left = (reference.shape[1] - 360) // 2, (reference.shape[2] - 360) // 2
        assert np.array_equal(ours, reference[:, top : top + 360, left : left + 360].transpose(0, 3, 1, 2))
        small = decode_video(video, 8, 224, "eval", decoder="pyav")
        other = decode_video(video, 8, 224, "eval", decoder="decord")
        assert np.abs(small.astype(int) - other).mean() < 2  # the same frames; only the resize filter differs
        assert np.abs(small.astype(int) - other[::-1]).mean() > 5  # while other frames are far apart


def test_pyav_train_mode_samples_within_segments(shared_data):
    video = str(shared_data / "real-clips" / "videos" / "video2.mp4")
    draws = {
        decode_video(video, 4, 32, "train", np.random.default_rng(seed), decoder="pyav").tobytes() for seed in range(4)
    }
    assert len(draws) > 1  # random frames
    seeded = [decode_video(video, 4, 32, "train", np.random.default_rng(7), decoder=d) for d in ("pyav", "decord")]
    assert np.abs(seeded[0].astype(int) - seeded[1]).mean() < 4  # the same frames from both decoders


def test_segment_sampling():
    eval_idx = segment_indices(100, 8, "eval")
    assert (eval_idx == segment_indices(100, 8, "eval")).all()
    edges = np.linspace(0, 100, 9)
    assert ((eval_idx >= edges[:-1]) & (eval_idx < edges[1:])).all()
    draws = np.stack([segment_indices(100, 8, "train", np.random.default_rng(s)) for s in range(50)])
    assert ((draws >= np.floor(edges[:-1])) & (draws < edges[1:])).all()  # one frame inside each segment
    assert all(len(set(draws[:, k])) > 5 for k in range(8))  # and random within it
    # fewer frames than asked: each segment takes the frame it falls in, in order (the clip is kept)
    assert segment_indices(5, 8, "eval").tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    short = segment_indices(5, 8, "train", np.random.default_rng(0))
    assert (np.diff(short) >= 0).all() and short.min() >= 0 and short.max() <= 4
    with pytest.raises(DecodeError, match="no frames"):
        segment_indices(0, 8, "eval")


@pytest.fixture()
def bad_inputs(tmp_path, synth_small, shared_data):
    """A video folder with one good clip and each kind of bad file, named by id."""
    videos, audios = tmp_path / "videos", tmp_path / "audios"
    videos.mkdir()
    audios.mkdir()
    real = shared_data / "real-clips" / "videos" / "video1.mp4"
    shutil.copy(real, videos / "good.mp4")
    (videos / "notvideo.mp4").write_text("this is not a video")
    (videos / "truncated.mp4").write_bytes(real.read_bytes()[: real.stat().st_size // 3])
    shutil.copy(synth_small["videos"] + "/synth00000.mp4", videos / "noaudio.mp4")  # no audio track
    shutil.copy(synth_small["videos"] + "/synth00001.mp4", videos / "silent.mp4")
    n = 16000
    import wave

    with wave.open(str(audios / "silent.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\0" * n)
    ids = ["good", "notvideo", "truncated", "missing", "noaudio", "silent"]
    (tmp_path / "ann.json").write_text(json.dumps([{"video_id": i, "desc": f"clip {i}"} for i in ids]))
    return tmp_path


def test_each_bad_input_is_skipped_with_its_reason(bad_inputs, ray_session):
    data = DataConfig(max_failure_share=1.0)
    report = preprocess(
        bad_inputs / "ann.json", bad_inputs / "videos", bad_inputs / "out", data, audio_dir=bad_inputs / "audios"
    )
    reasons = {s["id"]: s["reason"] for s in report["rows_skipped"]}
    assert report["rows_written"] == 1 and set(reasons) == {"notvideo", "truncated", "missing", "noaudio", "silent"}
    assert "not a readable video" in reasons["notvideo"]
    assert "truncated" in reasons["truncated"]
    assert "not found" in reasons["missing"]
    assert "audio" in reasons["noaudio"] and "silent" in reasons["silent"]

    from tiny import cached_frames

    rows = read_cache(str(bad_inputs / "out" / "shards")).take_all()
    assert [r["id"] for r in rows] == ["good"] and cached_frames(rows[0]).shape == (8, 3, 224, 224)


def test_missing_audio_kept_with_flag_when_allowed(bad_inputs, ray_session):
    data = DataConfig(max_failure_share=1.0)
    data.audio.missing = "silence"
    report = preprocess(
        bad_inputs / "ann.json", bad_inputs / "videos", bad_inputs / "out", data, audio_dir=bad_inputs / "audios"
    )
    rows = {r["id"]: r for r in read_cache(str(bad_inputs / "out" / "shards")).take_all()}
    assert set(rows) == {"good", "noaudio", "silent"} and report["rows_written"] == 3
    assert rows["good"]["has_audio"] and not rows["noaudio"]["has_audio"] and not rows["silent"]["has_audio"]


def test_too_many_failures_stop_with_a_clear_message_and_keep_the_good_rows(bad_inputs, ray_session):
    out = bad_inputs / "out"
    with pytest.raises(PreprocessError, match="max_failure_share"):
        preprocess(bad_inputs / "ann.json", bad_inputs / "videos", out, DataConfig(), audio_dir=bad_inputs / "audios")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and len(report["rows_skipped"]) == 5
    assert list((out / "shards").glob("*.parquet"))  # the good clip is not lost


def test_cache_reused_unless_forced_or_changed(synth_small, ray_session, tmp_path):
    data = DataConfig()
    data.video.size, data.audio.window_frames = 32, 256
    args = (synth_small["val"], synth_small["videos"], tmp_path / "cache")
    first = preprocess(*args, data, audio_dir=synth_small["audios"])
    assert first["rows_written"] == len(read_annotations(synth_small["val"])) == 8 and "reused" not in first
    again = preprocess(*args, data, audio_dir=synth_small["audios"])
    assert again["reused"] and again["cache_key"] == first["cache_key"]
    assert "reused" not in preprocess(*args, data, audio_dir=synth_small["audios"], force=True)
    data.video.num_frames = 4
    assert "reused" not in preprocess(*args, data, audio_dir=synth_small["audios"])


@pytest.mark.parametrize("index", [0, 12, 99_999, 100_000, 100_012, 27_000_000])
def test_a_piece_name_reads_back_as_its_index_at_any_count(index):
    name = _shard_name(index)
    for file in (name, name + ".json", name + ".parquet", name + "-0003.parquet"):
        assert _piece_index(file) == index, file


def test_a_resume_past_100000_pieces_finds_exactly_the_pieces_done(tmp_path):
    """The done records of a split of VAST-27M's size: each piece is found by its own index (5-digit names once read
    shard-100012 as piece 10001: a resume skipped pieces it never wrote and redid others)."""
    out = str(tmp_path)
    done = [12, 10_001, 99_999, 100_000, 100_012, 1_000_000]
    for index in done:
        record_done(out, _shard_name(index), {"cache_key": "k", "written": 1})
    record_done(out, _shard_name(100_013), {"cache_key": "other inputs", "written": 1})
    assert sorted(_done_shards(out, "k")) == done


def test_a_training_cache_shard_holds_about_shard_mb_with_its_draws():
    """A training cache keeps train_draws draws of each clip's frames: its shards hold that many fewer clips, so a
    shard (and the decode worker's buffer) stays about data.shard_mb; counting one draw made them draws x bigger."""
    data = DataConfig()
    data.audio.format = "none"
    data.video.cache_codec = "raw"
    data.video.train_draws = 4
    once = rows_per_shard(data, "eval")
    assert rows_per_shard(data, "train") == once // 4
    frame_bytes = data.video.num_frames * 3 * data.video.size**2
    assert rows_per_shard(data, "train") * 4 * frame_bytes <= data.shard_mb * 2**20


def test_a_stray_file_among_the_pieces_is_named():
    with pytest.raises(ValueError, match="shard-notes.txt is not a cache piece's name"):
        _piece_index("shard-notes.txt")


def test_cache_stores_tensors_as_fixed_size_binary_and_reads_them_back(synth_small, ray_session, tmp_path):
    """Parquet holds one plain binary value per clip (fast to read); read_cache gives the tensors back exactly.
    (Frames stored raw, data.video.cache_codec: raw; test_a_jpeg_cache_... covers the default.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = DataConfig()
    data.video.size, data.audio.window_frames, data.video.cache_codec = 32, 256, "raw"
    data.audio.cache_codec = "float32"
    preprocess(synth_small["val"], synth_small["videos"], tmp_path / "c", data, audio_dir=synth_small["audios"])
    schema = pq.read_schema(next((tmp_path / "c" / "shards").glob("*.parquet")))
    assert schema.field("frames").type == pa.binary(8 * 3 * 32 * 32)
    assert schema.field("audio_fbank").type == pa.binary(4 * 256 * 64)
    rows = {r["id"]: r for r in read_cache(str(tmp_path / "c" / "shards")).take_all()}
    manifest = read_annotations(synth_small["val"])
    resolve_media(manifest, synth_small["videos"], synth_small["audios"])
    for row in manifest:
        assert np.array_equal(rows[row.id]["frames"], decode_video(row.video_path, 8, 32, "eval"))
        fbank = decode_audio(row.audio_path, None, data.audio)
        assert rows[row.id]["audio_fbank"].dtype == np.float32 and np.array_equal(rows[row.id]["audio_fbank"], fbank)
        assert list(rows[row.id]["captions"]) == row.captions


@pytest.mark.ray
@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_training_cache_keeps_several_frame_draws_and_each_epoch_uses_one(codec, synth_small, ray_session, tmp_path):
    """Whichever codec stores them, a training cache keeps 3 draws of each clip and Collate gives each epoch one
    of them, chosen by (seed, epoch, clip); a JPEG cache decodes only the chosen draw."""
    from tiny import cached_frames, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab

    cfg = tiny_config("data.video.train_draws=3", f"data.video.cache_codec={codec}")
    report = preprocess(
        synth_small["train"], synth_small["videos"], tmp_path / "c", cfg.data, audio_dir=synth_small["audios"],
        mode="train",
    )  # fmt: skip
    rows = read_cache(str(tmp_path / "c" / "shards")).take_batch(report["rows_written"], batch_format="numpy")
    v = cfg.data.video
    draws = np.stack([cached_frames({k: rows[k][i] for k in rows}) for i in range(len(rows["id"]))])
    if codec == "jpeg":
        draws = draws.reshape(len(rows["id"]), 3, v.num_frames, 3, v.size, v.size)
    assert draws.shape[1:] == (3, v.num_frames, 3, v.size, v.size)  # [draws, N, 3, S, S] a clip
    assert not np.array_equal(draws[:, 0], draws[:, 1])  # independent random frames
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    epochs = [Collate(cfg, vocab, train=True, epoch=e)(rows)["frames"] for e in (0, 1, 0)]
    assert torch.equal(epochs[0], epochs[2]) and not torch.equal(epochs[0], epochs[1])  # (seed, epoch, clip)
    assert epochs[0].shape[1:] == (v.num_frames, 3, v.size, v.size)
    for i in range(len(rows["id"])):  # each clip's frames are one of its draws
        assert any(torch.equal(epochs[1][i], torch.from_numpy(np.array(draws[i, d]))) for d in range(3))
    val = Collate(cfg, vocab, train=False)(rows)["frames"]
    assert torch.equal(val, torch.from_numpy(draws[:, 0]))


def test_synthetic_val_captions_unique_and_need_the_audio(synth_small):
    entries = json.loads(open(synth_small["all"]).read())
    val = [e["attributes"] for e in entries if e["split"] == "val"]
    full = Counter(tuple(sorted(a.items())) for a in val)
    assert max(full.values()) == 1  # every val caption identifies exactly one clip
    visual = Counter((a["shape"], a["colour"], a["direction"]) for a in val)
    assert min(visual.values()) >= len(AUDIO_COMBOS) == 4  # by text + video alone, >= 4 clips fit
    assert {e["split"] for e in entries} == {"train", "val"}


def test_synthetic_clips_decode_with_audible_audio(synth_small):
    rows = read_annotations(synth_small["val"])
    resolve_media(rows, synth_small["videos"], synth_small["audios"])
    frames = decode_video(rows[0].video_path, 8, 64, "eval")
    assert frames.shape == (8, 3, 64, 64) and frames.std() > 5
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).sum() > 0  # the shape moves
    assert decode_audio(rows[0].audio_path, None, AudioConfig()).std() > 0.1


def test_beats_front_end_reproduces_grams_filterbank(shared_data):
    import torch

    ref = torch.load(shared_data / "gram-reference" / "beats_tiny.pt", weights_only=True)["reference"]
    cfg = AudioConfig(frontend="beats", window_frames=1024, windows=1)
    ours = fbank_windows(ref["waveform"][0].numpy(), cfg, mode="eval")
    np.testing.assert_allclose(ours, ref["gram_fbank"].numpy(), atol=1e-4)


def test_ast_and_beats_front_ends_use_their_own_recipes():
    import torch
    import torchaudio.compliance.kaldi as kaldi

    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(np.arange(16000) * 0.05) + 0.1 + 0.01 * rng.standard_normal(16000)).astype(np.float32)
    ast = fbank_windows(wave, AudioConfig(frontend="ast", window_frames=128), mode="eval")[0, :98]
    beats = fbank_windows(wave, AudioConfig(frontend="beats", window_frames=128), mode="eval")[0, :98]
    w = torch.from_numpy(wave)[None]
    expected_ast = kaldi.fbank(
        w - w.mean(),
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=64,
        dither=0.0,
        frame_shift=10,
    )
    expected_beats = kaldi.fbank(w * 2**15, num_mel_bins=64, sample_frequency=16000, frame_length=25, frame_shift=10)
    np.testing.assert_allclose(ast, ((expected_ast + 4.2677393) / (2 * 4.5689974)).numpy(), atol=1e-5)
    np.testing.assert_allclose(beats, ((expected_beats - 15.41663) / (2 * 6.55582)).numpy(), atol=1e-4)


def test_audio_windows_random_in_training_middle_in_evaluation():
    cfg = AudioConfig(window_frames=100, windows=2)
    # 950 frames -> padded to 10 slices of 100 -> two runs of 5: the middle slices are 2 and 7.
    assert window_starts(950, cfg, "eval") == [200, 700]
    draws = {tuple(window_starts(950, cfg, "train", np.random.default_rng(s))) for s in range(200)}
    assert {a for a, _ in draws} == {0, 100, 200, 300, 400} and {b for _, b in draws} == {500, 600, 700, 800, 900}
    assert window_starts(950, cfg.model_copy(update={"train_windows": "middle"}), "train") == [200, 700]
    # A filterbank ending on a slice boundary gets one more (zero) slice, as in GRAM's code.
    assert window_starts(1000, AudioConfig(window_frames=100, windows=1), "eval") == [500]


def test_cache_key_follows_the_audio_front_end(synth_small):
    rows = read_annotations(synth_small["val"])
    resolve_media(rows, synth_small["videos"], synth_small["audios"])
    keys = {
        cache_key(synth_small["val"], rows, DataConfig(audio=AudioConfig(frontend=f)), "eval") for f in ("ast", "beats")
    }
    assert len(keys) == 2


def test_seed_protocol_scores_first_captions_of_videos_with_audio():
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.schema import object_column
    from gram_ray.data.text import build_word_vocab

    cfg = tiny_config("model.modalities=[text,video]")
    rows = random_rows(cfg, 4)
    rows["captions"] = object_column([[f"first {i}", f"second {i}"] for i in range(4)])
    rows["has_audio"] = np.array([True, False, True, True])
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    every = Collate(cfg, vocab, train=False)(rows)
    assert len(every["ids"]) == 4 and len(every["text_to_video"]) == 8  # all: every caption, every video
    cfg.eval.protocol = "seed"
    seed = Collate(cfg, vocab, train=False)(rows)
    assert seed["ids"] == ["c0", "c2", "c3"] and seed["text_to_video"].tolist() == [0, 1, 2]


def test_audio_is_read_by_ffmpeg_through_pyav_without_growing_the_process(synth_small, shared_data, monkeypatch):
    """decord 0.6.0's AudioReader never frees its output (~0.13 MB a clip, without bound: a decode worker grew to
    2.5 GB over 10,000 clips); PyAV reads the same 16 kHz samples and keeps nothing."""
    import gram_ray.data.audio as audio

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

    rows = read_annotations(synth_small["all"])
    resolve_media(rows, synth_small["videos"], synth_small["audios"])
    wav = rows[0].audio_path
    ours = audio.load_waveform(wav, 16000)
    monkeypatch.setattr(audio, "pyav_or_none", lambda: None)  # decord, as on an image without PyAV
    np.testing.assert_array_equal(ours, audio.load_waveform(wav, 16000))  # a 16 kHz file: the same samples
    monkeypatch.undo()
    before = rss_mb()
    for _ in range(300):
        audio.load_waveform(wav, 16000)
    assert rss_mb() - before < 8  # decord: ~39 MB for these 300 reads
    # A video's own AAC track at 44.1 kHz, resampled, as from its separate MP3.
    video = str(shared_data / "real-clips" / "videos" / "video1.mp4")
    track = audio.load_waveform(video, 16000)
    assert abs(len(track) / 16000 - 4.39) < 0.05 and np.isfinite(track).all() and 0.1 < np.abs(track).max() <= 2
