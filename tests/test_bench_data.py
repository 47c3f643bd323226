"""`gram-ray bench data` (the input pipeline alone) and the FLOPs a clip it takes a GPU's rate from."""

import json

import pytest
import torch
from click.testing import CliRunner

from gram_ray.cli import main


def test_training_flops_counted_on_the_meta_device_are_those_of_a_real_forward_pass():
    """The meta-device count (no weights, no GPU) is what a real forward of the same shapes executes; attention
    through the math kernel, whose matmuls the counter sees (it has no formula for CPU's fused kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from gram_ray.bench.common import bench_vocab
    from gram_ray.config import load_config
    from gram_ray.demo import DEMO_CONFIG
    from gram_ray.model.gram import build_model
    from gram_ray.train.memory import _step_forward, training_flops_per_clip

    for overrides in ([], ["model.gradient_checkpointing=true"]):
        cfg = load_config(DEMO_CONFIG, overrides)
        forward, training = training_flops_per_clip(cfg)
        assert training == forward * (4 if overrides else 3)
    vocab = bench_vocab(cfg)
    model = build_model(cfg, vocab)
    model.vision.augment = "none"
    b, d, length = 4, cfg.data, cfg.model.max_text_length
    batch = {
        "input_ids": torch.randint(5, len(vocab), (b, length)),
        "attention_mask": None,
        "frames": torch.randint(0, 255, (b, d.video.num_frames, 3, d.video.size, d.video.size), dtype=torch.uint8),
        "audio_fbank": torch.randn(b, d.audio.windows, d.audio.window_frames, d.audio.mel_bins),
    }
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _step_forward(model, batch)
    assert counter.get_total_flops() == forward * b


@pytest.mark.ray
def test_bench_data_times_each_stage_of_each_codec_read_from_a_bucket(ray_session, s3, tmp_path):
    bucket = s3.bucket()
    train = tmp_path / "train.json"  # what `bench train --json` writes, as far as bench data reads it
    train.write_text(json.dumps({"hardware": "NVIDIA A10G", "paths": {"plain": {"samples_per_s": 90.0},
                                                                      "ray": {"samples_per_s": 80.0}}}))  # fmt: skip
    out = tmp_path / "data.json"
    args = ["bench", "data", "--batches", "2", "--reps", "1", "--set", "train.batch_size=8", "--storage", bucket]
    result = CliRunner().invoke(main, [*args, "--train-json", str(train), "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["gpu_rate"]["clips_per_s"] == 80.0 and "path ray on NVIDIA A10G" in payload["gpu_rate"]["source"]
    raw, jpeg = payload["variants"]["raw, decode on cpu"], payload["variants"]["jpeg, decode on cpu"]
    compact = payload["variants"]["jpeg, uint8 audio, decode on cpu"]  # data.audio.cache_codec: uint8
    assert (raw["codec"], jpeg["codec"], compact["codec"]) == ("raw", "jpeg", "jpeg")
    for v in (raw, jpeg, compact):
        assert v["clips"] == 16
        rates = v["clips_per_s"]
        assert set(rates) == {"read", "decode", "collate", "to_device", "pipeline"} and min(rates.values()) > 0
        # One core does read, decode and collate one after another: their rates combine as a harmonic sum.
        per_clip = sum(1 / rates[s] for s in ("read", "decode", "collate"))
        assert v["cpu_clips_per_s_per_core"] == pytest.approx(1 / per_clip)
        assert v["cores_per_gpu"] == pytest.approx(80.0 * per_clip)
    assert compact["stored_bytes_per_clip"] < jpeg["stored_bytes_per_clip"] < raw["stored_bytes_per_clip"]
    assert payload["augment_clips_per_s"] > 0
    assert "cores/GPU" in result.output and "one GPU trains on 80.0 clips/s" in result.output
    # The synthetic caches were the benchmark's own: nothing is left in the bucket.
    from gram_ray import storage

    assert storage.list_files(bucket + "/bench-data-raw/shards") == []


def test_bench_data_says_what_is_wrong_with_a_cache_or_a_gpu(tmp_path):
    result = CliRunner().invoke(main, ["bench", "data", "--cache", str(tmp_path)])
    assert result.exit_code != 0 and "no Parquet shards under" in result.output
    result = CliRunner().invoke(main, ["bench", "data", "--gpu", "GTX 480"])
    assert result.exit_code != 0 and "no known bf16 peak for a GPU named 'GTX 480'" in result.output
