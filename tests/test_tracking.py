"""What a run reports outlives its node (gram_ray/tracking.py): W&B's key found where the user keeps it and handed
to rank 0 by reference, one W&B run across restarts, metrics.jsonl and the W&B run copied to the run's storage."""

import json
import os
import time

from wandb_records import history, read_records

from gram_ray import storage
from gram_ray.config import load_config
from gram_ray.tracking import METRICS_FILE, RUN_ID_FILE, Tracker, wandb_credentials, wandb_run_id

KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key; no account's


def _netrc(tmp_path, text: str) -> dict:
    path = tmp_path / "netrc"
    path.write_text(text)
    path.chmod(0o600)
    return {"NETRC": str(path)}


def test_the_key_comes_from_the_environment_or_the_netrc_entry_of_wandbs_host(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc of the machine's
    assert wandb_credentials({}) == {}
    assert wandb_credentials({"WANDB_API_KEY": KEY, "WANDB_ENTITY": "lab"}) == {
        "WANDB_API_KEY": KEY,
        "WANDB_ENTITY": "lab",
    }
    entry = _netrc(tmp_path, f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    monkeypatch.setenv("NETRC", entry["NETRC"])
    assert wandb_credentials({})["WANDB_API_KEY"] == KEY
    # a comment that names W&B's host is no entry (a substring search took it for one)
    _netrc(tmp_path, f"# machine api.wandb.ai password {KEY}\nmachine example.com login a password b\n")
    assert "WANDB_API_KEY" not in wandb_credentials({})
    # a self-hosted W&B: the entry of WANDB_BASE_URL's host, not api.wandb.ai's
    _netrc(tmp_path, f"machine api.wandb.ai login u password other\nmachine wandb.lab.example login u password {KEY}\n")
    found = wandb_credentials({"WANDB_BASE_URL": "https://wandb.lab.example"})
    assert found == {"WANDB_BASE_URL": "https://wandb.lab.example", "WANDB_API_KEY": KEY}


def test_a_run_keeps_its_wandb_run_id_beside_its_checkpoints(tmp_path, s3):
    for root in (str(tmp_path / "run"), f"{s3.bucket()}/runs/r"):
        first = wandb_run_id(root, continuing=False)
        assert len(first) == 8 and storage.read_text(storage.join(root, RUN_ID_FILE)).strip() == first
        assert wandb_run_id(root, continuing=True) == first  # a restart, --resume
        assert wandb_run_id(root, continuing=False) != first  # a fresh start is a new W&B run


def test_a_restarted_rank_0_continues_the_same_wandb_run_and_its_logs_reach_the_bucket(tmp_path, s3, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, ["run.name=restarted", "wandb.mode=offline"])
    bucket = f"{s3.bucket()}/runs/restarted"
    run_id = wandb_run_id(bucket, continuing=False)
    credentials = {"WANDB_API_KEY": KEY}
    first = Tracker(cfg, tmp_path / "node-a", run_id=run_id, credentials=credentials, sync_to=bucket)
    for step in (1, 2, 3):
        first.log({"step": step, "train/loss": 3.0 - step / 10})
    first.finish()  # its last copy to the bucket; then the node goes (a preemption; --resume auto after a stop)
    # A restarted rank 0 starts seconds later: W&B names a process's folder by the second it started in (and the id).
    time.sleep(1.1)
    # the restarted group's rank 0 on another node: the same run id, from the checkpoint of step 3
    second = Tracker(cfg, tmp_path / "node-b", resume=True, run_id=wandb_run_id(bucket, continuing=True),
                     credentials=credentials, sync_to=bucket)  # fmt: skip
    for step in (4, 5):
        second.log({"step": step, "train/loss": 3.0 - step / 10})
    second.finish()

    local = tmp_path / "from-bucket"
    for uri in _all_files(bucket):
        target = local / uri[len(bucket) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(uri))
    runs = sorted((local / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one W&B run: `wandb sync` joins them
    steps = [[row["step"] for row in history(read_records(next(r.glob("*.wandb"))))] for r in runs]
    assert steps == [[1, 2, 3], [4, 5]]
    assert [json.loads(line)["step"] for line in (local / METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not (local / "wandb" / "latest-run").exists()  # wandb's symbolic links are not copied
    for path in local.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def _all_files(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return [f"s3://{info.path}" for info in infos if info.type == pafs.FileType.File]


def test_wandb_mode_disabled_in_the_environment_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(load_config(None, ["wandb.mode=offline"]), tmp_path, credentials={"WANDB_API_KEY": KEY})
    assert tracker.run is None and os.environ["WANDB_MODE"] == "disabled"
