"""A node lost without notice, on several Ray nodes on one machine (test_multinode.py's cluster: a head that
trains nothing and two worker nodes with one "GPU" each, with gram-ray's node health checks): the run is back to
training soon after, elastic on the node left, or on a replacement that joins 10 s later, and ends at its planned
step. Each test prints its timeline (from the loss: Ray marks the node dead, Ray Train fails the group, the group
restarts, the next step is logged); docs/faults.md gives the measured figures."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_multinode import WORKER_NODE, _train, cluster, wait_for_reports  # noqa: F401  (cluster: the fixture)
from tiny import synth_data, tiny_config

from gram_ray import storage
from gram_ray.cluster.drain import node_is_gone

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

REPLACEMENT_AFTER_S = 10  # the replacement: a node joining 10 s after the loss


class Timeline:
    """The driver's output lines, each with the time it was read (seconds on time.monotonic)."""

    def __init__(self, driver) -> None:
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, args=(driver,), daemon=True)
        self.reader.start()

    def _read(self, driver) -> None:
        for line in driver.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def first(self, after: float, contains: str) -> float | None:
        return next((t for t, line in self.lines if t >= after and contains in line), None)

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc): a raylet's workers and agents."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def lose_host(c, node) -> None:
    """The node goes as a host does, without notice: its raylet and every process it started (the Train worker,
    Ray Data's task workers) are killed at once. Cluster.remove_node alone kills the raylet and leaves its workers
    running, training on (seen: a run trained its 1,600 steps with the removed node's worker)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    processes = _descendants(raylet)
    c.remove_node(node, allow_graceful=False)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _node_dead_at(gcs_address: str, node_id: str, since: float, limit_s: float = 120) -> float | None:
    """When Ray's GCS marks the node dead (polled every 0.1 s, as drain-self asks it)."""
    while time.monotonic() < since + limit_s:
        if node_is_gone(gcs_address, node_id):
            return time.monotonic()
        time.sleep(0.1)
    return None


def _lose_a_node(cluster, synth_small, tmp_path, name: str, elastic: bool, replacement_after_s: float | None):  # noqa: F811
    run = str(tmp_path / "runs" / name)
    cfg = tiny_config(
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'runs'}",
        "train.epochs=150",  # 16 clips / 4 a step: 4 steps an epoch, 600 in all (a minute or two)
        "train.batch_size=2",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=25",  # never at an epoch's end (every 4 steps), where none is taken
        "train.keep_checkpoints=1000",
        "train.eval_every_epochs=1000",
        f"scaling.num_workers={'[1, 2]' if elastic else 2}",
        "scaling.resources_per_worker={CPU: 1, fake_gpu: 1}",
        "scaling.max_failures=3",
        *synth_data(synth_small, val=False),
    )
    driver = _train(cluster, cfg, tmp_path, start_timeout_s=None if elastic else 120)
    timeline = Timeline(driver)
    try:
        reports = wait_for_reports(driver, run, lambda r: any(m["step"] >= 25 for m in r), "the first checkpoint")
    except AssertionError as e:  # the driver's output is the timeline's
        raise AssertionError(f"{e}\n{timeline.output()[-4000:]}") from None
    c = cluster["cluster"]
    lost_id = reports[-1]["world/nodes"].split(",")[1]
    (lost,) = [n for n in cluster["workers"] if n.node_id == lost_id]
    slot = cluster["workers"].index(lost)
    lose_host(c, lost)
    lost_at = time.monotonic()
    print(f"\nlost at {time.time():.2f}")
    dead_at = _node_dead_at(c.gcs_address, lost_id, lost_at)
    if replacement_after_s is not None:
        time.sleep(max(0.0, lost_at + replacement_after_s - time.monotonic()))
    else:  # elastic: the group goes on with the node left; the node comes back once it has trained a step
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            restarted = timeline.first(lost_at, "the worker group restarted")
            if restarted is not None and timeline.first(restarted, "  step ") is not None:
                break
            time.sleep(0.2)
    cluster["workers"][slot] = c.add_node(node_ip_address="127.0.0.1", **WORKER_NODE)
    joined_at = time.monotonic()
    driver.wait(timeout=600)
    timeline.reader.join(timeout=10)
    output = timeline.output()
    assert driver.returncode == 0, output[-4000:]

    result = json.loads(storage.read_text(f"{run}/result.json"))
    last = result["last_metrics"]
    assert last["step"] == last["total_steps"] == 600
    assert lost_id not in last["world/nodes"].split(","), output[-3000:]
    assert result["recoveries"][0]["cause"] == "failure", result["recoveries"]
    restarted = timeline.first(lost_at, "the worker group restarted")
    next_step = restarted and timeline.first(restarted, "  step ")
    assert next_step is not None, output[-4000:]
    failed = timeline.first(lost_at, "worker group failed")
    times = {
        "node_dead_s": dead_at and dead_at - lost_at,
        "group_failed_s": failed and failed - lost_at,
        "restarted_s": restarted - lost_at,
        "next_step_s": next_step - lost_at,
        "replacement_joined_s": joined_at - lost_at,
        "restarted_with": "1 worker" if "with 1 worker" in output else "2 workers",
    }
    print(
        f"\nsilent loss ({name}): "
        + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in times.items()})
    )
    return times, result


def test_a_node_lost_without_notice_leaves_an_elastic_run_training_on_the_node_left(cluster, synth_small, tmp_path):  # noqa: F811
    times, result = _lose_a_node(
        cluster, synth_small, tmp_path, "silent-elastic", elastic=True, replacement_after_s=None
    )
    assert times["restarted_with"] == "1 worker"
    assert times["next_step_s"] < times["replacement_joined_s"]  # it went on before the node came back
    assert [w["workers"] for w in result["world_sizes"]][:2] == [2, 1], result["world_sizes"]


def test_a_node_lost_without_notice_is_replaced_and_the_run_ends_at_its_planned_step(cluster, synth_small, tmp_path):  # noqa: F811
    times, result = _lose_a_node(
        cluster, synth_small, tmp_path, "silent-replaced", elastic=False, replacement_after_s=REPLACEMENT_AFTER_S
    )
    assert times["next_step_s"] > REPLACEMENT_AFTER_S  # two workers: it waited for the replacement
    assert [w["workers"] for w in result["world_sizes"]] == [2], result["world_sizes"]
