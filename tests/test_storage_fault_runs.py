"""Whole training runs with everything in a bucket behind the fault layer (tests/storage_faults.py), as a user
runs them: `gram-ray train` in its own process, starting its own Ray, every process of it (driver, Ray Data tasks,
the Train worker) reaching storage through the faults.

- Transient faults (each kind, seeded, fewer in a row than the attempts allow) and a blip of every checkpoint
  request for longer than the attempts, shorter than storage.outage_s: the run ends as the same run with no
  faults does, checkpoint for checkpoint: same weights bit for bit (one worker on CPU, data.preserve_order: the
  batches come in the same order however long a read took).
- Storage gone for good at a checkpoint upload: the run ends within a bound with an error naming storage and the
  object; the checkpoint before stays whole and registered, and `--resume auto` ends the run at its planned step.
- The same for storage gone at a cache read (after Ray Data's own retries: the error names the cache object, not
  Ray's traceback) and at the run's last write, its result.json (resumed from the last checkpoint, at the planned
  step, to write it).
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from storage_faults import Fault, FaultyS3

from gram_ray import storage

# The transient plan and storage gone at a checkpoint are in `make test` (about 4.5 minutes for their four training
# runs); the cache read and the result write, in `make test-cluster` (marker `long`).
pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 8  # tiny.REPEATABLE_RUN: 16 clips, 4 a step, 2 epochs
SETTINGS = ["storage.max_attempts=4", "storage.request_timeout_s=3", "storage.connect_timeout_s=3"]


def _config(tmp_path: Path, data: dict, runs: str, *extra: str) -> Path:
    from tiny import REPEATABLE_RUN, synth_data, tiny_config

    from gram_ray.config import save_config

    cfg = tiny_config(
        "run.name=faults",
        f"run.storage_path={runs}",
        *REPEATABLE_RUN,
        *SETTINGS,
        *synth_data(data),
        *extra,
    )
    path = tmp_path / f"{runs.rsplit('/', 1)[-1]}.yaml"
    save_config(cfg, path)
    return path


def _train(config: Path, out: Path, proxy: FaultyS3, *args: str, timeout: float = 600) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "AWS_ENDPOINT_URL": proxy.endpoint,
        "WANDB_MODE": "disabled",
    }
    command = [sys.executable, "-m", "gram_ray", "train", "--config", str(config), "--out", str(out), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(run: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = run.communicate(timeout=timeout)
    return run.returncode, output


def _checkpoints(run_root: str) -> dict[int, dict]:
    """{step: {"position", "model"}} of the run's checkpoints in the bucket."""
    from gram_ray.model.checkpoint import load_checkpoint
    from gram_ray.train.resume import checkpoint_is_whole, position

    fs, path = storage.resolve(run_root)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path))
    folders = [
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    ]
    found = {}
    for name in folders:
        folder = storage.join(run_root, name)
        assert checkpoint_is_whole(folder), folder
        where = position(folder)
        found[where["step"]] = {"position": where, "model": load_checkpoint(folder)["model"]}
    return found


def _when_registered(run_root: str, then, timeout: float = 300) -> threading.Thread:
    """Call then() as soon as Ray Train has registered the run's first checkpoint (read straight from the S3
    server, not through the fault layer: the test's own process talks to it directly)."""
    from gram_ray.train.resume import SNAPSHOT

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if storage.read_json(storage.join(run_root, SNAPSHOT)).get("checkpoint_results"):
                    then()
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _resumed_to_the_end(config: Path, out: Path, proxy: FaultyS3, run_root: str) -> str:
    """Storage is back: `gram-ray train --resume auto` continues from the run's newest whole, registered checkpoint
    and ends at the planned step. The checkpoint it continued from."""
    from gram_ray.train.resume import latest_checkpoint

    proxy.heal()
    kept = latest_checkpoint(run_root, log=lambda line: None)
    assert kept is not None, f"no whole, registered checkpoint under {run_root}"
    code, output = _finish(_train(config, out, proxy, "--resume", "auto"))
    assert code == 0, output[-3000:]
    assert f"--resume auto: continuing from {kept}" in output
    result = json.loads((out / "result.json").read_text())
    assert result["last_metrics"]["step"] == result["last_metrics"]["total_steps"] == STEPS
    return kept


