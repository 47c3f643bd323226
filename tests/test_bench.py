import json

import pytest
import torch
from click.testing import CliRunner
from oracle import det_volume

from gram_ray.bench import paper_volume
from gram_ray.cli import main


def test_paper_baseline_computes_the_same_volumes():
    # The benchmark compares like with like only if the baseline is a correct volume.
    g = torch.Generator().manual_seed(0)
    anchor, *others = (torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (5, 7, 7, 7))
    assert torch.allclose(paper_volume(anchor, *others), det_volume(anchor, *others), rtol=1e-9)


def test_bench_volume_command_reports_all_variants(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main, ["bench", "volume", "--b1", "8", "--b2", "16", "--dim", "8", "--reps", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "faster than the paper's construction" in result.output
    payload = json.loads(out.read_text())
    assert [r["variant"] for r in payload["results"]] == ["paper", "gram_volume", "cosine"]
    assert all(r["seconds"] > 0 for r in payload["results"])


def test_bench_volume_rejects_k_below_two():
    result = CliRunner().invoke(main, ["bench", "volume", "--k", "1"])
    assert result.exit_code != 0 and "k >= 2" in result.output


def test_bench_shuffle_reports_every_mode(ray_session, tmp_path):
    out = tmp_path / "shuffle.json"
    result = CliRunner().invoke(main, ["bench", "shuffle", "--rows", "128", "--epochs", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["rows"] == 128 and set(payload["seconds_per_epoch"]) == {"none", "blocks", "full"}
    assert all(s > 0 for s in payload["seconds_per_epoch"].values())


@pytest.mark.slow
def test_bench_volume_compile_adds_the_compiled_volume_and_floor(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "volume", "--compile", "--b1", "8", "--b2", "16", "--dim", "8", "--reps", "2", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert [r["variant"] for r in payload["results"]][-2:] == ["gram_volume+compile", "cosine+compile"]
    assert payload["compiled_ratio_to_compiled_floor"] > 0 and "x the compiled cosine floor" in result.output
