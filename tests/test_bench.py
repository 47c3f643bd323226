import json

import pytest
import torch
from click.testing import CliRunner
from oracle import det_volume

from gram_ray.bench.volume import paper_volume
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
    assert result.exit_code != 0 and "Invalid value for '--k': 1 is not in the range x>=2" in result.output


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


@pytest.mark.ray
@pytest.mark.slow
def test_bench_train_measures_three_paths_side_by_side(ray_session, tmp_path):
    out = tmp_path / "train.json"
    args = ["bench", "train", "--steps", "2", "--warmup", "1", "--set", "train.batch_size=8", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert list(payload["paths"]) == ["plain", "loop", "ray"]
    for name, path in payload["paths"].items():
        assert path["timed_steps"] == 2, name
        assert path["samples_per_s"] > 0
        phases = sum(path[f"{p}_ms"] for p in ("data", "forward", "backward", "optimizer"))
        assert phases == pytest.approx(path["step_ms"], rel=1e-6)
        assert path["samples_per_s"] == pytest.approx(8 / (path["step_ms"] / 1000), rel=1e-6)
    assert set(payload["ratios"]) == {"loop/plain", "ray/plain"}
    assert payload["flops_per_step"] > 0
    assert all(p["tflops"] > 0 and p["mfu"] is None for p in payload["paths"].values())  # no known CPU peak
    assert "ratios to (a)" in result.output and "MFU" in result.output


def test_bench_train_knows_the_peaks_of_common_cards():
    from gram_ray.bench.common import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("x86_64, 2 threads") is None


def test_random_weights_rebuild_the_published_architectures_offline():
    # bench train, dry runs and checkpoint imports build these with random weights: they must be the real
    # models' sizes. Hugging Face variant: BERT-base 110 M with its pooler (dropped here: 108.9 M), CLIP
    # ViT-B/16's vision tower 85.8 M, AST 86.2 M without its AudioSet classifier.
    from pathlib import Path

    from gram_ray.config import load_config
    from gram_ray.model.architectures import random_weights
    from gram_ray.model.gram import GramModel

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / "msrvtt-hf.yaml")
    model_cfg = random_weights(cfg.model)
    assert all(getattr(model_cfg, t).pretrained is None for t in ("text", "vision", "audio"))
    with torch.device("meta"):
        model = GramModel(model_cfg, num_frames=4, vocab_size=30522)
    millions = {t: sum(p.numel() for p in getattr(model, t).parameters()) / 1e6 for t in ("text", "vision", "audio")}
    assert millions == pytest.approx({"text": 108.89, "vision": 85.80, "audio": 86.19}, abs=0.01)

    # GRAM's own encoders (configs/msrvtt.yaml), counted as GRAM's checkpoint counts them (gram-reference):
    # EVA01-CLIP-g/14's tower 1,012,588,928 less its unused CLIP head (1,442,816); BEATs 90,311,792 (its relative
    # position bias shared by the layers); BERT with cross-attention 137,881,146 less the masked-LM head's own
    # 622,650 (GRAM's BERT has no pooler).
    gram = random_weights(load_config(configs / "msrvtt.yaml").model)
    with torch.device("meta"):
        model = GramModel(gram, num_frames=4)
    counts = {t: sum(p.numel() for p in getattr(model, t).parameters()) for t in ("text", "vision", "audio")}
    assert counts == {"text": 137_258_496, "vision": 1_011_146_112, "audio": 90_311_792}

    cfg.model.vision.pretrained = "someone/unknown-model"
    with pytest.raises(ValueError, match="no architecture on record"):
        random_weights(cfg.model)


def test_dry_run_estimates_memory_per_gpu_without_a_gpu(tmp_path):
    from pathlib import Path

    out = tmp_path / "memory.json"
    config = Path(__file__).resolve().parents[1] / "configs" / "msrvtt.yaml"
    per_gpu_32 = ["--set", "train.global_batch_size=256", "--set", "scaling.num_workers=8"]  # the README's table
    args = ["bench", "train", "--config", str(config), "--dry-run", *per_gpu_32, "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fits 80 GB" in result.output
    full, checkpointed, frozen, frozen_checkpointed, fsdp, configured = json.loads(out.read_text())
    # GRAM's encoders (137,258,496 + 1,011,146,112 + 90,311,792), heads 512 x (768 + 1408 + 768), temperature,
    # and the fusion + match head of the matching loss (2,274,818)
    assert full["parameters"] == 1_242_498_547
    assert checkpointed["activations_bytes"] < full["activations_bytes"] / 4
    assert frozen["trainable"] == full["trainable"] - 1_011_146_112  # the EVA-CLIP tower
    assert frozen["static_bytes"] < full["static_bytes"]
    # FSDP: the fp32 weights, gradients and moments sharded over the 8 workers, plus what the code gathers: the
    # root unit's bf16 weights and fp32 gradients (embeddings, heads, fusion, ...) and two of EVA-g's blocks.
    sharded = (4 * full["parameters"] + 12 * full["trainable"]) // 8
    assert sharded < fsdp["static_bytes"] < sharded + 2**30
    assert configured["name"].startswith("as configured: DDP") and "gradient checkpointing" in configured["name"]
    assert configured["total_bytes"] == checkpointed["total_bytes"]  # msrvtt.yaml: DDP with checkpointing


def _bench_checkpoint(args: list[str], out) -> dict:
    result = CliRunner().invoke(main, ["bench", "checkpoint", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "pause vs synchronous" in result.output
    return json.loads(out.read_text())


def test_bench_checkpoint_times_both_ways_of_storing_and_every_checkpoint_is_whole(tmp_path):
    store = tmp_path / "store"
    args = ["--size", "config", "--size", "2e6", "--checkpoints", "2", "--storage", str(store)]
    payload = _bench_checkpoint(args, tmp_path / "c.json")
    config, linear = payload["sizes"]
    assert config["size"] == "config" and 1.9e6 < linear["parameters"] < 2.1e6
    assert 0 <= linear["state_bytes"] - 3 * 4 * linear["parameters"] < 1024  # fp32 weights, AdamW's moments, steps
    for row in payload["sizes"]:
        for mode in ("synchronous", "background"):
            r = row[mode]
            assert r["whole"] and len(r["pauses_s"]) == len(r["stored_all_s"]) == 2, (row["size"], mode)
            assert 0 < r["pause_s"] and 0 < r["stored_s"]
    assert not list(store.iterdir())  # stored there, checked whole, then removed: the bench leaves nothing behind


def test_bench_checkpoint_rejects_a_size_that_is_not_a_model():
    result = CliRunner().invoke(main, ["bench", "checkpoint", "--size", "big"])
    assert result.exit_code != 0 and "--size 'big': give 'config' or a parameter count such as 1e9" in result.output


@pytest.mark.long
def test_the_checkpoint_bench_of_the_performance_page_runs_as_printed(tmp_path):
    """docs/performance.md's command: the demo's model and 1 B parameters (4 GB of weights, two copies and the file's
    pages in memory at once: about 12 GB of RSS)."""
    import shlex
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "performance.md").read_text()
    printed = [line for line in page.splitlines() if line.startswith("gram-ray bench checkpoint ")]
    assert len(printed) == 1, printed
    args = shlex.split(printed[0])[3:]
    payload = _bench_checkpoint(args, tmp_path / "c.json")
    assert [row["size"] for row in payload["sizes"]] == ["config", 1_000_000_000]
    assert all(row[mode]["whole"] for row in payload["sizes"] for mode in ("synchronous", "background"))
