"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`): a head that trains nothing, as on a real
cluster, and worker nodes that each hold one "GPU" (a custom resource, so one trainer worker lands on each).
Media, caches, checkpoints and results live in a bucket of the local S3 server: nothing a later job needs stays
on a node's disk. Nodes are removed without warning, as a spot node goes."""

import contextlib
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

    from gram_ray.cluster.health import node_health_env

    with _environment(node_health_env()):  # as the cluster YAMLs start their head (cluster/health.py)
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
    removed = _record_removals(c)
    workers = [c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE) for _ in range(2)]
    c.wait_for_nodes()
    record = Path(get_ray_address_file(None))
    try:
        yield {"cluster": c, "workers": workers}
        # Fast health checks must not declare a loaded node dead: every dead node is one a test removed.
        falsely_dead = _dead_nodes(c.gcs_address) - removed
        assert not falsely_dead, f"nodes declared dead that no test removed (false deaths): {falsely_dead}"
    finally:
        c.shutdown()
        if record.is_file() and record.read_text().strip() == c.address:
            record.unlink()  # Cluster records itself as the machine's current cluster: take that back


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    """os.environ with `variables`, restored afterwards (what processes started meanwhile inherit)."""
    before = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _record_removals(c) -> set[str]:
    """The ids of the nodes tests remove from the cluster (Cluster.remove_node), as they are removed."""
    removed: set[str] = set()
    remove = c.remove_node

    def remove_node(node, *args, **kwargs):
        removed.add(node.node_id)
        return remove(node, *args, **kwargs)

    c.remove_node = remove_node
    return removed


def _dead_nodes(gcs_address: str) -> set[str]:
    import ray._raylet
    from ray.core.generated import gcs_pb2

    nodes = ray._raylet.GcsClient(address=gcs_address).get_all_node_info(timeout=10)
    return {nid.hex() for nid, info in nodes.items() if info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD}


def _train(cluster, cfg, out: Path, start_timeout_s: int | None = 120) -> subprocess.Popen:
    """gram-ray train against the cluster; start_timeout_s: how long a worker group start may wait for its
    resources (a lost node's replacement takes a while here), None: what gram-ray sets."""
    save_config(cfg, out / "config.yaml")
    env = os.environ | {"RAY_ADDRESS": cluster["cluster"].address}
    if start_timeout_s is not None:
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(start_timeout_s)
    command = [sys.executable, "-m", "gram_ray", "train", "--config", str(out / "config.yaml"), "--out", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_steps(run: str) -> list[int]:
    try:
        snapshot = json.loads(storage.read_text(storage.join(run, SNAPSHOT)))
    except (OSError, ValueError):
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results") or []]


def _assert_every_clip_once_after_each_checkpoint(run: str, steps_per_epoch: int, per_step: int) -> None:
    """Exact resume: every mid-epoch checkpoint lists exactly the clips of its epoch's steps, each once. Only whole
    checkpoints count, as for `--resume`: a rank on the node that was lost may have been cut off while uploading
    one (seen: a folder without its position.json)."""
    import pyarrow.fs as pafs

    from gram_ray.train.resume import checkpoint_is_whole, position

    fs, root = storage.resolve(run)
    folders = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory]
    checkpoints = [storage.join(run, name) for name in folders if name.startswith("checkpoint_")]
    positions = [position(folder) for folder in checkpoints if checkpoint_is_whole(folder)]
    assert positions
    for p in positions:
        if not p["epoch_complete"]:
            steps_in_epoch = p["step"] - steps_per_epoch * p["epoch"]
            progress = p["epoch_progress"]
            assert (progress["trained"], progress["repeats"]) == (per_step * steps_in_epoch, 0), p


def test_a_node_lost_mid_epoch_is_replaced_and_the_run_ends_at_the_planned_step(cluster, s3, synth_small, tmp_path):
    data = s3.upload_dataset(synth_small)
    bucket = s3.bucket_of(data)
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


def _reported(run: str) -> list[dict]:
    """The metrics of every checkpoint the run registered, by step ([] while the snapshot is being rewritten)."""
    try:
        snapshot = json.loads(storage.read_text(storage.join(run, SNAPSHOT)))
    except (OSError, ValueError):
        return []
    return sorted((r["metrics"] for r in snapshot.get("checkpoint_results") or []), key=lambda m: m["step"])


