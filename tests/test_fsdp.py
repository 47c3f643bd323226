"""FSDP2 (scaling.strategy: fsdp) on 2 gloo processes on CPU, against DDP and one process: the same gradients, the
same steps through the training loop (DAM, gradient checkpointing, accumulation, evaluation with reranking), the
same checkpoints, and resumes across strategies and world sizes. The GPU path (bf16, NCCL) is in make gpu-check."""

import copy

import pytest
import torch
from ddp_worker import FSDP_ROWS, fsdp_run, grads, gram_model_and_batch, run_ranks
from tiny import tiny_config

from gram_ray.config import ConfigError, load_config
from gram_ray.model.checkpoint import load_checkpoint, write_checkpoint
from gram_ray.train.memory import static_bytes
from gram_ray.train.sharding import shard_units

pytestmark = pytest.mark.slow


def _ok(runs):
    assert [code for code, _ in runs] == [0] * len(runs), [err[-3000:] for _, err in runs]


def test_fsdp_shards_every_parameter_and_its_gradients_equal_one_process(tmp_path):
    """GRAM's encoders with DAM (the fusion runs the text encoder's sharded blocks a second time): each rank holds
    half of every parameter, and the gradients of one step over 2 ranks, gathered, are those of one process on
    the whole batch (as DDP's are: tests/test_matching.py)."""
    sharded, runs = run_ranks("fsdp-dam", tmp_path)
    _ok(runs)
    model, full = gram_model_and_batch(matching=True)
    loss = model(full).loss
    loss.backward()
    reference = grads(model)
    assert set(reference) <= set(sharded) and reference
    for name, grad in reference.items():
        torch.testing.assert_close(sharded[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Each rank's loss is over its own captions and clips (against every rank's): their mean is the batch's loss.
    torch.testing.assert_close(sharded["losses"].mean(), loss.detach())
    held = sharded["held"]
    assert {kind for rank in held for kind, _, _ in rank.values()} == {"DTensor"}  # the root's parameters too
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, (_, local, whole) in held[0].items():
        assert local + held[1][name][1] == whole, name  # split between the ranks, nothing held twice
        rows = shapes[name][0]  # split along the first dimension: rank 0 holds the first half of the rows, rounded up
        assert local == -(-rows // 2) * (whole // rows), name
    # The memory estimate's sharded term is what a rank holds (its fp32 shard of weights, gradients, moments).
    parameters = sum(p.numel() for p in model.parameters())
    assert static_bytes(model, shards=2) >= (4 * parameters + 12 * parameters) // 2
    assert shard_units(model)  # the blocks the estimate adds back


def test_an_fsdp_run_takes_ddps_steps_and_its_checkpoints_resume_either_way(tmp_path):
    """The training loop on 2 ranks, under DDP and under FSDP: 2 micro-batches a step on each rank, DAM with
    gradient checkpointing, an evaluation before the first step whose val batches split 2 and 1 between the ranks,
    reranking, a checkpoint every step. FSDP's losses, val metrics and checkpoints (weights and AdamW state, by
    parameter index as a DDP checkpoint) are DDP's within float tolerance. FSDP then resumes DDP's mid-epoch
    checkpoint (accumulating the other way: gradients kept until the step's last micro-batch) and takes the same
    steps; one plain process resumes FSDP's checkpoint (another world size) and finishes the run."""
    ddp, runs = run_ranks("loop-ddp", tmp_path, timeout=300)
    _ok(runs)
    fsdp, runs = run_ranks("loop-fsdp", tmp_path, timeout=300)
    _ok(runs)
    assert [c["step"] for c in fsdp["checkpoints"]] == [c["step"] for c in ddp["checkpoints"]] == [1, 2, 3, 4]

    def same(a: dict, b: dict, atol: float) -> None:
        assert a.keys() == b.keys()
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=0, atol=atol, msg=key)

    for d, f in zip(ddp["checkpoints"], fsdp["checkpoints"], strict=True):
        assert f["world_size"] == 2 and f["epoch_progress"] == d["epoch_progress"]
        same(d["model"], f["model"], atol=1e-4)
        assert d["optimizer"]["param_groups"] == f["optimizer"]["param_groups"]
        assert d["optimizer"]["state"].keys() == f["optimizer"]["state"].keys()
        for index, moments in d["optimizer"]["state"].items():
            same(moments, f["optimizer"]["state"][index], atol=1e-5)
    val = [m for m in ddp["logged"] if "val/text-video-audio/t2v/R@1" in m]
    assert val and [m for m in fsdp["logged"] if "val/text-video-audio/t2v/R@1" in m] == val  # incl. rerank/*
    assert any(k.startswith("val/rerank/") for k in val[0])
    losses = [
        (m["train/loss"], f["train/loss"])
        for m, f in zip(ddp["logged"], fsdp["logged"], strict=True)
        if "train/loss" in m
    ]
    assert len(losses) == 4 and all(abs(a - b) < 1e-5 for a, b in losses)

    torch.save(ddp["checkpoints"][0], tmp_path / "resume.pt")  # step 1 of 2 in epoch 0: mid-epoch
    resumed, runs = run_ranks("loop-fsdp-resume", tmp_path, timeout=300)
    _ok(runs)
    assert [c["step"] for c in resumed["checkpoints"]] == [2, 3, 4]
    for d, r in zip(ddp["checkpoints"][1:], resumed["checkpoints"], strict=True):
        same(d["model"], r["model"], atol=1e-4)

    one = fsdp_run(0, 1, "ddp", copy.deepcopy(fsdp["checkpoints"][2]))  # step 3, mid-epoch 1, on 1 process
    assert [c["step"] for c in one["checkpoints"]] == [4] and one["checkpoints"][0]["world_size"] == 1
    assert one["checkpoints"][0]["epoch_progress"] is None  # the epoch's end: every clip of it was trained on
    assert FSDP_ROWS == 16


def test_fsdp_settings_are_checked_when_the_config_is_read():
    cfg = tiny_config("scaling.strategy=fsdp", "scaling.fsdp_sync=last_micro_batch")
    assert (cfg.scaling.strategy, cfg.scaling.fsdp_sync) == ("fsdp", "last_micro_batch")
    with pytest.raises(ConfigError, match="use train.bf16"):
        tiny_config("scaling.strategy=fsdp", "train.fp16=true")
    with pytest.raises(ConfigError, match="model.compile"):
        tiny_config("scaling.strategy=fsdp", "model.compile=true")
    with pytest.raises(ConfigError, match="scaling.strategy"):
        tiny_config("scaling.strategy=zero3")


def test_a_checkpoint_from_before_fsdp_with_a_scalar_temperature_still_loads_and_resumes(tmp_path):
    """The temperature became one element (FSDP refuses 0-d parameters); older checkpoints held it, and its AdamW
    moments, as scalars: they load into today's model and optimizer."""
    from gram_ray.model.gram import build_model
    from gram_ray.train.loop import build_optimizer

    cfg = tiny_config()
    model = build_model(cfg, ["a", "b"])
    weights = model.state_dict()
    weights["loss_fn.log_temperature"] = torch.tensor(-2.5)
    optimizer, _ = build_optimizer(model, cfg, 10)
    order = [p for g in optimizer.param_groups for p in g["params"]]
    index = next(i for i, p in enumerate(order) if p is model.loss_fn.log_temperature)
    old_optimizer = optimizer.state_dict()
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.tensor(0.1), "exp_avg_sq": torch.tensor(0.01)}
    old_optimizer["state"] = {index: moments}
    old = {"model": weights, "optimizer": old_optimizer, "config": cfg.model_dump(mode="json"), "vocab": ["a", "b"]}
    write_checkpoint(tmp_path, old, cfg)
    state = load_checkpoint(tmp_path)
    assert state["model"]["loss_fn.log_temperature"].shape == (1,)
    model.load_state_dict(state["model"])
    assert model.loss_fn.temperature.item() == pytest.approx(torch.tensor(-2.5).exp().item())
    moments = state["optimizer"]["state"][index]
    assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == (1,) and moments["step"].ndim == 0
    optimizer.load_state_dict(state["optimizer"])


def test_msrvtt_24gb_fits_24_gb_gpus_under_fsdp_where_ddp_does_not():
    from pathlib import Path

    from gram_ray.cluster.check import check_cluster

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "msrvtt-24gb.yaml")
    assert cfg.scaling.strategy == "fsdp" and cfg.model.gradient_checkpointing
    result = check_cluster(cfg, repo / "cluster" / "aws.yaml", gpu_gb=24)
    assert result.fits_memory and 4 < result.memory_gb < 9, result.lines
    assert result.memory_setup.startswith("as configured: FSDP over 4 GPUs")
