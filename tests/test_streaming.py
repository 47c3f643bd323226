"""Training on a cache larger than Ray's object store (issue 20, item 3): tests/stream_job.py in a process of its
own, with its own Ray and a 100 MiB object store, trains the demo's model for 2 epochs on 2 workers from a
416 MiB synthetic cache streamed from its Parquet files, one block a file. ~2 min on 2 cores."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.long  # ~2.5 min: in `make test-cluster`, so that `make test` stays under 25 minutes on 2 cores
def test_a_cache_four_times_the_object_store_streams_every_clip_once_an_epoch_in_bounded_memory(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(HERE / "stream_job.py"), str(tmp_path / "work"), str(out)],
        cwd=HERE, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    figures = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in figures.items() if k != "epochs"}, indent=2))
    assert figures["error"] is None
    assert figures["cache_bytes"] >= 4 * figures["object_store_bytes"]
    first, second = figures["epochs"]
    for epoch in (first, second):  # every clip once an epoch (1664 = 26 steps of 64: nothing left by drop_last)
        assert (epoch["train/epoch_clips"], epoch["train/epoch_repeats"]) == (figures["rows"], 0), epoch
        assert epoch["train/peak_rss_mb"] < 1536, epoch  # a worker holds batches, not the cache (measured ~1.1 GB)
    # The object store holds what is in flight, not the cache: at most its capacity plus Ray's fallback allocations
    # at the moment it is full (measured peaks 1.18-1.25x), far from the cache's 4x.
    assert figures["object_store_peak_bytes"] < 1.5 * figures["object_store_bytes"], figures
    # No slowdown that grows with the epochs (a cache piling up in memory or the object store would halve the rate):
    # the second at least half the first's. Measured second/first 0.99-1.29, and 0.70 once in a make test-cluster run
    # on this 2-core machine (where 0.8 was the bound: a timing flake, not a slowdown; it passed alone right after).
    assert second["train/epoch_samples_per_s"] >= 0.5 * first["train/epoch_samples_per_s"], (first, second)
