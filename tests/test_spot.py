"""Spot nodes as they go, on several Ray nodes on one machine (`ray.cluster_utils.Cluster`, test_multinode.py's
cluster: a head that trains nothing and two worker nodes with one "GPU" each): a drain with a deadline, as a spot
notice becomes one (gram_ray/cluster/drain.py), costs the run no step."""

import json
import os
import subprocess
import sys
import time

import pytest
from test_multinode import WORKER_NODE, _reported, _train, cluster, wait_for_reports  # noqa: F401  (cluster: the fixture)
from tiny import synth_data, tiny_config

from gram_ray import storage
from gram_ray.cluster.drain import drain_node
from gram_ray.config import save_config
from gram_ray.train.resume import SNAPSHOT

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

NOTICE_S = 20  # the test's notice: AWS gives 120 s, GCP about 30 s


def _draining(gcs_address: str) -> dict[str, int]:
    """{node id: deadline (Unix ms)} of the cluster's draining nodes, as Ray Train's watcher reads them."""
    import ray._raylet

    return ray._raylet.GcsClient(address=gcs_address).get_draining_nodes()


def test_a_spot_notice_costs_no_step_and_its_restart_is_not_a_failure(cluster, synth_small, tmp_path):  # noqa: F811
    """The node of rank 1 is drained with a 20 s deadline, a replacement joins at once, and the node is removed at
    the deadline. The loop trains on during the notice, checkpoints before the deadline and waits; Ray Train
    restarts the group on rank 0's node and the replacement from that checkpoint: 0 steps lost, the run ends at its
    planned step. scaling.max_failures=0: a preemption's restart is not charged to it."""
    run = str(tmp_path / "runs" / "notice")
    cfg = tiny_config(
        "run.name=notice",
        f"run.storage_path={tmp_path / 'runs'}",
        "train.epochs=150",  # 16 clips / (2 per worker x 2 workers): 4 steps an epoch, 600 in all (a minute or two)
        "train.batch_size=2",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=25",  # the preemption's own checkpoint falls between two of these
        "train.keep_checkpoints=1000",
        "train.eval_every_epochs=100",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={CPU: 1, fake_gpu: 1}",
        "scaling.max_failures=0",
        *synth_data(synth_small, val=False),
    )
    driver = _train(cluster, cfg, tmp_path)
    reports = wait_for_reports(driver, run, lambda r: any(m["step"] >= 25 for m in r), "the first checkpoint")
    c = cluster["cluster"]
    victim_id = reports[-1]["world/nodes"].split(",")[1]
    (victim,) = [n for n in cluster["workers"] if n.node_id == victim_id]
    drain_node(c.gcs_address, victim_id, NOTICE_S, "test: a spot notice")
    drained_at = time.monotonic()
    cluster["workers"][cluster["workers"].index(victim)] = c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE)
    time.sleep(max(0.0, drained_at + NOTICE_S - time.monotonic()))
    c.remove_node(victim, allow_graceful=False)  # the cloud takes the node at the deadline
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-4000:]

    result = json.loads(storage.read_text(f"{run}/result.json"))
    last = result["last_metrics"]
    assert last["step"] == last["total_steps"] == 600
    assert victim_id not in last["world/nodes"].split(",")
    (recovery,) = result["recoveries"]
    assert recovery["cause"] == "preemption", recovery
    assert recovery["steps_lost"] == 0 and recovery["checkpoint"]["registered"], recovery
    assert recovery["recovery_s"] < 60, recovery  # from the deadline (the node's loss) to the next step
    assert recovery["restarted_from_step"] == recovery["checkpoint"]["step"] > reports[-1]["step"]
    assert 0 < recovery["notice"]["deadline_in_s"] <= NOTICE_S
    assert "preemption notice at step" in output and "for the preemption, stored and registered in" in output
    assert "recovered from the preemption: 0 steps lost" in output
    steps = [m["step"] for m in _reported(run)]
    assert recovery["checkpoint"]["step"] in steps  # registered: the restart came from it
    said = [line for line in output.splitlines() if "preemption" in line or "restarted" in line]
    print(json.dumps(recovery), *said, sep="\n")