def wait_for_reports(driver, run: str, condition, what: str, limit: float = 300) -> list[dict]:
    """The run's registered reports once condition(reports) holds; an error saying `what` was not seen (and how the
    driver ended, if it did) after `limit` seconds."""
    deadline = time.monotonic() + limit
    while driver.poll() is None and time.monotonic() < deadline:
        reports = _reported(run)
        if condition(reports):
            return reports
        time.sleep(0.2)
    ended = driver.stdout.read()[-3000:] if driver.poll() is not None else ""
    raise AssertionError(f"{what}: not seen; {ended}")


def test_an_elastic_run_shrinks_to_one_worker_without_waiting_and_grows_back(cluster, s3, synth_small, tmp_path):
    """scaling.num_workers [1, 2]: a lost node leaves one worker, which goes on at once (no replacement is
    waited for); when a node comes back the group grows to 2 again. Every step trains on the same 4 clips (2 a
    micro-batch: 2 workers x 2, or 1 worker x 2 accumulated), the run ends at the planned step, and every epoch's
    clips are each trained on once."""
    data = s3.upload_dataset(synth_small)
    bucket = s3.bucket_of(data)
    cfg = tiny_config(
        "run.name=elastic",
        f"run.storage_path={bucket}/runs",
        # 16 clips / 4 a step: 4 steps an epoch, 32 in all: after the node comes back the run must last longer than
        # Ray takes to see it and the group to grow (at 3 epochs a one-worker run once finished first).
        "train.epochs=8",
        "train.batch_size=2",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=1",
        "train.keep_checkpoints=1000",
        "train.eval_every_epochs=100",
        "scaling.num_workers=[1, 2]",
        "scaling.resources_per_worker={CPU: 1, fake_gpu: 1}",
        "scaling.max_failures=3",
        "scaling.resize_check_s=2",
        "data.materialize=never",
        f"data.train_annotations={data['train']}",
        f"data.video_dir={data['videos']}",
        f"data.audio_dir={data['audios']}",
    )
    run = f"{bucket}/runs/elastic"
    driver = _train(cluster, cfg, tmp_path, start_timeout_s=None)  # gram-ray's elastic default
    c = cluster["cluster"]

    def wait_for(condition, what: str, limit: float = 300):
        return wait_for_reports(driver, run, condition, what, limit)

    wait_for(lambda r: any(m["world/size"] == 2 and m["step"] >= 2 for m in r), "two workers training")
    lost = cluster["workers"][1]
    c.remove_node(lost, allow_graceful=False)
    removed_at = time.monotonic()
    reports = wait_for(lambda r: r and r[-1]["world/size"] == 1, "one worker going on")
    shrunk_after_s = time.monotonic() - removed_at
    shrunk_step = reports[-1]["step"]
    wait_for(lambda r: r and r[-1]["step"] >= shrunk_step + 2, "two more steps on one worker")
    back = c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE)
    cluster["workers"][1] = back
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-4000:]

    result = json.loads(storage.read_text(f"{run}/result.json"))
    last = result["last_metrics"]
    assert last["step"] == last["total_steps"] == 32
    assert last["world/size"] == 2 and back.node_id in last["world/nodes"].split(",")
    reports = _reported(run)
    assert {m["train/step_clips"] for m in reports} == {4}  # the same global batch at every step, at every size
    assert [w["workers"] for w in result["world_sizes"]] == [2, 1, 2], result["world_sizes"]
    causes = [r["cause"] for r in result["recoveries"]]
    assert causes == ["failure", "resize"], result["recoveries"]
    # No replacement is waited for: the node comes back only once one worker has trained two steps. The time is
    # Ray noticing the loss (GCS health checks ~15 s, its autoscaling coordinator's view refreshed every 20 s;
    # each start at the old size meanwhile waits scaling.start_timeout_s) and the new group's start.
    assert shrunk_after_s < 120
    assert "1 worker x 2 clips x 2 micro-batches = 4 clips a step" in output  # the plan, said at the start
    assert "world size: 2 -> 1 workers" in output and "world size: 1 -> 2 workers" in output
    assert "resizing the worker group: 1 -> 2 workers" in output
    _assert_every_clip_once_after_each_checkpoint(run, steps_per_epoch=4, per_step=4)
    print(json.dumps({"recoveries": result["recoveries"], "world_sizes": result["world_sizes"]}), output[-3000:])
