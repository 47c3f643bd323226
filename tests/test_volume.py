import numpy as np
import pytest
import torch
from oracle import det_volume, mp_volume

from gram_ray.volume import aligned_volume, gram_volume


def _inputs(k, b1=7, b2=9, d=24, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Unnormalised on purpose: the volume must not assume unit vectors.
    anchor = torch.randn(b1, d, generator=g, dtype=dtype) * 2.5
    others = [torch.randn(b2, d, generator=g, dtype=dtype) * 0.7 for _ in range(k - 1)]
    return anchor, others


def _make_near_degenerate(anchor, others, noise, seed=1):
    """Row i of the anchor = a combination of sample i's other vectors + small noise: a near-zero positive."""
    g = torch.Generator().manual_seed(seed)
    for i in range(min(anchor.shape[0], others[0].shape[0])):
        combo = sum((m + 1.5) * o[i] for m, o in enumerate(others))
        anchor[i] = combo + noise * torch.randn(anchor.shape[1], generator=g, dtype=anchor.dtype)
    return anchor


def _rel_err(x, ref):
    return ((x.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_matches_determinant_oracle(k, dtype, tol):
    anchor, others = _inputs(k, dtype=dtype)
    vol = gram_volume(anchor, *others)
    assert vol.shape == (7, 9) and vol.dtype == dtype
    assert _rel_err(vol, det_volume(anchor, *others)) < tol


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype,tol,noise", [(torch.float64, 1e-9, 1e-2), (torch.float32, 1e-4, 1e-2)])
def test_near_degenerate_positives_match_oracle(k, dtype, tol, noise):
    anchor, others = _inputs(k, dtype=dtype)
    anchor = _make_near_degenerate(anchor, others, noise)
    vol = gram_volume(anchor, *others)
    ref = det_volume(anchor, *others)
    assert vol.diag()[:7].max() < 0.2 * vol.mean()  # the positives really are near zero
    assert _rel_err(vol, ref) < tol


@pytest.mark.parametrize("k", [3, 5])
def test_very_degenerate_positives_match_high_precision(k):
    # 1e-6 noise: the float64 determinant itself loses ~1e-7; compare with 50-digit arithmetic instead.
    anchor, others = _inputs(k, dtype=torch.float64)
    anchor = _make_near_degenerate(anchor, others, 1e-6)
    vol = gram_volume(anchor, *others)
    for i, j in [(0, 0), (3, 3), (6, 6), (2, 5)]:
        ref = mp_volume([anchor[i]] + [o[j] for o in others])
        assert abs(vol[i, j].item() - ref) / ref < 1e-9


def test_float32_near_degenerate_relative_to_high_precision():
    anchor, others = _inputs(3, dtype=torch.float32)
    anchor = _make_near_degenerate(anchor, others, 1e-3)
    vol = gram_volume(anchor, *others)
    for i in range(4):
        ref = mp_volume([anchor[i]] + [o[i] for o in others])
        assert abs(vol[i, i].item() - ref) / ref < 1e-4


def test_real_gram_embeddings_match_oracle(shared_data):
    emb = {
        name: torch.from_numpy(np.load(shared_data / "gram-msrvtt-embeddings" / f"{name}.npy"))
        for name in ("text", "video", "audio", "subtitles")
    }
    text = emb["text"][:300]
    for others in ([emb["video"]], [emb["video"], emb["audio"]], [emb["video"], emb["audio"], emb["subtitles"]]):
        vol = gram_volume(text, *others)
        assert vol.shape == (300, 884)
        assert _rel_err(vol, det_volume(text, *others)) < 1e-4
        vol64 = gram_volume(text.double(), *[o.double() for o in others])
        assert _rel_err(vol64, det_volume(text, *others)) < 1e-9


def test_half_inputs_compute_in_float32():
    anchor, others = _inputs(3, dtype=torch.float32)
    vol = gram_volume(anchor.bfloat16(), *[o.bfloat16() for o in others])
    assert vol.dtype == torch.float32
    ref = det_volume(anchor.bfloat16().float(), *[o.bfloat16().float() for o in others])
    assert _rel_err(vol, ref) < 1e-4


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_gradcheck_float64(k):
    anchor, others = _inputs(k, b1=3, b2=4, d=6)
    inputs = [t.clone().requires_grad_() for t in (anchor, *others)]
    assert torch.autograd.gradcheck(lambda a, *o: gram_volume(a, *o), inputs)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("degenerate", [False, True])
def test_gradients_match_oracle(k, degenerate):
    anchor, others = _inputs(k)
    if degenerate:  # exercises the float64 refinement path's gradient
        anchor = _make_near_degenerate(anchor, others, 1e-2)
    weights = torch.randn(7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(fn):
        inputs = [t.clone().requires_grad_() for t in (anchor, *others)]
        (fn(*inputs) * weights).sum().backward()
        return [t.grad for t in inputs]

    for ours, ref in zip(grads(gram_volume), grads(det_volume), strict=True):
        assert torch.allclose(ours, ref, rtol=1e-7, atol=1e-9)


def test_zero_volume_is_finite_forward_and_backward():
    v = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    scale = v.norm(dim=-1).max() ** 3  # a k=3 volume scales with the cube of the vectors' length
    anchor = v.clone().requires_grad_()
    video = v.clone().requires_grad_()
    audio = (2 * v).requires_grad_()  # collinear with video: the clip's own span is degenerate too
    vol = gram_volume(anchor, video, audio)
    assert torch.isfinite(vol).all()
    assert vol.abs().max() < 1e-6 * scale  # zero up to float32 rounding
    vol.sum().backward()
    for t in (anchor, video, audio):
        assert torch.isfinite(t.grad).all()

    tuples = aligned_volume(anchor, video)
    assert torch.isfinite(tuples).all() and tuples.abs().max() < 1e-6 * scale
    tuples.sum().backward()
    assert torch.isfinite(anchor.grad).all()


@pytest.mark.parametrize("k", [2, 3, 5])
def test_aligned_volume_is_the_diagonal(k):
    anchor, others = _inputs(k, b1=9, b2=9)
    assert torch.allclose(aligned_volume(anchor, *others), gram_volume(anchor, *others).diag(), rtol=1e-10)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), torch.randn(6, 8)), "same batch size"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), torch.randn(5, 7)), "feature dimension"),
        (lambda: (torch.randn(4, 8),), "k >= 2"),
        (lambda: (torch.randn(4, 8), torch.ones(5, 8, dtype=torch.long)), "floating-point"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8, 2)), "2-D"),
    ],
)
def test_bad_input_names_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        gram_volume(*make())


