"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`): a head that trains nothing, as on a real
cluster, and worker nodes that each hold one "GPU" (a custom resource, so one trainer worker lands on each).
Media, caches, checkpoints and results live in a bucket of the local S3 server: nothing a later job needs stays
on a node's disk. Nodes are removed without warning, as a spot node goes."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tiny import tiny_config

from gram_ray import storage
from gram_ray.config import save_config
from gram_ray.train.resume import SNAPSHOT

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

WORKER_NODE = {"num_cpus": 4, "resources": {"fake_gpu": 1}, "object_store_memory": 200 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs and two worker nodes, all on 127.0.0.1, with the session's token authentication;
    removed afterwards (its own processes only)."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "dashboard_host": "127.0.0.1",
            "object_store_memory": 100 * 2**20,
            "temp_dir": tempfile.mkdtemp(prefix="rc", dir="/tmp"),
        },
    )
    workers = [c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE) for _ in range(2)]
    c.wait_for_nodes()
    record = Path(get_ray_address_file(None))
    try:
        yield {"cluster": c, "workers": workers}
    finally:
        c.shutdown()
        if record.is_file() and record.read_text().strip() == c.address:
            record.unlink()  # Cluster records itself as the machine's current cluster: take that back


def _train(cluster, cfg, out: Path) -> subprocess.Popen:
    save_config(cfg, out / "config.yaml")
    env = os.environ | {
        "RAY_ADDRESS": cluster["cluster"].address,
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",  # a lost node's replacement takes a while here
    }
    command = [sys.executable, "-m", "gram_ray", "train", "--config", str(out / "config.yaml"), "--out", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_steps(run: str) -> list[int]:
    try:
        snapshot = json.loads(storage.read_text(storage.join(run, SNAPSHOT)))
    except (OSError, ValueError):
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results") or []]


def _assert_every_clip_once_after_each_checkpoint(run: str, steps_per_epoch: int, per_step: int) -> None:
    """Exact resume: every mid-epoch checkpoint lists exactly the clips of its epoch's steps, each once."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(run)
    folders = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory]
    positions = [
        json.loads(storage.read_text(storage.join(run, name, "position.json")))
        for name in folders
        if name.startswith("checkpoint_")
    ]
    assert positions
    for p in positions:
        if not p["epoch_complete"]:
            steps_in_epoch = p["step"] - steps_per_epoch * p["epoch"]
            assert len(set(p["consumed_ids"])) == len(p["consumed_ids"]) == per_step * steps_in_epoch, p


def test_a_node_lost_mid_epoch_is_replaced_and_the_run_ends_at_the_planned_step(cluster, s3, synth_small, tmp_path):
    data = s3.upload_dataset(synth_small)
    bucket = data["val"].split("/data/")[0]
    cfg = tiny_config(
        "run.name=lost-node",
        f"run.storage_path={bucket}/runs",
        "train.epochs=2",  # 16 clips / (2 per worker x 2 workers): 4 steps an epoch, 8 in all
        "train.batch_size=2",
        "train.checkpoint_every_steps=1",
        "train.keep_checkpoints=1000",
        "train.eval_every_epochs=100",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={CPU: 1, fake_gpu: 1}",
        "scaling.max_failures=2",
        "data.materialize=never",  # streamed from the bucket: nothing of the data lives on a node
        f"data.train_annotations={data['train']}",
        f"data.video_dir={data['videos']}",
        f"data.audio_dir={data['audios']}",
    )
    run = f"{bucket}/runs/lost-node"
    driver = _train(cluster, cfg, tmp_path)
    c, lost = cluster["cluster"], cluster["workers"][1]
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline:
        steps = _checkpoint_steps(run)
        if steps and max(steps) % 4 in (1, 2):  # a mid-epoch checkpoint is in the bucket: the node goes now
            break
        time.sleep(0.2)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    c.remove_node(lost, allow_graceful=False)
    removed_at = time.monotonic()
    time.sleep(5)
    replacement = c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE)
    cluster["workers"][1] = replacement
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-4000:]
    assert "worker group failed" in output and "recovered:" in output, output[-4000:]

    result = json.loads(storage.read_text(f"{run}/result.json"))
    last = result["last_metrics"]
    assert last["step"] == last["total_steps"] == 8
    nodes = last["world/nodes"].split(",")
    assert last["world/size"] == 2 and len(set(nodes)) == 2
    assert replacement.node_id in nodes and lost.node_id not in nodes
    assert c.head_node.node_id not in nodes  # the head trains nothing
    (recovery,) = result["recoveries"]
    assert recovery["steps_lost"] >= 0 and 0 < recovery["recovery_s"] < time.monotonic() - removed_at + 5
    _assert_every_clip_once_after_each_checkpoint(run, steps_per_epoch=4, per_step=4)
    print(json.dumps(recovery), output[-3000:])
