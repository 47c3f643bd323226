"""`make gpu-check` is run by whoever first gets a GPU, with minutes to spare: its dry run and its report must
work before that day."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without a GPU does")
def test_dry_run_without_a_gpu_skips_the_gpu_parts_and_says_why(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Dry run" in proc.stdout
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["tests", "volume", "train", "data", "search", "fsdp", "demo"]
    assert all(p["status"] == "skipped" for p in parts.values())
    for name in ("volume", "train", "data", "search", "fsdp", "demo"):
        assert "no CUDA device" in parts[name]["reason"]
    tests = parts["tests"]["result"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] == len(tests["tests"]) >= 4
    assert "needs a CUDA GPU" in tests["tests"][0]["message"]
    table = (tmp_path / "gpu-check.txt").read_text()
    assert "no GPU" in table and f"{tests['skipped']} skipped" in table
    assert (tmp_path / "gpu-check.log").read_text()


def _volume_result(paper_ms, compiled_ms, floor_ms, paper_mib, compiled_mib):
    variants = [("paper", paper_ms, paper_mib), ("gram_volume", compiled_ms * 2, compiled_mib),
                ("cosine", floor_ms, 10), ("gram_volume+compile", compiled_ms, compiled_mib),
                ("cosine+compile", floor_ms, 10)]  # fmt: skip
    return {
        "results": [
            {"variant": v, "description": "", "seconds": ms / 1e3, "peak_bytes": mib * 2**20} for v, ms, mib in variants
        ],
        "compiled_speedup_vs_paper": paper_ms / compiled_ms,
        "compiled_ratio_to_compiled_floor": compiled_ms / floor_ms,
    }


def test_report_table_judges_the_figures_against_the_targets():
    # What the first GPU run will print: each figure beside its target, met or missed.
    path = {"data_ms": 1.0, "forward_ms": 30.0, "backward_ms": 60.0, "optimizer_ms": 9.0, "step_ms": 100.0,
            "peak_gpu_mib": 2e4, "tflops": 300.0, "mfu": 0.30, "samples_per_s": 320.0, "timed_steps": 15}  # fmt: skip
    train = {"hardware": "NVIDIA H100 80GB HBM3", "model_parameters": 282e6, "batch_size": 32, "workers": 1,
             "steps": 15, "bf16": True, "compile": False, "flops_per_step": 1e14, "peak_bf16_tflops": 989.0,
             "paths": {"plain": path, "loop": dict(path, samples_per_s=300.0), "ray": dict(path, samples_per_s=250.0)},
             "ratios": {"loop/plain": 300 / 320, "ray/plain": 250 / 320}}  # fmt: skip
    strategy = {"state_bytes": 4.5e9, "peak_bytes": 9e9, "step_s": 0.5, "losses": [1.0]}
    searched = {"clips": 10**6, "modalities": 3, "dim": 512, "device": "cuda", "batch_queries": 1000,
                "search_bytes_per_clip": 4100, "stored_bytes_per_clip": 4900.0, "peak_search_bytes": 2**28,
                "scan_only_batch_ms": 50.0, "candidates_mean": 24.0, "candidates_max": 40,
                "exact": True}  # fmt: skip
    search = {"hardware": "NVIDIA H100 80GB HBM3", "results": [
        dict(searched, dtype="float16", one_query_ms=2.1, batch_ms=60.0),
        dict(searched, dtype="float32", one_query_ms=3.0, batch_ms=140.0)]}  # fmt: skip
    fsdp = {"workers": 2, "steps": 5, "warmup": 2, "grad_accum": 2, "micro_batch": 8, "fsdp_sync": "every_micro_batch",
            "ddp": strategy, "fsdp": dict(strategy, state_bytes=2.25e9, step_s=0.6), "parameters": 282e6,
            "max_weight_diff": 1e-3, "max_loss_diff": 1e-2, "peak_measure": "cuda"}  # fmt: skip
    report = {
        "device": "NVIDIA H100 80GB HBM3",
        "ran_on": "cuda",
        "smoke": False,
        "torch": "2.11.0",
        "ray": "2.60.0",
        "seconds": 400,
        "parts": {
            "volume k3-1024x8192": {
                "status": "passed",
                "seconds": 30,
                "result": _volume_result(18.4, 1.3, 1.2, 1900, 290),
            },
            "volume k5-1024x8192": {
                "status": "passed",
                "seconds": 30,
                "result": _volume_result(40.8, 3.0, 2.3, 4000, 300),
            },
            "train": {"status": "passed", "seconds": 120, "result": train},
            "fsdp": {"status": "passed", "seconds": 60, "result": fsdp},
            "search": {"status": "passed", "seconds": 50, "result": search},
        },
    }
    table = gpu_check.summary_table(report)
    k3, k5 = (line for line in table.splitlines() if "targets:" in line and "paper" in line)
    assert k3.count("meets") == 3  # 14x the paper, 1.08x the floor, 0.15 of its memory
    assert "x paper meets" in k5 and "x floor MISSES" in k5  # 13.6x the paper, 1.30x the floor
    assert "(c) >= 90% of (a): MISSES" in table  # 250 / 320 = 78%
    assert "30.0%" in table and "989 TFLOP/s" in table
    assert "FSDP/DDP: state 0.50x, peak 1.00x, step time 1.20x" in table
    assert "1 query <= 10.0 ms meets; 1000 queries <= 100.0 ms MISSES" in table  # float32's 140 ms
