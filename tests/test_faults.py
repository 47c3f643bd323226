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
