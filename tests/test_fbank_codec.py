"""The cache's filterbank at 8 bits (data.audio.cache_codec: uint8): its error bound, the whole real-clip cache
under a fifth of the raw cache, the same model batch as float32 give or take that error, and float32 caches kept."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import torch

from gram_ray.config import DataConfig, load_config
from gram_ray.data.fbank_codec import decode_fbank, encode_fbank


def test_each_window_is_mapped_onto_8_bits_within_its_bound():
    rng = np.random.default_rng(0)
    fbank = rng.normal(0.2, 0.5, (3, 2, 100, 64)).astype(np.float32)  # [clips, A, L, M]
    fbank[0, 1] = 0.75  # a constant window (silence padded to the same value): no division by zero
    q, value_range = encode_fbank(fbank)
    assert q.dtype == np.uint8 and q.shape == fbank.shape and value_range.shape == (3, 2, 2)
    back = decode_fbank(q, value_range)
    spread = value_range[..., 1] - value_range[..., 0]
    assert np.all(np.abs(back - fbank) <= spread[..., None, None] / 510 + 1e-6)
    assert np.array_equal(back[0, 1], fbank[0, 1])
    assert back.min() == fbank.min() and np.isclose(back.max(), fbank.max())  # the ends are exact


def _cache_bytes(data: DataConfig, clips: list, mode: str) -> tuple[int, dict]:
    from gram_ray.data.decode import ClipColumns, ClipInput, columns_to_arrow
    from gram_ray.data.parquet_layout import to_parquet_layout

    columns = ClipColumns(data, mode)
    for clip_id, video in clips:
        columns.decode(ClipInput(clip_id, ["a caption"], video=video), np.random.default_rng(0))
    stored = columns.cache_columns(subtitles=False)
    buffer = io.BytesIO()
    pq.write_table(to_parquet_layout(columns_to_arrow(stored)), buffer, use_dictionary=False)
    return buffer.tell(), columns.columns()


def test_the_whole_real_clip_cache_is_under_a_fifth_of_the_raw_cache(shared_data):
    """configs/msrvtt.yaml's data at 224 px and 4 frames, the shared real clips, as preprocessing writes them
    (Parquet, tensors as fixed-size binary): JPEG frames and uint8 filterbanks against raw frames and float32."""
    clips = [(f"video{i}", str(shared_data / "real-clips" / "videos" / f"video{i}.mp4")) for i in range(1, 5)]
    data = load_config("configs/msrvtt.yaml").data
    data.video.num_frames, data.video.size = 4, 224
    data.video.cache_codec, data.audio.cache_codec = "raw", "float32"
    raw, columns = _cache_bytes(data, clips, "eval")
    data.video.cache_codec, data.audio.cache_codec = "jpeg", "uint8"
    compact, _ = _cache_bytes(data, clips, "eval")
    assert compact <= raw / 5, (compact, raw)
    data.audio.cache_codec = "float32"
    jpeg_only, _ = _cache_bytes(data, clips, "eval")
    assert jpeg_only > raw / 5  # the frames alone do not get there: the float32 filterbank is most of what is left
    fbank = columns["audio_fbank"]
    error = np.abs(decode_fbank(*encode_fbank(fbank)) - fbank)
    assert error.max() < 0.01 and error.mean() < 0.005 and fbank.std() > 0.25


def test_collate_gives_the_model_float32_whichever_codec_stored_the_filterbank():
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.schema import AUDIO_FBANK_RANGE, AUDIO_FBANK_U8
    from gram_ray.data.text import build_word_vocab

    cfg = tiny_config()
    rows = random_rows(cfg, 4)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    as_float = Collate(cfg, vocab, train=True)(rows)
    packed = {k: v for k, v in rows.items() if k != "audio_fbank"}
    packed[AUDIO_FBANK_U8], packed[AUDIO_FBANK_RANGE] = encode_fbank(rows["audio_fbank"])
    as_u8 = Collate(cfg, vocab, train=True)(packed)
    assert as_u8["audio_fbank"].dtype == torch.float32 and as_u8["audio_fbank"].shape == as_float["audio_fbank"].shape
    spread = float(rows["audio_fbank"].max() - rows["audio_fbank"].min())
    assert torch.allclose(as_u8["audio_fbank"], as_float["audio_fbank"], atol=spread / 510 + 1e-6)


def test_a_float32_cache_stays_valid_and_the_codec_keys_the_cache():
    """A cache written before data.audio.cache_codec and data.audio.missing existed (float32, allow_missing) keeps
    its key: the key as those versions computed it."""
    import hashlib
    import json
    from pathlib import Path

    from gram_ray.data.preprocess import cache_key

    data = DataConfig()
    data.audio.cache_codec, data.audio.missing = "float32", "silence"
    before = hashlib.sha256(Path(__file__).read_bytes())
    audio = data.audio.model_dump(exclude={"cache_codec", "missing"}) | {"allow_missing": True}
    content = {"video": data.video.model_dump(exclude={"decode_device"}), "audio": audio}
    before.update(json.dumps([content, "train"], sort_keys=True).encode())
    assert cache_key(__file__, [], data, "train") == before.hexdigest()
    data.audio.cache_codec = "uint8"
    assert cache_key(__file__, [], data, "train") != before.hexdigest()
