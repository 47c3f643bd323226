import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_worker import MicroBatchTowers, Towers, batch, grads, micro_batches, run_ranks

from gram_ray.loss import VolumeContrastiveLoss
from gram_ray.volume import gram_volume


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_matches_hand_written_bidirectional_infonce():
    t, v, a = (_unit(8, 16, seed=s) for s in range(3))
    loss_fn = VolumeContrastiveLoss(temperature=0.05, label_smoothing=0.1).double()
    logits = -gram_volume(t, v, a) / 0.05
    target = torch.arange(8)
    expected = 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=0.1) + F.cross_entropy(logits.T, target, label_smoothing=0.1)
    )
    out = loss_fn.compute(t, v, a)
    assert torch.allclose(out.loss, expected, rtol=1e-6)  # the temperature is initialised in float32
    assert torch.allclose(out.positive_volume, gram_volume(t, v, a).diag(), rtol=1e-12)
    assert out.logits_t2v.shape == (8, 8) and not out.logits_t2v.requires_grad
    assert math.isclose(out.temperature.item(), 0.05, rel_tol=1e-6)


def test_temperature_learnable_fixed_and_bounded():
    t, v = _unit(4, 8, seed=0).float(), _unit(4, 8, seed=1).float()
    learnable = VolumeContrastiveLoss()
    assert math.isclose(learnable.temperature.item(), 0.07, rel_tol=1e-6)
    assert [n for n, _ in learnable.named_parameters()] == ["log_temperature"]
    learnable(t, v).backward()
    assert learnable.log_temperature.grad is not None and learnable.log_temperature.grad != 0

    fixed = VolumeContrastiveLoss(learnable_temperature=False)
    assert list(fixed.parameters()) == []
    assert "log_temperature" in fixed.state_dict()  # still saved with checkpoints

    bounded = VolumeContrastiveLoss(temperature=0.07, temperature_bounds=(0.05, 0.1))
    with torch.no_grad():
        bounded.log_temperature.fill_(math.log(10.0))
    assert math.isclose(bounded.temperature.item(), 0.1, rel_tol=1e-6)


def test_aligned_embeddings_give_lower_loss_than_shuffled():
    t = _unit(16, 32, seed=0)
    v = F.normalize(t + 0.1 * _unit(16, 32, seed=1), dim=-1)
    a = F.normalize(t + 0.1 * _unit(16, 32, seed=2), dim=-1)
    loss_fn = VolumeContrastiveLoss().double()
    assert loss_fn(t, v, a) < loss_fn(t, v[torch.randperm(16)], a[torch.randperm(16)])


def test_zero_volume_positives_give_finite_gradients():
    t = _unit(6, 8, seed=0).requires_grad_()
    loss = VolumeContrastiveLoss().double()(t, t.detach().clone(), t.detach().clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(t.grad).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gather": "all"}, "gather"),
        ({"temperature": 0.0}, "positive"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"temperature_bounds": (0.1, 0.2)}, "temperature_bounds"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VolumeContrastiveLoss(**kwargs)


def test_loss_rejects_unaligned_batches():
    with pytest.raises(ValueError, match="same batch size"):
        VolumeContrastiveLoss()(torch.randn(4, 8), torch.randn(5, 8), torch.randn(4, 8))


def _ddp_grads(gather: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    grads_, results = run_ranks(gather, tmp_path)
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    return grads_


def _full_batch_grads() -> dict[str, torch.Tensor]:
    model = Towers("exact")
    model(*batch()).backward()
    return grads(model)


def _max_rel_diff(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def test_ddp_exact_gather_equals_full_batch_gradients(tmp_path):
    reference = _full_batch_grads()
    exact = _ddp_grads("exact", tmp_path)
    assert exact.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(exact[name], reference[name], rtol=1e-6, atol=1e-12), name


def test_ddp_local_gather_drops_part_of_the_gradient(tmp_path):
    # "local" (gather without gradient, as the paper's code) loses the terms where a rank's features are
    # negatives in the other rank's rows: its gradients measurably differ from the full-batch ones.
    assert _max_rel_diff(_ddp_grads("local", tmp_path), _full_batch_grads()) > 0.05


def test_ddp_gradient_accumulation_syncs_once_and_equals_the_big_batch(tmp_path):
    # Two ranks x two micro-batches through the loop's accumulate_gradients: the first micro-batch must not
    # all-reduce (no_sync), and the accumulated gradients must equal one process's gradients of the same two
    # global micro-batches, each scaled by 1/2: what one big step over them means for a contrastive loss.
    ddp = _ddp_grads("accum", tmp_path)
    assert ddp.pop("allreduces_after_first") == 0
    assert ddp.pop("allreduces_after_last") >= 1
    reference = MicroBatchTowers("exact")
    for micro in micro_batches(rank=0, world=1, accum=2):
        (reference(micro).loss / 2).backward()
    expected = grads(reference)
    assert ddp.keys() == expected.keys()
    assert _max_rel_diff(ddp, expected) < 1e-12


def test_seed_gather_trains_each_direction_on_one_side_only():
    # GRAM's concat_all_gather detaches every gathered row, the rank's own too: on one GPU the caption -> clip
    # term trains only the captions, the clip -> caption term only the clips.
    g = torch.Generator().manual_seed(0)
    t, v, a = (F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    seed = [x.clone().requires_grad_() for x in (t, v, a)]
    VolumeContrastiveLoss(gather="seed").double()(*seed).backward()
    manual = [x.clone().requires_grad_() for x in (t, v, a)]
    loss_fn = VolumeContrastiveLoss().double()
    targets = torch.arange(6)
    t2v = -gram_volume(manual[0], manual[1].detach(), manual[2].detach()) / 0.07
    v2t = -gram_volume(manual[0].detach(), manual[1], manual[2]).T / 0.07
    loss = 0.5 * (
        F.cross_entropy(t2v, targets, label_smoothing=0.1) + F.cross_entropy(v2t, targets, label_smoothing=0.1)
    )
    loss.backward()
    for got, want in zip(seed, manual, strict=True):
        torch.testing.assert_close(got.grad, want.grad)
    exact = [x.clone().requires_grad_() for x in (t, v, a)]
    loss_fn(*exact).backward()
    assert not torch.allclose(exact[0].grad, seed[0].grad)  # exact also trains captions through the clip term
