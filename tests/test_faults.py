"""Faults and bad input: what a user can rely on when checkpoints come from elsewhere, writes fail, steps go
non-finite, or runs are killed."""

from pathlib import Path

import pytest
import torch

from gram_ray.model.safe_load import CheckpointError


class _RunsCodeOnLoad:
    """Unpickling this calls Path.write_text(marker, ...): a stand-in for any code a crafted file could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _load_gram_ray(path):
    from gram_ray.model.checkpoint import load_checkpoint

    return load_checkpoint(path.parent)


def _import_gram(path):
    from tiny import tiny_config

    from gram_ray.model.gram_checkpoint import import_gram_checkpoint

    return import_gram_checkpoint(path, tiny_config(), path.parent / "imported", log=lambda line: None)


def _load_beats(path):
    from gram_ray.model.encoders import load_beats

    return load_beats(path)


def _load_eva(path):
    from gram_ray.model.encoders import load_eva_vision

    return load_eva_vision(path)


def _evaluate_cli(path):
    from click.testing import CliRunner

    from gram_ray.cli import main

    (path.parent / "cache").mkdir()
    result = CliRunner().invoke(
        main, ["evaluate", "--checkpoint", str(path.parent), "--data", str(path.parent / "cache")]
    )
    assert result.exit_code == 1  # refused before Ray starts: a ClickException, not a traceback
    raise CheckpointError(result.output)


LOADERS = {
    "gram-ray checkpoint": _load_gram_ray,
    "import-checkpoint (GRAM's weights)": _import_gram,
    "BEATs weights": _load_beats,
    "EVA-CLIP weights": _load_eva,
    "gram-ray evaluate --checkpoint": _evaluate_cli,
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_checkpoint_crafted_to_run_code_is_refused_by_every_loader_and_its_code_never_runs(loader, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt" / "state.pt"
    path.parent.mkdir()
    weights = {"model": {"w": torch.zeros(2)}, "cfg": {}, "state_dict": {}}
    torch.save(weights | {"payload": _RunsCodeOnLoad(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to load .*state.pt.*could run code"):
        loader(path)
    assert not marker.exists()


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_truncated_checkpoint_is_refused_naming_the_file(loader, tmp_path):
    path = tmp_path / "ckpt" / "state.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:600])  # what a kill or a full disk leaves behind
    with pytest.raises(CheckpointError, match=r"state.pt is not a readable PyTorch checkpoint"):
        loader(path)


def test_a_nan_on_one_rank_skips_that_update_on_every_rank_and_training_goes_on(tmp_path):
    from ddp_worker import run_ranks

    result, runs = run_ranks("nonfinite", tmp_path)
    assert [code for code, _ in runs] == [0, 0], [err[-3000:] for _, err in runs]
    skipped = [m["train/skipped_steps"] for m in result["logged"]]
    assert skipped == [0, 1, 1, 1]  # logged every step: the second step was skipped, the rest were not
    assert result["reported"][-1]["step"] == 4 and result["reported"][-1]["train/skipped_steps"] == 1
    first, second = result["weights"]
    assert torch.isfinite(first).all() and torch.equal(first, second)  # both ranks skipped the same update


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_the_step_and_the_last_checkpoint():
    import numpy as np
    from tiny import random_rows, tiny_config

    from gram_ray.data.collate import Collate
    from gram_ray.data.text import build_word_vocab
    from gram_ray.train.loop import run_training
    from gram_ray.train.step import NonFiniteTrainingError

    cfg = tiny_config("train.epochs=3", "train.max_skipped_steps=3")
    rows = random_rows(cfg, 8)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    collate = Collate(cfg, vocab, train=True)

    def train_batches(epoch, skip):  # every batch from epoch 1 on carries a NaN: steps 3, 4, 5 are skipped
        for i in range(2):
            b = {k: v[i * 4 : (i + 1) * 4].copy() for k, v in rows.items()}
            if epoch >= 1:
                b["audio_fbank"][:] = np.nan
            yield collate(b)

    reported = []
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"stopped at step 5: 3 steps in a row .*checkpoint was taken at step 4, with the weights of step 2",
    ):
        run_training(
            cfg,
            train_batches=train_batches,
            val_batches=None,
            steps_per_epoch=2,
            report=lambda metrics, checkpoint: reported.append(metrics),
            vocab=vocab,
        )
    assert [m["step"] for m in reported] == [2, 4]  # epoch ends; epoch 1's updates were all skipped


def _fake_run(root: Path, steps: dict[str, int], registered: bool) -> None:
    """A run folder as Ray Train V2 leaves it: checkpoint folders, and the snapshot of the registered ones."""

    for name, step in steps.items():
        (root / name).mkdir(parents=True)
        torch.save({"model": {"w": torch.zeros(1000)}, "step": step}, root / name / "state.pt")
    if registered:  # Ray's registry, written by Ray's own model of it (its format is Ray's, read through
        # ray.train.Result.from_path)
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
            _CheckpointManagerState,
            _TrainingResultState,
        )

        results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"step": s}) for n, s in steps.items()]
        snapshot = _CheckpointManagerState(
            checkpoint_results=results,
            checkpoint_report_indices=list(range(len(results))),
            latest_checkpoint_result=results[-1],
            pending_training_results=[],
            pending_validation_specs=[],
            current_report_index=len(results),
            validated_checkpoint_dir_names=[],
            timed_out_validation_checkpoint_dir_names=[],
            failed_validation_checkpoint_dir_names=[],
        )
        (root / "checkpoint_manager_snapshot.json").write_text(snapshot.model_dump_json())


@pytest.mark.parametrize("registered", [True, False], ids=["from Ray's snapshot", "before any registration"])
def test_resume_auto_takes_the_newest_whole_checkpoint_and_never_a_half_written_one(registered, tmp_path):
    from gram_ray.train.resume import latest_checkpoint

    root = tmp_path / "run"
    names = ["checkpoint_2026-01-01_10-00-00.000001", "checkpoint_2026-01-01_10-05-00.000001"]
    _fake_run(root, dict(zip(names, [2, 4], strict=True)), registered)
    assert latest_checkpoint(str(root), log=lambda line: None) == str(root / names[1])
    newest = root / names[1] / "state.pt"
    newest.write_bytes(newest.read_bytes()[:-200])  # the kill cut off the end of the newest file
    passed = []
    assert latest_checkpoint(str(root), log=passed.append) == str(root / names[0])
    assert "incomplete" in passed[0] and names[1] in passed[0]
    newest.unlink()  # or never wrote its state at all
    assert latest_checkpoint(str(root), log=lambda line: None) == str(root / names[0])
    assert latest_checkpoint(str(tmp_path / "nothing-here"), log=lambda line: None) is None


def test_rays_notice_on_reading_a_runs_registry_is_kept_off_the_console(tmp_path):
    """Reading the registry through Ray Train's Result.from_path makes Ray log that it found a snapshot, with advice
    to start afresh: the console filter (cli/ray_noise.py) knows it as harmless and keeps it in its log file."""
    import logging

    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager

    from gram_ray.cli.ray_noise import is_harmless
    from gram_ray.train.resume import latest_checkpoint

    _fake_run(tmp_path / "run", {"checkpoint_2026-01-01_10-00-00.000001": 2}, registered=True)
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    # At the logger Ray's notice comes from, at INFO and enabled whatever earlier tests (in-process commands set
    # Ray's logging up) left it at.
    source = logging.getLogger(CheckpointManager.__module__)
    level, disabled, disabled_below = source.level, source.disabled, logging.root.manager.disable
    source.setLevel(logging.INFO)
    source.disabled = False
    logging.disable(logging.NOTSET)
    source.addHandler(handler)
    try:
        assert latest_checkpoint(str(tmp_path / "run"), log=lambda line: None) is not None
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
        source.disabled = disabled
        logging.disable(disabled_below)
    notices = [message for message in seen if "snapshot" in message]
    assert notices and all(is_harmless(message) for message in notices)


def test_a_new_run_refuses_to_start_over_a_run_of_the_same_name(tmp_path):
    from tiny import tiny_config

    from gram_ray.train.trainer import fit

    cfg = tiny_config("run.name=r")
    _fake_run(tmp_path / "out" / "ray" / "r", {"checkpoint_2026-01-01_10-00-00.000001": 2}, registered=True)
    with pytest.raises(ValueError, match="already holds checkpoints of a run named 'r'.*--resume auto continues it"):
        fit(cfg, tmp_path / "out", log=lambda line: None)


def _no_space(obj, f, *args, **kwargs):
    """torch.save on a full disk: some bytes land, then ENOSPC."""
    Path(f).write_bytes(b"PK\x03\x04 the first bytes")
    raise OSError(28, "No space left on device")


def test_a_checkpoint_write_that_fails_stops_training_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    from tiny import random_rows, tiny_config

    import gram_ray.model.checkpoint as checkpoint
    from gram_ray.data.collate import Collate, epoch_batches
    from gram_ray.data.text import build_word_vocab
    from gram_ray.model.checkpoint import CheckpointWriteError, load_checkpoint
    from gram_ray.train.loop import run_training

    cfg = tiny_config("train.epochs=3")
    rows = random_rows(cfg, 8)
    vocab = build_word_vocab(c for caps in rows["captions"] for c in caps)
    collate = Collate(cfg, vocab, train=True)
    kept = []

    def report(metrics, folder):  # as Ray Train does: each checkpoint copied into the run's storage
        if folder is not None:
            kept.append(folder.write(tmp_path / f"checkpoint_{metrics['step']}"))
            monkeypatch.setattr(checkpoint.torch, "save", _no_space)  # the disk is full from now on

    with pytest.raises(CheckpointWriteError, match=r"step 4: .*No space left.*untouched \(the last at step 2\)"):
        run_training(
            cfg,
            train_batches=lambda epoch, skip: epoch_batches(rows, 4, collate, epoch, skip),
            val_batches=None,
            steps_per_epoch=2,
            report=report,
            vocab=vocab,
        )
    monkeypatch.undo()
    assert [p.name for p in kept] == ["checkpoint_2"]
    assert load_checkpoint(kept[0])["step"] == 2  # intact and loadable


def test_a_cut_off_checkpoint_write_leaves_no_state_file_that_looks_whole(tmp_path, monkeypatch):
    from tiny import tiny_config

    import gram_ray.model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.torch, "save", _no_space)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left"):
        checkpoint.write_checkpoint(tmp_path / "ckpt", {"model": {}}, tiny_config())
    assert not checkpoint.is_checkpoint(tmp_path / "ckpt") and not list((tmp_path / "ckpt").glob("*.partial"))


def test_a_worker_that_could_not_write_its_checkpoint_is_reported_in_one_line():
    from ray.train import WorkerGroupError

    from gram_ray.cli.common import training_failure
    from gram_ray.model.checkpoint import CheckpointWriteError

    class RayTaskErrorLike(Exception):  # how Ray hands over a worker's exception: as .cause
        cause = CheckpointWriteError("step 4: the checkpoint could not be written or stored (disk full)")

    error = WorkerGroupError("rank 0 failed ...", {0: RayTaskErrorLike("traceback ...")})
    assert (
        training_failure(error)
        == "training failed on worker 0: step 4: the checkpoint could not be written or stored (disk full)"
    )
    assert training_failure(RuntimeError("something else")) is None


def test_a_cache_that_cannot_be_written_stops_preprocessing_with_a_clear_message(synth_small, ray_session, tmp_path):
    from gram_ray.data.preprocess import PreprocessError, preprocess

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(PreprocessError, match="writing the cache under .*not-a-folder.* failed .*rerun"):
        preprocess(
            synth_small["val"],
            synth_small["videos"],
            blocker / "cache",
            audio_dir=synth_small["audios"],
            log=lambda line: None,
        )


@pytest.mark.ray
def test_preprocessing_killed_midway_continues_with_the_clips_left_and_ends_as_an_uninterrupted_run(
    synth_small, ray_session, tmp_path, monkeypatch
):
    # The state a kill leaves: some shards written and recorded, one file cut off mid-write (no record), the rest
    # never started, no report. The rerun decodes only the shards not recorded; the cache then holds the same
    # files, byte for byte, as an uninterrupted run (train mode: the random frame draws are seeded by clip id).
    from tiny import tiny_config

    from gram_ray import storage
    from gram_ray.data.preprocess import preprocess

    data = tiny_config("data.video.train_draws=2").data
    args = (synth_small["train"], synth_small["videos"])
    kwargs = {"data": data, "audio_dir": synth_small["audios"], "mode": "train", "log": lambda line: None}
    whole = preprocess(*args, tmp_path / "whole", **kwargs)
    first = preprocess(*args, tmp_path / "killed", **kwargs)
    assert whole["shards"] == first["shards"] >= 4 and whole["rows_decoded_now"] == 16
    killed = tmp_path / "killed"
    names = sorted(p.stem for p in (killed / "shards").glob("*.parquet"))
    for name in names[3:]:  # never recorded: the kill came before
        (killed / "_done" / f"{name}.json").unlink()
        (killed / "shards" / f"{name}.parquet").unlink()
    cut = killed / "shards" / f"{names[3]}.parquet"
    cut.write_bytes((tmp_path / "whole" / "shards" / f"{names[3]}.parquet").read_bytes()[:100])  # cut off
    (killed / "report.json").unlink()

    lines, records_read = [], []
    read_text = storage.read_text

    def counted(path, *a, **kw):  # the done records this driver reads: each piece's once (its plan), none after
        if "/_done/shard-" in str(path):
            records_read.append(str(path))
        return read_text(path, *a, **kw)

    monkeypatch.setattr(storage, "read_text", counted)
    resumed = preprocess(*args, killed, **(kwargs | {"log": lines.append}))
    assert len(records_read) == len(set(records_read)) == 3, records_read
    assert resumed["status"] == "complete" and resumed["shards_reused"] == 3
    assert resumed["rows_reused"] + resumed["rows_decoded_now"] == 16 and resumed["rows_decoded_now"] < 16
    assert any("resuming: 3 of" in line for line in lines)
    for name in names:
        assert (killed / "shards" / f"{name}.parquet").read_bytes() == (
            tmp_path / "whole" / "shards" / f"{name}.parquet"
        ).read_bytes(), name
    assert resumed["rows_written"] == whole["rows_written"]
