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


def test_the_stderr_filter_keeps_only_harmless_lines_off_and_shows_the_last_line_at_exit(tmp_path):
    """Ray's core worker writes to file descriptor 2 itself: the filter there drops the known-harmless lines into
    the log and passes every other byte through, a final `Error:` line written just before exit included."""
    log = tmp_path / "kept.log"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from gram_ray.cli.ray_noise import _Log, _StderrFilter\n"
        f"log = _Log(); log.open(Path({str(log)!r})); _StderrFilter(log)\n"
        "os.write(2, b'[2026 E 1 1] core_worker.cc:2465: A has constructor arguments in the object store and "
        "max_restarts > 0\\n')\n"
        "os.write(2, b'a real problem\\n')\n"
        "os.write(2, b'progress 50%\\r')\n"
        "sys.stderr.write('Error: the last line\\n')\n"
        "sys.exit(1)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)  # bytes: \r kept
    assert run.returncode == 1
    assert run.stderr == b"a real problem\nprogress 50%\rError: the last line\n"
    assert "constructor arguments in the object store" in log.read_text()