def test_a_spot_notice_costs_a_tune_trial_no_step(cluster, synth_small, tmp_path):  # noqa: F811
    """The same notice in a sweep: the node of the trial's rank 1 is drained with a 20 s deadline (a replacement
    joins at once, the node goes at the deadline). The trial checkpoints before it, restarts from there, loses no
    step and ends at its planned step; the sweep's console says so, prefixed by the trial."""
    cfg = tiny_config(
        "run.name=notice-sweep",
        f"run.storage_path={tmp_path / 'runs'}",
        "train.epochs=150",  # 600 steps, as above
        "train.batch_size=2",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=25",
        "train.keep_checkpoints=1000",
        "train.eval_every_epochs=1000",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={CPU: 1, fake_gpu: 1}",
        "scaling.max_failures=0",
        "tune.num_samples=1",
        "tune.metric=train/lr",
        "tune.mode=max",
        "tune.search_space={train.lr: {grid: [1.0e-3]}}",
        *synth_data(synth_small, val=False),
    )
    out = tmp_path / "sweep"
    save_config(cfg, tmp_path / "sweep.yaml")
    env = os.environ | {"RAY_ADDRESS": cluster["cluster"].address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
    command = [sys.executable, "-m", "gram_ray", "tune", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    trial: list = []
    while driver.poll() is None and time.monotonic() < deadline and not trial:
        snapshots = (tmp_path / "runs").glob(f"*/trials/*/{SNAPSHOT}")  # the sweep's state: on its run storage
        trial = [p.parent for p in snapshots if any(m["step"] >= 25 for m in _reported(str(p.parent)))]
        time.sleep(0.2)
    assert trial, driver.stdout.read()[-3000:] if driver.poll() is not None else "no trial checkpoint in 300 s"
    c = cluster["cluster"]
    victim_id = _reported(str(trial[0]))[-1]["world/nodes"].split(",")[1]
    (victim,) = [n for n in cluster["workers"] if n.node_id == victim_id]
    drain_node(c.gcs_address, victim_id, NOTICE_S, "test: a spot notice")
    drained_at = time.monotonic()
    cluster["workers"][cluster["workers"].index(victim)] = c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE)
    time.sleep(max(0.0, drained_at + NOTICE_S - time.monotonic()))
    c.remove_node(victim, allow_graceful=False)
    output, _ = driver.communicate(timeout=900)
    said = [line for line in output.splitlines() if "step" not in line or "preemption" in line or "restart" in line]
    assert driver.returncode == 0, "\n".join(said[-80:])
    recovered = [line for line in output.splitlines() if "recovered from the preemption" in line]
    assert len(recovered) == 1 and "] recovered from the preemption: 0 steps lost" in recovered[0], "\n".join(said)
    reports = _reported(str(trial[0]))
    assert reports[-1]["step"] == reports[-1]["total_steps"] == 600
    assert victim_id not in reports[-1]["world/nodes"].split(",")
    print(*[line for line in output.splitlines() if "preemption" in line or "restarted" in line], sep="\n")


def test_spot_watch_as_the_cluster_yamls_start_it_drains_its_node_on_a_notice(cluster, tmp_path):  # noqa: F811
    """`gram-ray cluster spot-watch --cloud aws`, the command aws.yaml starts on every worker node, pointed at the
    local metadata server and at a node of its own (several Ray nodes share this machine): no drain while there is
    no notice; AWS's two-minute notice drains the node with its deadline, and the watch ends."""
    import yaml
    from metadata_server import MetadataServer

    (command,) = [c for c in yaml.safe_load(open("cluster/aws.yaml"))["worker_start_ray_commands"] if "spot-watch" in c]
    printed = command[command.index("gram-ray cluster spot-watch") :].split(">")[0].split()
    import ray

    c = cluster["cluster"]
    node = c.add_node(node_ip_address="127.0.0.1", num_cpus=1, resources={"spot_watch_test": 1})
    metadata = MetadataServer()
    ray.init(address=c.address)
    try:
        # Work on the node, as a trainer worker would be: Ray shuts an idle node down at once when it is drained.
        class Work:  # defined here: pickled whole (the workers cannot import this test module)
            def ready(self) -> bool:
                return True

        work = ray.remote(resources={"spot_watch_test": 1}, num_cpus=0)(Work).remote()
        ray.get(work.ready.remote())
        argv = [sys.executable, "-m", "gram_ray", *printed[1:], "--metadata-url", metadata.url, "--poll-s", "0.5"]
        argv += ["--address", c.gcs_address, "--node-id", node.node_id]
        watcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        assert watcher.poll() is None and node.node_id not in _draining(c.gcs_address)
        metadata.interrupt_in(120)
        output, _ = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, output
        deadline_ms = _draining(c.gcs_address)[node.node_id]
        assert 110 <= deadline_ms / 1000 - time.time() <= 120
        assert "spot-watch: spot terminate at" in output and "draining this node, to go in 1" in output
    finally:
        ray.shutdown()
        metadata.stop()
        c.remove_node(node, allow_graceful=False)


@pytest.mark.parametrize("yaml_path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_a_kuberay_gpu_pod_drains_its_node_before_it_goes(cluster, yaml_path):  # noqa: F811
    """The gpu-train pods' preStop hook, run as the YAML gives it (and pointed at a node of its own: several Ray
    nodes share this machine): the node is drained with a deadline inside the pod's grace period, and the hook
    returns once the node's work has moved off and Ray has shut the node down."""
    import ray
    import yaml

    spec = yaml.safe_load(open(yaml_path))["spec"]
    spec = spec.get("rayClusterSpec", spec)
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-train"]
    pod = group["template"]["spec"]
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    deadline_s = float(hook[hook.index("--deadline-s") + 1])
    assert hook[:3] == ["gram-ray", "cluster", "drain-self"] and deadline_s < pod["terminationGracePeriodSeconds"]

    c = cluster["cluster"]
    node = c.add_node(node_ip_address="127.0.0.1", num_cpus=1, resources={"pod_test": 1})
    ray.init(address=c.address)
    try:

        class Work:  # a trainer worker's place on the node
            def ready(self) -> bool:
                return True

        work = ray.remote(resources={"pod_test": 1}, num_cpus=0)(Work).remote()
        ray.get(work.ready.remote())
        argv = [sys.executable, "-m", "gram_ray", *hook[1:], "--address", c.gcs_address, "--node-id", node.node_id]
        hooked = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        deadline = _draining(c.gcs_address)[node.node_id] / 1000
        assert deadline_s - 10 <= deadline - time.time() <= deadline_s and hooked.poll() is None
        ray.kill(work)  # Ray Train's restart takes its workers off the node
        output, _ = hooked.communicate(timeout=60)
        assert hooked.returncode == 0 and "the node has shut down" in output, output
    finally:
        ray.shutdown()
        c.remove_node(node, allow_graceful=False)  # its processes, gone already or not (check_alive=False)
