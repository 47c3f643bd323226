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
    from gram_ray.train.loop import NonFiniteTrainingError, run_training

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
