"""A cluster YAML tried on this machine before paying for it: `gram-ray cluster local cluster/aws.yaml`.

It starts a Ray head here with Ray's real autoscaler and its fake multi-node provider, which launches and
terminates "nodes" as local processes. The autoscaling config is shaped like the YAML (or KubeRay manifest): the
same node types, min and max workers, and idle timeout, with each type's resources scaled down to fit this
machine. A GPU becomes the custom resource `local_gpu` (the job runs on CPU and asks for `local_gpu` where it
would ask for a GPU), so GPU node types come up exactly when a job asks for what only they hold.

What is not simulated: instance start-up time (a node is up in seconds), setup commands, Docker, the cloud's
quotas and prices. Everything binds to 127.0.0.1, with token authentication; the head runs in its own process
group and is stopped by it, leaving any other Ray on the machine alone.

Two traps of the locked Ray (2.60), and what this module does about them: the `fake_multinode` provider type
fills its defaults from an example YAML the wheel does not ship, so the provider is named as an external module
with every field given here; and only the v2 autoscaler takes these nodes down again (v1 sees them
"uninitialized" for ever), so the head runs with RAY_enable_autoscaler_v2=1. A third, of running fake nodes on
one disk: their shared runtime-env folder (local_provider.py gives each node its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gram_ray.cluster.check import NodeType, read_node_types
from gram_ray.cluster.health import node_health_env
from gram_ray.cluster.processes import free_port, ray_head_command, stop_group, wait_until_up

__all__ = ["LOCAL_GPU", "LocalNodeType", "local_node_types", "autoscaling_config", "LocalCluster", "NodeTimeline"]

LOCAL_GPU = "local_gpu"  # what a GPU becomes on this machine: a custom resource
# Ray's fake multi-node provider, each node with its own runtime-env folder (see local_provider.py)
_PROVIDER = "gram_ray.cluster.local_provider.LocalNodeProvider"
_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the provider's fixed head node id
_HEAD_TYPE = "ray.head.default"


@dataclass
class LocalNodeType:
    name: str
    original: NodeType
    resources: dict[str, float]  # what a local "node" of this type offers

    def mapping(self) -> str:
        before = ", ".join(f"{k} {v:g}" for k, v in self.original.resources.items())
        after = ", ".join(f"{k} {v:g}" for k, v in self.resources.items())
        where = f" ({self.original.instance})" if self.original.instance else ""
        return (
            f"{self.name}{where}: {before} -> {after}; min {self.original.min_workers}, max "
            f"{self.original.max_workers} nodes"
        )


def local_node_types(types: list[NodeType], node_cpus: int, object_store_mb: int) -> list[LocalNodeType]:
    """Each worker node type with its CPUs capped at node_cpus (logical CPUs: this machine's cores are shared by
    every local node) and its GPUs as LOCAL_GPU; custom resources kept."""
    out = []
    for t in types:
        if t.head:
            continue
        resources = {"CPU": float(min(t.resources.get("CPU", 0), node_cpus))}
        for key, value in t.resources.items():
            if key == "GPU":
                resources[LOCAL_GPU] = value
            elif key != "CPU":
                resources[key] = value
        resources["object_store_memory"] = float(object_store_mb * 2**20)
        out.append(LocalNodeType(t.name, t, resources))
    return out


def autoscaling_config(
    types: list[LocalNodeType], idle_timeout_minutes: float, gcs_address: str, name: str = "gram-ray-local"
) -> dict:
    """A complete autoscaler config for Ray's fake multi-node provider, shaped like the YAML's node types."""
    available = {_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for t in types:
        available[t.name] = {
            "resources": t.resources,
            "node_config": {},
            "min_workers": t.original.min_workers,
            "max_workers": t.original.max_workers,
        }
    return {
        "cluster_name": name,
        "max_workers": sum(t.original.max_workers for t in types),
        "provider": {
            "type": "external",
            "module": _PROVIDER,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
            "gcs_address": gcs_address,
            "launch_multiple": True,
            "head_node_id": _HEAD_ID,
        },
        "available_node_types": available,
        "head_node_type": _HEAD_TYPE,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@dataclass
class NodeTimeline:
    """The worker nodes seen over time: (seconds since start, "up" | "down", node type, node id)."""

    start: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str, str, str]] = field(default_factory=list)
    alive: dict[str, str] = field(default_factory=dict)  # node id -> type

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.alive.values():
            out[kind] = out.get(kind, 0) + 1
        return out

    def update(self, nodes: dict[str, str]) -> list[str]:
        """Record the worker nodes alive now ({id: type}); the lines that say what changed."""
        now, lines = time.monotonic() - self.start, []
        for node_id, kind in sorted(nodes.items()):
            if node_id not in self.alive:
                self.alive[node_id] = kind
                self.events.append((now, "up", kind, node_id))
                lines.append(f"{now:7.1f} s  + a {kind} node came up ({node_id[-5:]})  -> {self._shown()}")
        for node_id in sorted(set(self.alive) - set(nodes)):
            kind = self.alive.pop(node_id)
            self.events.append((now, "down", kind, node_id))
            lines.append(f"{now:7.1f} s  - a {kind} node went away ({node_id[-5:]})  -> {self._shown()}")
        return lines

    def _shown(self) -> str:
        counts = self.counts()
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "no worker nodes"

    def peak(self) -> dict[str, int]:
        peak: dict[str, int] = {}
        alive: dict[str, int] = {}
        for _, what, kind, _ in self.events:
            alive[kind] = alive.get(kind, 0) + (1 if what == "up" else -1)
            peak[kind] = max(peak.get(kind, 0), alive[kind])
        return peak

    def in_words(self) -> list[str]:
        lines = []
        for t, what, kind, node_id in self.events:
            verb = "came up" if what == "up" else "went away"
            lines.append(f"at {t:.0f} s a {kind} node {verb} ({node_id[-5:]})")
        for kind, n in sorted(self.peak().items()):
            lines.append(f"{kind}: at most {n} node(s) at once; {self.counts().get(kind, 0)} left at the end")
        return lines


class LocalCluster:
    """The head (with the autoscaler) of a local cluster shaped like a YAML; a context manager that stops it."""

    def __init__(
        self,
        yaml_path: str | Path,
        node_cpus: int = 4,
        object_store_mb: int = 200,
        idle_timeout_minutes: float | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.log = log
        self.types = local_node_types(read_node_types(yaml_path), node_cpus, object_store_mb)
        self.idle_timeout_minutes = idle_timeout_minutes if idle_timeout_minutes is not None else _idle(yaml_path)
        self.token = os.environ.get("RAY_AUTH_TOKEN") or _token()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="grl", dir="/tmp")  # short: Ray's unix sockets live under it
        self.config_path = Path(self.temp_dir) / "autoscaling.json"
        self.env = os.environ | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_CLOUD_INSTANCE_ID": _HEAD_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": _HEAD_ID,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node's IP is 127.0.0.1: nothing leaves the machine
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs use this Python
        }
        self.env |= node_health_env()  # the health checks the YAMLs give their heads (cluster/health.py)
        self.env.pop("RAY_ADDRESS", None)
        self.head: subprocess.Popen | None = None
        self.timeline = NodeTimeline()

    def mapping(self) -> list[str]:
        return [t.mapping() for t in self.types] + [
            f"idle timeout: {self.idle_timeout_minutes:g} min; head: 0 CPUs (it runs no work, as the YAML's head)",
            f"a GPU is the custom resource '{LOCAL_GPU}': a job asks for it with --set scaling.use_gpu=false "
            f"--set 'scaling.resources_per_worker={{CPU: 1, {LOCAL_GPU}: 1}}'",
        ]

    def start(self) -> LocalCluster:
        config = autoscaling_config(self.types, self.idle_timeout_minutes, self.gcs_address)
        self.config_path.write_text(json.dumps(config))
        command = ray_head_command(
            self.gcs_port,
            num_cpus=0,
            dashboard_port=self.dashboard_port,
            temp_dir=self.temp_dir,
            extra=(f"--autoscaling-config={self.config_path}",),
        )
        log = open(Path(self.temp_dir) / "head.log", "wb")  # noqa: SIM115 - the head writes to it until stopped
        self.head = subprocess.Popen(command, env=self.env, start_new_session=True, stdout=log, stderr=log)
        if not wait_until_up(self.head, lambda: self.client().list_jobs(), timeout_s=120):
            self.head = None
            raise RuntimeError(f"the local head did not come up; see {self.temp_dir}/head.log")
        self.timeline = NodeTimeline()
        return self

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"authorization": f"Bearer {self.token}"})

    def worker_nodes(self) -> dict[str, str]:
        """{node id: node type} of the worker nodes alive now (the fake provider's ids; the head left out)."""
        import urllib.request

        request = urllib.request.Request(
            f"{self.dashboard}/nodes?view=summary", headers={"authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            summary = json.loads(response.read())["data"]["summary"]
        nodes = {}
        for node in summary:
            raw = node.get("raylet") or {}
            if raw.get("state") != "ALIVE" or raw.get("isHeadNode"):
                continue
            nodes[raw.get("nodeId", "")] = raw.get("nodeTypeName") or "?"  # the provider names each node's type
        return nodes

    def watch(self) -> list[str]:
        """Poll the nodes once; the lines that say what changed (also logged)."""
        try:
            nodes = self.worker_nodes()
        except Exception:  # the dashboard busy for a moment: next poll
            return []
        lines = self.timeline.update(nodes)
        for line in lines:
            self.log(line)
        return lines

    def submit(self, entrypoint: str, working_dir: str | Path = ".", timeout_s: float = 1800) -> tuple[str, str]:
        """Submit a job (its working directory uploaded as `ray job submit --working-dir` does), watch the nodes
        until it ends; returns (status, its logs)."""
        from ray.job_submission import JobStatus

        client = self.client()
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(working_dir)})
        self.log(f"submitted {job_id}: {entrypoint}")
        submitted = time.monotonic()
        deadline = submitted + timeout_s
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while (status := client.get_job_status(job_id)) not in ended:
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s: stopped")
            self.watch()
            time.sleep(1)
        self.watch()
        self.log(f"{job_id}: {status} {time.monotonic() - submitted:.1f} s after its submission")
        return str(status), client.get_job_logs(job_id)

    def wait_for_minimum(self, timeout_s: float) -> bool:
        """Watch until every node type is back at its min_workers (the idle timeout passed) or timeout_s."""
        minimum = {t.name: t.original.min_workers for t in self.types}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.watch()
            counts = self.timeline.counts()
            if all(counts.get(name, 0) <= n for name, n in minimum.items()):
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        """Stop the head and every node of this cluster (one process group), nothing else."""
        if self.head is not None:
            stop_group(self.head)
            self.head = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _token() -> str:
    import secrets

    return secrets.token_hex(32)


def _idle(yaml_path: str | Path) -> float:
    """The YAML's idle_timeout_minutes (KubeRay: autoscalerOptions.idleTimeoutSeconds), Ray's default 5 else."""
    from gram_ray.config import read_yaml_mapping

    tree = read_yaml_mapping(yaml_path, "cluster YAML")
    if "idle_timeout_minutes" in tree:
        return float(tree["idle_timeout_minutes"])
    spec = tree.get("spec") or {}
    spec = spec.get("rayClusterSpec", spec)
    seconds = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    return float(seconds) / 60 if seconds is not None else 5.0
