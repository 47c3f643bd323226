"""Checks that need a CUDA GPU: `pytest -m gpu` (skipped without one). `make gpu-check` runs them on the first
GPU machine that comes along; what they cover cannot be shown on CPU: NCCL's collectives, bf16 autocast's
GEMMs, and compiled kernels on the device."""

import numpy as np
import pytest
import torch
from ddp_worker import Towers, batch, grads, run_ranks
from oracle import det_volume
from tiny import tiny_config

from gram_ray.data.collate import Collate, epoch_batches
from gram_ray.data.schema import object_column
from gram_ray.data.text import build_word_vocab
from gram_ray.loss import VolumeContrastiveLoss
from gram_ray.train.loop import run_training
from gram_ray.volume import gram_volume

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these)"),
]


def _near_degenerate(k=3, b=16, d=64, seed=0):
    """Float32 embeddings where every positive pair is nearly flat (volume ~1e-2): the case low precision ruins."""
    g = torch.Generator().manual_seed(seed)
    others = [torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1) for _ in range(k - 1)]
    anchor = sum((m + 1.5) * o for m, o in enumerate(others)) + 1e-2 * torch.randn(b, d, generator=g)
    return torch.nn.functional.normalize(anchor, dim=-1), others


def test_bf16_autocast_keeps_the_volume_float32_and_exact():
    anchor, others = _near_degenerate()
    expected = det_volume(anchor.double(), *[o.double() for o in others])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vol = gram_volume(anchor.cuda(), *[o.cuda() for o in others])
    assert vol.dtype == torch.float32
    rel = ((vol.double().cpu() - expected).abs() / expected.abs()).max().item()
    assert rel < 1e-4, rel


def test_compiled_loss_matches_eager_on_gpu():
    anchor, others = _near_degenerate(b=64)
    compiled_inputs = [t.cuda().requires_grad_() for t in (anchor, *others)]
    eager_inputs = [t.cuda().requires_grad_() for t in (anchor, *others)]
    out = VolumeContrastiveLoss(compile=True).cuda().compute(*compiled_inputs)  # fullgraph: no graph breaks
    out.loss.backward()
    expected = VolumeContrastiveLoss().cuda().compute(*eager_inputs)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_inputs, eager_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
    assert out.refine_overflow.item() == 0


def test_exact_gather_under_nccl_equals_full_batch_gradients(tmp_path):
    ddp, results = run_ranks("exact", tmp_path, backend="nccl")
    errors = "\n".join(err[-3000:] for code, err in results if code != 0)
    if errors and torch.cuda.device_count() < 2 and "Duplicate GPU" in errors:
        pytest.skip(
            "NCCL refuses two ranks on one GPU (ncclInvalidUsage: Duplicate GPU detected); the NCCL gather needs "
            "2 GPUs. The same code is checked under gloo on CPU."
        )
    assert not errors, errors
    reference = Towers("exact")
    reference(*batch()).backward()
    expected = grads(reference)
    assert ddp.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ddp[name], expected[name], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("precision", ["train.bf16=true", "train.fp16=true"])
def test_training_loop_runs_on_gpu_in_half_precision(precision):
    cfg = tiny_config("train.epochs=1", "train.time_steps=true", precision)
    n, v, a = 16, cfg.data.video, cfg.data.audio
    rng = np.random.default_rng(0)
    captions = [[f"clip {i} shows a {['red', 'blue'][i % 2]} shape"] for i in range(n)]
    rows = {
        "id": np.array([f"c{i}" for i in range(n)], dtype=object),
        "captions": object_column(captions),
        "frames": rng.integers(0, 256, (n, v.num_frames, 3, v.size, v.size), dtype=np.uint8),
        "audio_fbank": rng.standard_normal((n, a.windows, a.window_frames, a.mel_bins)).astype(np.float32),
        "has_audio": np.ones(n, dtype=bool),
    }
    vocab = build_word_vocab(c for caps in captions for c in caps)
    collate = Collate(cfg, vocab, train=True)
    reports = []
    last = run_training(
        cfg,
        train_batches=lambda epoch, skip: epoch_batches(rows, cfg.train.batch_size, collate, epoch, skip),
        val_batches=None,
        steps_per_epoch=n // cfg.train.batch_size,
        report=lambda metrics, checkpoint: reports.append(metrics),
        vocab=vocab,
        device=torch.device("cuda"),
    )
    assert last["step"] == n // cfg.train.batch_size
    assert np.isfinite(last["train/loss"])
    assert last["time/peak_gpu_mib"] > 0 and last["time/samples_per_s"] > 0


def test_fsdp_in_bf16_over_nccl_takes_the_unsharded_runs_steps_and_keeps_fp32_master_weights(tmp_path):
    """tests/test_fsdp.py's training-loop case (GRAM's encoders, DAM, gradient checkpointing, accumulation, an
    evaluation with reranking) on the GPU: FSDP2 over NCCL with bf16 mixed precision against the same run unsharded
    (bf16 autocast), one rank per GPU up to 2 (one rank on a one-GPU machine: the sharding hooks, the bf16 policy
    and the gathered checkpoint all still run). Losses agree to bf16's precision and the checkpoints hold fp32
    weights, so a resume continues from the master weights, not a bf16 copy."""
    world = min(2, torch.cuda.device_count())
    fsdp, results = run_ranks("loop-fsdp", tmp_path, backend="nccl", world=world, timeout=300)
    assert all(code == 0 for code, _ in results), [err[-3000:] for _, err in results]
    plain, results = run_ranks("loop-ddp", tmp_path, backend="nccl", world=world, timeout=300)
    assert all(code == 0 for code, _ in results), [err[-3000:] for _, err in results]
    assert [c["step"] for c in fsdp["checkpoints"]] == [c["step"] for c in plain["checkpoints"]] == [1, 2, 3, 4]
    for checkpoint in fsdp["checkpoints"]:
        assert {v.dtype for v in checkpoint["model"].values() if v.is_floating_point()} == {torch.float32}
    pairs = [(a["train/loss"], b["train/loss"]) for a, b in zip(plain["logged"], fsdp["logged"], strict=True)
             if "train/loss" in a]  # fmt: skip
    assert len(pairs) == 4 and all(abs(a - b) <= 0.05 * abs(a) for a, b in pairs), pairs


def test_jpeg_frames_decode_on_the_gpu_as_on_the_cpu():
    """data.video.decode_device: cuda: one batched nvjpeg call per batch gives the frames libjpeg-turbo gives on CPU
    (two IDCT implementations: equal to within a grey level or so, far above the 35 dB the codec keeps)."""
    from gram_ray.data.frame_codec import decode_jpegs, encode_frames

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 4, 3, 64, 64), dtype=np.uint8)
    frames[:, :, :, :32] //= 4  # some structure besides the noise
    clips = [encode_frames(clip, quality=90) for clip in frames]
    on_cpu = decode_jpegs(clips)
    on_gpu = decode_jpegs(clips, device="cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape == (2, 4, 3, 64, 64)
    difference = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert difference.float().mean() < 1.0 and difference.max() <= 8, (difference.float().mean(), difference.max())
