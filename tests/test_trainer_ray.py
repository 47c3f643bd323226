"""Through Ray Train for real: TorchTrainer with 2 CPU workers (gloo). ~40 s of Ray's fixed cost."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import tiny_config

from gram_ray.cli import main
from gram_ray.model.checkpoint import load_checkpoint
from gram_ray.train.loop import main_metric_name
from gram_ray.train.trainer import fit


@pytest.mark.ray
@pytest.mark.slow
def test_torchtrainer_two_workers_survives_a_killed_worker_then_evaluate_checkpoint(
    synth_small, ray_session, tmp_path, monkeypatch
):
    # Two CPU workers; one of them is SIGKILLed right after the first checkpoint (mid-epoch, step 1), and with
    # scaling.max_failures=1 Ray Train restarts the group from it. The datasets are rebuilt for the restarted
    # group from that checkpoint's position (the rest of epoch 0): the step-3 checkpoint must count exactly the
    # 8 clips of its epoch's 2 steps (a replayed clip would count once, a set; a skipped one not at all), and
    # the run must end at its planned 4 steps. Then `gram-ray evaluate` on the checkpoint. The workers shard the
    # model with FSDP (scaling.strategy: fsdp), so this is also FSDP through Ray Train: the sharded model's gathered
    # checkpoints, a restart from one, and an FSDP checkpoint read by `evaluate` without any process group (every
    # other Ray Train test runs DDP). W&B records it offline, with a key in the driver's environment only (the
    # session's Ray workers started without it): rank 0 gets it by reference, the restarted group continues the same
    # W&B run, and the key is written nowhere.
    from chaos import kill_a_worker_when
    from wandb_records import history, read_records

    key = "fedcba9876543210fedcba9876543210fedcba98"
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")

    cfg = tiny_config(
        "train.epochs=2",
        "train.checkpoint_every_steps=1",  # 2 steps an epoch: steps 1 and 3 are mid-epoch checkpoints
        "train.keep_checkpoints=10",
        "scaling.num_workers=2",
        "scaling.strategy=fsdp",
        "scaling.max_failures=1",
        "wandb.enabled=true",
        f"data.train_annotations={synth_small['train']}",
        f"data.val_annotations={synth_small['val']}",
        f"data.video_dir={synth_small['videos']}",
        f"data.audio_dir={synth_small['audios']}",
    )
    killer, killed, finished = kill_a_worker_when(tmp_path / "run" / "ray" / cfg.run.name, lambda steps: True)
    try:
        result, summary = fit(cfg, tmp_path / "run", log=lambda *_: None)
    finally:
        finished.set()
        killer.join(timeout=10)
    assert killed.get("after_step") == 1, "no worker was killed after the first checkpoint"
    assert result.error is None
    # fit's RunEvents recorded the recovery with no console attached (result.json held none before).
    (recovery,) = summary["recoveries"]
    assert (recovery["cause"], recovery["restarted_from_step"], recovery["workers"]) == ("failure", 1, 2)
    assert [size["workers"] for size in summary["world_sizes"]] == [2]
    steps_per_epoch = 16 // (cfg.train.batch_size * 2)  # 16 train clips, 2 workers
    assert summary["last_metrics"]["step"] == 2 * steps_per_epoch
    assert main_metric_name(cfg) in summary["best_metrics"]
    state = load_checkpoint(summary["checkpoint"])
    assert state["vocab"] and state["config"]["model"]["modalities"] == ["text", "video", "audio"]
    mid = [c for c, m in result.best_checkpoints if m["step"] == 3]
    assert len(mid) == 1 and not load_checkpoint(mid[0].path)["epoch_complete"]
    progress = load_checkpoint(mid[0].path)["epoch_progress"]  # the synthetic cache's files, 16 clips over 2 ranks
    assert (progress["trained"], progress["repeats"]) == (2 * cfg.train.batch_size, 0)
    # Both workers ran the exact gather: the val metrics cover all 8 val clips (2 groups of 4).
    best = summary["best_eval"]["volume"]["text-video-audio"]["t2v"]
    assert best["MeanR"] <= 8 and json.loads(json.dumps(best)) == best

    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "ray" / cfg.run.name / "wandb-run-id").read_text().strip()
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # before and after the restart
    steps = [
        [row["step"] for row in history(read_records(next(r.glob("*.wandb")))) if "train/loss" in row] for r in runs
    ]
    # The killed group's rank 0 wrote what W&B had flushed of the steps it logged (it writes its run file every 15 s
    # and at exit: none, or the first ones); the restarted one continued the same run from the checkpoint of step 1.
    assert steps[0] == list(range(1, len(steps[0]) + 1)) and len(steps[0]) <= 4 and steps[1] == [2, 3, 4]
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), path

    out = tmp_path / "eval.json"
    cache = Path(tmp_path / "run" / "cache" / "val")
    run = CliRunner().invoke(
        main, ["evaluate", "--checkpoint", summary["checkpoint"], "--data", str(cache), "--json", str(out)]
    )
    assert run.exit_code == 0, run.output
    evaluated = json.loads(out.read_text())
    assert (
        evaluated["volume"]["text-video-audio"]["t2v"]["R@1"]
        == summary["best_eval"]["volume"]["text-video-audio"]["t2v"]["R@1"]
    )