def test_a_run_through_transient_faults_and_a_checkpoint_blip_ends_as_the_run_without_faults(faulty_bucket, tmp_path):
    data, bucket, proxy = faulty_bucket
    clean = _config(tmp_path, data, f"{bucket}/clean")
    started = time.monotonic()
    code, output = _finish(_train(clean, tmp_path / "clean", proxy))
    clean_took = time.monotonic() - started
    assert code == 0, output[-3000:]
    clean_requests = len(proxy.entries(key="/clean/"))

    faulty = _config(tmp_path, data, f"{bucket}/faulty", "storage.outage_s=40")
    every = [Fault(kind, key="/faulty/", rate=0.01, stall_s=5) for kind in ("503", "500", "reset", "cut", "stall")]
    proxy.add(*every)
    blip = {}

    def start_blip():  # every checkpoint request fails for 12 s: past 4 attempts (< 7 s), inside outage_s
        blip["fault"] = proxy.outage("503", seconds=12, key=r"/faulty/faults/checkpoint_")
        blip["end"] = time.monotonic() - proxy.started + 12

    proxy.when_stored(r"/faulty/faults/checkpoint_[^/]*/manifest\.json", start_blip)
    started = time.monotonic()
    code, output = _finish(_train(faulty, tmp_path / "faulty", proxy))
    took = time.monotonic() - started
    assert code == 0, output[-3000:]

    injected = proxy.injected()
    assert blip and blip["fault"].injected >= 4  # the blip outlasted a request's attempts at least once
    # The blip's requests after its end went through: every upload it failed was tried again and completed.
    assert [e for e in proxy.entries(key=r"/faulty/faults/checkpoint_") if e.t > blip["end"]]
    assert sum(injected.values()) - blip["fault"].injected >= 5, injected
    print(
        f"\nclean run: {clean_took:.0f} s, {clean_requests} requests; faulty run: {took:.0f} s, "
        f"{len(proxy.entries(key='/faulty/'))} requests, injected {dict(injected)} (the blip: {blip['fault'].injected})"
    )

    clean_result = json.loads((tmp_path / "clean" / "result.json").read_text())
    faulty_result = json.loads((tmp_path / "faulty" / "result.json").read_text())
    assert faulty_result["last_metrics"]["step"] == clean_result["last_metrics"]["step"] == STEPS
    assert faulty_result["best_eval"] == clean_result["best_eval"]
    for key in ("train/loss", "step", "epoch"):
        assert faulty_result["last_metrics"][key] == clean_result["last_metrics"][key], key
    clean_ckpts, faulty_ckpts = _checkpoints(f"{bucket}/clean/faults"), _checkpoints(f"{bucket}/faulty/faults")
    assert sorted(clean_ckpts) == sorted(faulty_ckpts) == [2, 4, 6, 8]
    for step, ckpt in clean_ckpts.items():
        assert faulty_ckpts[step]["position"] == ckpt["position"]
        for name, tensor in ckpt["model"].items():
            assert torch.equal(faulty_ckpts[step]["model"][name], tensor), (step, name)


def test_storage_gone_at_a_checkpoint_upload_ends_the_run_clearly_and_resume_auto_finishes_it(faulty_bucket, tmp_path):
    from gram_ray.train.resume import checkpoint_is_whole, position

    data, bucket, proxy = faulty_bucket
    run_root = f"{bucket}/gone/faults"
    config = _config(tmp_path, data, f"{bucket}/gone", "storage.max_attempts=2", "storage.outage_s=10")
    outage = {}

    def go_away():  # the first checkpoint is registered: from now on no checkpoint request is answered
        outage["fault"] = proxy.outage("503", key=r"/gone/faults/checkpoint_")
        outage["at"] = time.monotonic()

    _when_registered(run_root, go_away)
    code, output = _finish(_train(config, tmp_path / "out", proxy))
    ended = time.monotonic()
    assert code != 0 and outage, output[-3000:]
    last = output.strip().splitlines()[-1]
    # Whichever meets the outage first ends the run: the worker uploading the next checkpoint, or Ray Train's
    # controller registering one (checkpoint_manager_snapshot.json).
    assert last.startswith("Error: training failed"), output[-3000:]
    assert re.search(r"storage failed (creating|uploading|writing) s3://"
                     rf"{bucket.removeprefix('s3://')}/gone/faults/checkpoint_", last), last  # fmt: skip
    assert "storage.outage_s=10 s" in last and "--resume auto" in last
    # outage_s, then the last try's 2 attempts (< 1 s of backoff) on each file, then Ray's teardown
    assert ended - outage["at"] < 10 + 30 + 30, ended - outage["at"]
    print(f"\nstorage gone at a checkpoint: the run ended {ended - outage['at']:.0f} s later: {last}")

    kept = _resumed_to_the_end(config, tmp_path / "out", proxy, run_root)
    assert checkpoint_is_whole(kept) and position(kept)["step"] >= 2


