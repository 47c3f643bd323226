"""What a person sees: `gram-ray demo` (the command behind `make demo`, here on 64 clips for 2 epochs) prints
gram-ray's own lines only. Ray's known-harmless warnings and error-level lines (cli/ray_noise.py says which and
why) go to the log file the console names, not to the console; any other line of Ray's would still show."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gram_ray.cli.ray_noise import is_harmless

pytestmark = pytest.mark.slow

# How Ray's own lines look on a console: Python logging's level names, glog's "[time E pid tid] file.cc:line",
# the raylet's and workers' prefixed lines, and a traceback.
RAY_LINE = re.compile(r"\bWARNING\b|\bERROR\b|^\[[^\]]* [EWF] \d+ \d+\]|\.cc:\d+|^\((raylet|pid=|\w+ pid=)|Traceback")


def test_the_demo_console_shows_no_ray_warning_or_error_line(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "gram_ray", "synth", "--out", str(data), "--n", "64"], check=True,
                   capture_output=True)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"WANDB_MODE": "disabled"}
    demo = [sys.executable, "-m", "gram_ray", "demo", "--data", str(data), "--out", str(tmp_path / "out")]
    small = ["train.epochs=2", "train.eval_every_epochs=1", "train.batch_size=8", "train.warmup_steps=1"]
    run = subprocess.run(
        demo + [a for s in small for a in ("--set", s)], env=env, capture_output=True, text=True, timeout=900
    )
    console = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0, "\n".join(console[-30:])
    assert [line for line in console if RAY_LINE.search(line)] == []
    assert any(line.startswith("demo text-video-audio finished in") for line in console)
    logs = next(line for line in console if line.startswith("Ray's full logs: ")).split()[3]
    kept = [line for line in (Path(logs) / "gram-ray-console.log").read_text().splitlines() if line.strip()]
    assert kept and all(is_harmless(line) for line in kept)  # Ray did say them: here, not on the console
