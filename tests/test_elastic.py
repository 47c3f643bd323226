"""Elastic workers without Ray: the layout of a step over the world sizes a config allows, the refusals, and a
mid-epoch checkpoint of 2 ranks resumed on 1 (tests/test_multinode.py runs the same through Ray Train, losing and
regaining a node)."""

import copy

import pytest
import torch
from tiny import tiny_config, trained_ids

from gram_ray.config import ConfigError
from gram_ray.config.world import WorldPlan, WorldSizeError, derive_seed, plan_for_world
from gram_ray.train.worker import plan_of


def test_a_step_keeps_its_clips_at_every_world_size_by_accumulating_micro_batches():
    assert plan_for_world(16, 4, 4) == WorldPlan(4, 4, 1)
    assert plan_for_world(16, 4, 2) == WorldPlan(2, 4, 2)
    assert plan_for_world(16, 4, 1) == WorldPlan(1, 4, 4)
    assert plan_for_world(24, 8, 3) == WorldPlan(3, 8, 1)
    assert plan_for_world(24, 6, 2) == WorldPlan(2, 6, 2)
    assert plan_for_world(24, 5, 2) == WorldPlan(2, 4, 3)  # a micro-batch never above the configured one
    for plan in (plan_for_world(48, 8, w) for w in (1, 2, 3, 4, 6)):
        assert plan.step_clips == 48 and plan.micro_batch <= 8
    with pytest.raises(WorldSizeError, match="16 clips does not divide over 3 workers"):
        plan_for_world(16, 4, 3)
    with pytest.raises(WorldSizeError, match="needs at least 2"):
        plan_for_world(1, 4, 1)
    # A group of a new size draws from streams of (seed, step, rank): the same at every restart, apart per rank.
    seeds = {derive_seed(0, step, rank) for step in (3, 4) for rank in (0, 1)}
    assert len(seeds) == 4 and derive_seed(0, 3, 1) == derive_seed(0, 3, 1)


def test_an_elastic_config_states_its_range_and_is_refused_where_a_size_cannot_keep_the_step():
    cfg = tiny_config("scaling.num_workers=[1, 2]", "scaling.max_failures=3", "train.global_batch_size=8")
    s = cfg.scaling
    assert (s.elastic, s.min_workers, s.max_workers, cfg.worker_batch) == (True, 1, 2, 4)
    assert plan_of(cfg, 2) == WorldPlan(2, 4, 1) and plan_of(cfg, 1) == WorldPlan(1, 4, 2)
    fixed = tiny_config("scaling.num_workers=2")
    assert (fixed.scaling.elastic, fixed.scaling.min_workers, fixed.scaling.max_workers) == (False, 2, 2)
    with pytest.raises(ConfigError, match=r"\[2, 4\] cannot keep the global batch of 16 clips .* over 3 workers"):
        tiny_config("scaling.num_workers=[2, 4]", "scaling.max_failures=3", "train.global_batch_size=16")
    tiny_config("scaling.num_workers=[2, 4]", "scaling.max_failures=3", "train.global_batch_size=24")  # 12 | 24
    with pytest.raises(ConfigError, match="set scaling.max_failures"):  # shrinking is a restart after a failure
        tiny_config("scaling.num_workers=[1, 2]")
    with pytest.raises(ConfigError, match="min <= max"):
        tiny_config("scaling.num_workers=[3, 2]", "scaling.max_failures=3")


def test_a_mid_epoch_checkpoint_of_two_ranks_resumes_on_one_with_the_same_steps_and_no_clip_twice(tmp_path):
    """2 gloo ranks train 3 steps of 4 clips (2 each) and checkpoint mid-epoch; one process resumes with 2
    micro-batches of 2 a step: the rest of epoch 0 is exactly the clips neither rank had trained on, every step
    still trains on 4 clips, and the run ends at the planned step 8. The RNG of the new size is re-derived from
    (seed, step, rank): resuming twice gives the same weights."""
    from ddp_worker import ELASTIC_ROWS, ELASTIC_STOP, elastic_run, run_ranks

    first, runs = run_ranks("elastic", tmp_path)
    assert [code for code, _ in runs] == [0, 0], [err[-3000:] for _, err in runs]
    checkpoint = first["checkpoints"][-1]
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_complete"]) == (ELASTIC_STOP, 0, False)
    assert checkpoint["world_size"] == 2
    by_rank = [ids for seen in first["seen_by_rank"] for ids in seen.get(0, [])]
    # Every rank's clips, each once (a rank may have read one micro-batch ahead of the checkpoint: not counted).
    trained = trained_ids(checkpoint)
    assert len(trained) == len(set(trained)) == checkpoint["epoch_progress"]["trained"] == 4 * ELASTIC_STOP
    assert set(trained) <= set(by_rank)
    assert {m["train/step_clips"] for m in first["logged"]} == {4}

    # (copies: the optimizer's load_state_dict keeps the checkpoint's moment tensors and updates them in place)
    rest = elastic_run(0, 1, resume=copy.deepcopy(checkpoint))
    again = elastic_run(0, 1, resume=copy.deepcopy(checkpoint))
    everything = {f"c{i}" for i in range(ELASTIC_ROWS)}
    assert sorted(rest["seen"][0]) == sorted(everything - set(trained))  # the rest, once each
    assert sorted(rest["seen"][1]) == sorted(everything)  # the next epoch: every clip once
    assert [m["step"] for m in rest["logged"]] == list(range(ELASTIC_STOP + 1, 9))
    assert {m["train/step_clips"] for m in rest["logged"]} == {4}
    assert rest["checkpoints"][-1]["step"] == 8 and rest["checkpoints"][-1]["world_size"] == 1
    for name, value in rest["weights"].items():
        assert torch.equal(value, again["weights"][name]), name
