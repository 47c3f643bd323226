"""`gram-ray bench scale` at a size whose manifest is planned in pieces (over data/manifest_stream.STREAM_BYTES):
a preprocess SIGKILLed a third of the way resumes with every piece written once, and each phase reports."""

import json
import math
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from gram_ray.cli import main


@pytest.mark.slow
@pytest.mark.long  # about a minute: in `make test-cluster`, so that `make test` stays under 25 minutes on 2 cores
def test_a_killed_preprocess_of_a_large_manifest_resumes_with_every_piece_written_once(tmp_path, monkeypatch):
    """docs/performance.md's command, as printed (its --work under this test's folder)."""
    page = (Path(__file__).parents[1] / "docs" / "performance.md").read_text()
    printed = [line for line in page.splitlines() if line.startswith("gram-ray bench scale --clips")]
    assert len(printed) == 1, printed
    args = shlex.split(printed[0])[1:]
    clips = int(args[args.index("--clips") + 1])  # 120,000: a 17 MB manifest, read in pieces
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "stand-in decode: a tiny synthetic row a clip, no video (bookkeeping only)" in result.output
    (r,) = json.loads((tmp_path / "s.json").read_text())["results"]
    assert r["clips"] == clips and r["pieces"] == math.ceil(clips / r["clips_a_piece"]) == r["phases"]["plan"]["pieces"]
    killed = r["phases"]["preprocess"]["pieces_before_kill"]
    assert 0 < killed < r["pieces"] and r["phases"]["resume"]["reused"] == killed
    assert r["written_once"] and r["phases"]["resume"]["clips"] == clips
    assert r["phases"]["index"]["ids"] == clips and r["listed"] == r["pieces"]
    assert 0 < r["checkpoint_state_bytes"] < 1_000_000
    for phase in ("plan", "preprocess", "resume", "read", "index"):
        assert r["phases"][phase]["peak_mb"] > 50, phase
