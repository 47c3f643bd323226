"""`gram-ray bench preprocess`: the runs it makes (1 and 2 decode workers, a tenth and all of the clips, a 2-node
Ray cluster on this machine) and what it measures of each. Starts Rays of its own: a process of its own."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]


def test_bench_preprocess_decodes_every_clip_in_each_run_and_measures_each_decode_worker(tmp_path):
    out = tmp_path / "preprocess.json"
    command = [sys.executable, "-m", "gram_ray", "bench", "preprocess", "--clips", "20", "--work", str(tmp_path),
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["1 worker, 2 clips", "1 worker, 20 clips", "2 workers, 20 clips", "2 nodes x 1 CPU, 20 clips"]
    for r in runs.values():
        assert r["written"] == r["clips"] and r["clips_per_s"] > 0
        # Each decode worker was found and measured: a Ray worker process with a torch and a video decoder loaded.
        assert len(r["worker_peak_rss_mb"]) == r["decode_workers"] >= 1
        assert 100 < r["max_worker_peak_rss_mb"] < 3000, r
    assert runs["2 workers, 20 clips"]["decode_workers"] == 2
    assert (runs["2 nodes x 1 CPU, 20 clips"]["decode_workers"], runs["2 nodes x 1 CPU, 20 clips"]["nodes_used"]) == (
        2,
        2,
    )
    # A worker holds one shard at a time: its peak does not follow the number of clips.
    assert result["worker_peak_growth_10x_clips"] < 1.25
    assert "2 workers:" in done.stdout and "peak MB/worker" in done.stdout
    # The clips are kept for the next run; the caches were the benchmark's own.
    assert len(list((tmp_path / "clips" / "videos").iterdir())) == 20
    assert not list(tmp_path.glob("cache-*"))


def test_bench_preprocess_from_a_bucket_counts_the_requests_of_files_and_of_shards(tmp_path):
    """The same clips in a local S3 bucket, as one object a video and an audio and as tar shards of 10: both decode
    every clip; shards ask the server for far fewer objects a clip."""
    out = tmp_path / "sources.json"
    command = [sys.executable, "-m", "gram_ray", "bench", "preprocess", "--clips", "30", "--work", str(tmp_path),
               "--source", "files", "--source", "webdataset", "--clips-per-shard", "10",
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    runs = {r["source"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["files", "webdataset"]
    for r in runs.values():
        assert r["written"] == r["clips"] == 30 and r["clips_per_s"] > 0 and r["decode_workers"] >= 1
        assert 100 < r["max_worker_peak_rss_mb"] < 3000, r
    # Files: a GET for each video and audio at least; shards: a few requests for each of 3 tars.
    assert runs["files"]["requests"].get("GET", 0) >= 60
    assert runs["webdataset"]["requests_per_clip"] * 5 < runs["files"]["requests_per_clip"]
    assert "fewer requests a clip than files" in done.stdout