@pytest.mark.long
def test_storage_gone_at_a_cache_read_ends_the_run_clearly_and_resume_auto_finishes_it(faulty_bucket, tmp_path):
    from gram_ray.train.resume import position

    data, bucket, proxy = faulty_bucket
    run_root = f"{bucket}/read/faults"
    config = _config(tmp_path, data, f"{bucket}/read", "storage.max_attempts=2", "storage.outage_s=10")
    outage = {}

    def go_away():  # from the first checkpoint on, no read of the caches is answered: the next epoch's fail
        outage["fault"] = proxy.outage("503", method="GET", key=r"/read/faults/cache/")
        outage["at"] = time.monotonic()

    _when_registered(run_root, go_away)
    code, output = _finish(_train(config, tmp_path / "out", proxy))
    ended = time.monotonic()
    assert code != 0 and outage and outage["fault"].injected, output[-3000:]
    last = output.strip().splitlines()[-1]
    print(f"\nstorage gone at a cache read: the run ended {ended - outage['at']:.0f} s later: {last}")
    assert last.startswith("Error: training failed"), output[-3000:]
    # Whichever split's read meets the outage first: the next epoch's train batches or the evaluation's. The shard is
    # named when opening it failed; when a read inside a shard already open failed, pyarrow names none (both seen).
    shard = rf"'{bucket.removeprefix('s3://')}/read/faults/cache/(train|val)/shards/shard-\d+\.parquet'"
    inside = r" \(a read inside one of its files; pyarrow does not say which\)"
    named = (
        rf"storage failed reading the (train|val) cache {bucket}/read/faults/cache/(train|val)(: .*{shard}|{inside})"
    )
    assert re.search(named, last), last
    assert "--resume auto" in last and "the checkpoints written before it are untouched" in last

    kept = _resumed_to_the_end(config, tmp_path / "out", proxy, run_root)
    assert position(kept)["step"] >= 2


@pytest.mark.long
def test_storage_gone_at_the_result_write_ends_the_run_clearly_and_resume_auto_writes_it(faulty_bucket, tmp_path):
    from gram_ray.train.resume import position

    data, bucket, proxy = faulty_bucket
    run_root = f"{bucket}/result/faults"
    config = _config(tmp_path, data, f"{bucket}/result", "storage.max_attempts=2", "storage.outage_s=10")
    # The run's last write, its result.json beside the checkpoints, is never answered.
    fault = proxy.outage("503", method="PUT", key=r"/result/faults/result\.json")
    code, output = _finish(_train(config, tmp_path / "out", proxy))
    ended = time.monotonic()
    assert code != 0 and fault.injected, output[-3000:]
    first = next(e.t for e in proxy.entries(key=r"/result/faults/result\.json") if e.outcome == "503")
    took = ended - (proxy.started + first)
    assert took < 10 + 30, took  # outage_s, then the last try's attempts: the driver's write, no teardown
    last = output.strip().splitlines()[-1]
    print(f"\nstorage gone at the result write: the run ended {took:.0f} s after its first try: {last}")
    assert last.startswith("Error: ") and f"storage failed writing {run_root}/result.json" in last, last
    assert "storage.outage_s=10 s" in last

    kept = _resumed_to_the_end(config, tmp_path / "out", proxy, run_root)
    assert position(kept)["step"] == STEPS  # training had finished: its last checkpoint, resumed to write the result
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert json.loads(storage.read_text(f"{run_root}/result.json")) == result
