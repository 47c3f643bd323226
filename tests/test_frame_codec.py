"""The JPEG frame cache (data.video.cache_codec: jpeg): its size and fidelity on real clips at GRAM's settings,
the cache it writes, and the two places frames are decoded (the collate function on CPU; the training loop on
the device, decode_device: cuda, here run on CPU; tests/test_gpu.py decodes on a GPU)."""

import numpy as np
import pytest
import torch

from gram_ray.data.frame_codec import decode_jpegs, encode_frames
from gram_ray.data.video import decode_video


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float(10 * np.log10(255**2 / mse))


def test_jpeg_frames_of_real_clips_at_msrvtt_settings_are_under_a_fifth_of_raw_and_above_35_db(shared_data):
    """configs/msrvtt.yaml's cache: 4 draws of 4 frames at 224 px a clip, JPEG quality 90 (the default)."""
    rng = np.random.default_rng(0)
    raw_bytes = jpeg_bytes = 0
    worst = np.inf
    for path in sorted((shared_data / "real-clips" / "videos").glob("*.mp4")):
        frames = np.stack([decode_video(str(path), 4, 224, "train", rng) for _ in range(4)])  # [draws, N, 3, S, S]
        jpegs = encode_frames(frames, quality=90)
        assert len(jpegs) == 16
        decoded = decode_jpegs([jpegs]).numpy().reshape(frames.shape)
        raw_bytes += frames.nbytes
        jpeg_bytes += sum(len(j) for j in jpegs)
        worst = min(
            worst,
            min(
                psnr(d, f)
                for d, f in zip(decoded.reshape(-1, 3, 224, 224), frames.reshape(-1, 3, 224, 224), strict=True)
            ),
        )
    assert raw_bytes == 4 * 2_408_448  # 4 x 4 x 224 x 224 x 3 bytes a clip
    assert jpeg_bytes / raw_bytes < 0.2, jpeg_bytes / raw_bytes  # measured 0.074 (README)
    assert worst >= 35, worst  # measured 40.8 dB for the worst frame


@pytest.mark.ray
def test_a_jpeg_cache_stores_one_jpeg_per_frame_and_trains_on_the_same_frames_wherever_decoded(
    synth_small, ray_session, tmp_path
):
    """The default codec: the cache holds a list of JPEGs per clip (no raw frames column), 2 draws x 2 frames; the
    collate function decodes the epoch's draw on CPU, and with decode_device: cuda it leaves them for the loop's
    device transfer to decode: the same frames either way."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny import tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.parquet_layout import read_cache
    from gram_ray.data.preprocess import preprocess
    from gram_ray.data.schema import FRAMES_JPEG
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.device import to_device

    cfg = tiny_config("data.video.train_draws=2")
    assert cfg.data.video.cache_codec == "jpeg" and cfg.data.video.jpeg_quality == 90
    out = tmp_path / "cache"
    report = preprocess(synth_small["train"], synth_small["videos"], out, cfg.data, audio_dir=synth_small["audios"],
                        mode="train")  # fmt: skip
    assert FRAMES_JPEG in report["columns"] and "frames" not in report["columns"]
    schema = pq.read_schema(next((out / "shards").glob("*.parquet")))
    assert schema.field(FRAMES_JPEG).type == pa.list_(pa.binary()) and "frames" not in schema.names
    rows = read_cache(str(out / "shards")).take_batch(report["rows_written"], batch_format="numpy")
    assert {len(j) for j in rows[FRAMES_JPEG]} == {2 * cfg.data.video.num_frames}
    assert all(bytes(j[:2]) == b"\xff\xd8" for clip in rows[FRAMES_JPEG] for j in clip)  # JPEG's start marker
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    on_cpu = Collate(cfg, vocab, train=True, epoch=1)(rows)
    v = cfg.data.video
    assert on_cpu["frames"].dtype == torch.uint8 and on_cpu["frames"].shape[1:] == (v.num_frames, 3, v.size, v.size)
    cfg.data.video.decode_device = "cuda"
    left = Collate(cfg, vocab, train=True, epoch=1)(rows)
    assert "frames" not in left and len(left[FRAMES_JPEG]) == len(rows["id"])  # undecoded: JPEG bytes, per clip
    decoded = to_device(left, torch.device("cpu"))  # the loop's transfer: one batched decode on its device
    assert torch.equal(decoded["frames"], on_cpu["frames"])


def test_a_raw_cache_stays_valid_whatever_the_jpeg_settings_and_jpeg_settings_key_jpeg_caches():
    from gram_ray.config import DataConfig
    from gram_ray.data.preprocess import cache_key

    def key(**video):
        data = DataConfig()
        for k, v in video.items():
            setattr(data.video, k, v)
        return cache_key(__file__, [], data, "train")

    raw = key(cache_codec="raw")
    assert key(cache_codec="raw", jpeg_quality=75, decode_device="cuda") == raw  # a raw cache is kept
    assert key(cache_codec="jpeg") != raw and key(cache_codec="jpeg", jpeg_quality=75) != key(cache_codec="jpeg")
    assert key(cache_codec="jpeg", decode_device="cuda") == key(cache_codec="jpeg")  # where it decodes: not content