def test_aligned_volume_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="same batch size"):
        aligned_volume(torch.randn(4, 8), torch.randn(5, 8))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_static_refinement_matches_oracle_without_a_host_sync(k, dtype, tol):
    # Each row's positive is near zero: a per-row budget of 2 pairs covers it, with fixed shapes.
    anchor, others = _inputs(k, dtype=dtype)
    anchor = _make_near_degenerate(anchor, others, 1e-2)
    stats = {}
    vol = gram_volume(anchor, *others, refine=2, stats=stats)
    assert _rel_err(vol, det_volume(anchor, *others)) < tol
    assert stats["refine_overflow"].item() == 0
    if dtype == torch.float32:  # float32 cannot trust the GEMM form on any of the 7 positives
        assert stats["refine_flagged"].item() >= 7


def test_static_refinement_counts_what_exceeds_its_budget():
    # Every clip of row 0 is a near-duplicate of its span: 9 flagged pairs in that row, a budget of 3.
    anchor, others = _inputs(3, dtype=torch.float32)
    others = [o.clone() for o in others]
    for j in range(9):
        others[1][j] = others[0][j] * (1 + j / 10)
    anchor[0] = others[0][0] * 2 + 1e-3 * torch.randn(24)
    stats = {}
    gram_volume(anchor, *others, refine=3, stats=stats)
    assert stats["refine_overflow"].item() > 0


@pytest.mark.slow
def test_compiled_loss_has_no_graph_breaks_and_matches_eager():
    from gram_ray.loss import VolumeContrastiveLoss

    anchor, others = _inputs(3, b1=8, b2=8, dtype=torch.float32)
    anchor = _make_near_degenerate(anchor, others, 1e-2)
    inputs = [t.clone().requires_grad_() for t in (anchor, *others)]
    compiled = VolumeContrastiveLoss(compile=True)  # fullgraph=True: a graph break is an error
    out = compiled.compute(*inputs)
    out.loss.backward()
    reference = [t.detach().clone().requires_grad_() for t in (anchor, *others)]
    expected = VolumeContrastiveLoss().compute(*reference)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(inputs, reference, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
    assert out.refine_overflow.item() == 0
    # and exact against the oracle on the near-degenerate positives, where float32 alone loses digits
    oracle = det_volume(anchor.double(), *[o.double() for o in others]).diagonal()
    assert _rel_err(out.positive_volume, oracle) < 1e-4


def test_autocast_keeps_the_volume_in_float32():
    # Under bf16 autocast the GEMMs would run in bf16 (8 bits of mantissa) and the near-zero positives lose
    # every digit; the volume opts out of autocast and stays within float32's error.
    anchor, others = _inputs(3, dtype=torch.float32)
    anchor = _make_near_degenerate(anchor, others, 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vol = gram_volume(anchor, *others)
    assert vol.dtype == torch.float32
    assert _rel_err(vol, det_volume(anchor, *others)) < 1e-4
