"""Before a job starts: will this config run on this cluster YAML? (`gram-ray cluster check --yaml Y --config C`)

A Ray resource request that no node type can hold does not fail: it stays pending for ever, and the autoscaler
only logs that it cannot place it. This check reads the node types of a Ray cluster launcher YAML (AWS, GCP) or
of a KubeRay RayCluster / RayJob, and says, before anything is paid for:
- which node type hosts the trainer workers (and how many nodes of it the job needs, against its max_workers),
  and which hosts the Ray Data decode tasks;
- whether each worker's request (CPU, GPU, custom resources) fits a node type; if none can hold it, an error
  naming the resource;
- whether the config's training step fits the node type's GPU memory (the memory estimate of
  `bench train --dry-run`), with the GPU and its memory read off the instance type the YAML names;
- a warning for a worker node type that runs as the launcher's own identity (AWS's `ray-autoscaler-v1` instance
  profile, EC2 and S3 full access; GCP's `ray-autoscaler-sa-v1` service account): the nodes that decode untrusted
  video should hold no more than the run's bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from gram_ray.config import GramConfig, read_yaml_mapping

__all__ = [
    "NodeType",
    "CheckError",
    "GPU_BY_INSTANCE",
    "LAUNCHER_IDENTITIES",
    "read_node_types",
    "identity_warnings",
    "worker_request",
    "check_cluster",
]

GIB = 2**30

# The GPU behind each instance family or accelerator type the YAMLs may name: (GPU, memory in GB per GPU).
GPU_BY_INSTANCE = {
    "g4dn.": ("NVIDIA T4", 16),
    "g5.": ("NVIDIA A10G", 24),
    "g6.": ("NVIDIA L4", 24),
    "g6e.": ("NVIDIA L40S", 48),
    "p3.": ("NVIDIA V100", 16),
    "p4d.": ("NVIDIA A100 40GB", 40),
    "p4de.": ("NVIDIA A100 80GB", 80),
    "p5.": ("NVIDIA H100", 80),
    "p5e.": ("NVIDIA H200", 141),
    "g2-standard-": ("NVIDIA L4", 24),
    "a2-highgpu-": ("NVIDIA A100 40GB", 40),
    "a2-ultragpu-": ("NVIDIA A100 80GB", 80),
    "a3-highgpu-": ("NVIDIA H100", 80),
    "nvidia-tesla-t4": ("NVIDIA T4", 16),
    "nvidia-l4": ("NVIDIA L4", 24),
    "nvidia-tesla-a100": ("NVIDIA A100 40GB", 40),
    "nvidia-a100-80gb": ("NVIDIA A100 80GB", 80),
    "nvidia-h100-80gb": ("NVIDIA H100", 80),
}


class CheckError(ValueError):
    """The job cannot run on the cluster as configured; the message names the resource or the node type."""


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]  # what Ray sees on one node of this type: CPU, GPU, custom resources
    min_workers: int
    max_workers: int
    instance: str | None = None  # the instance type, machine type or accelerator the YAML names
    gpu: str | None = None
    gpu_gb: float | None = None
    head: bool = False
    identity: str | None = None  # the cloud identity its nodes run as: instance profile or service account

    def holds(self, request: dict[str, float]) -> int:
        """How many of these requests one node of this type holds (0: none)."""
        counts = [math.floor(self.resources.get(k, 0) / v + 1e-9) for k, v in request.items() if v > 0]
        return min(counts) if counts else 0


def _gpu_of(*names: str | None) -> tuple[str | None, float | None]:
    for name in filter(None, names):
        for prefix, (gpu, gb) in GPU_BY_INSTANCE.items():
            if name.startswith(prefix):
                return gpu, gb
    return None, None


def _launcher_types(tree: dict) -> list[NodeType]:
    types = []
    for name, spec in tree["available_node_types"].items():
        node = spec.get("node_config") or {}
        instance = node.get("InstanceType") or node.get("machineType")
        accelerators = [a.get("acceleratorType") for a in node.get("guestAccelerators") or []]
        gpu, gb = _gpu_of(instance, *accelerators)
        head = name == tree["head_node_type"]
        profile = node.get("IamInstanceProfile") or {}
        accounts = [a.get("email") for a in node.get("serviceAccounts") or []]
        identity = profile.get("Name") or profile.get("Arn") or next(filter(None, accounts), None)
        types.append(
            NodeType(
                name,
                {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                int(spec.get("min_workers", 0) or 0),
                int(spec.get("max_workers", 0) or 0) if not head else 0,
                instance or (accelerators[0] if accelerators else None),
                gpu,
                gb,
                head,
                identity,
            )
        )
    return types


# The identities Ray's launcher creates for itself (and gives the head when a YAML names none): on AWS the instance
# profile ray-autoscaler-v1, whose role has AmazonEC2FullAccess and AmazonS3FullAccess; on GCP the service account
# ray-autoscaler-sa-v1, with compute and storage admin roles.
LAUNCHER_IDENTITIES = ("ray-autoscaler-v1", "ray-autoscaler-sa-v1@")


def identity_warnings(types: list[NodeType]) -> list[str]:
    """A line for each worker node type that runs as the launcher's own identity."""
    return [
        f"warning: worker node type {t.name} runs as {t.identity}, the launcher's own identity (it may start and "
        "stop instances and read and write every bucket); give it a worker identity that may only read and write "
        "the run's bucket (cluster/README.md: least privilege)"
        for t in types
        if not t.head and t.identity and any(mark in t.identity.split("/")[-1] for mark in LAUNCHER_IDENTITIES)
    ]


def _quantity(value) -> float:
    """A Kubernetes CPU quantity ("16", "500m") as a number of CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_group(name: str, group: dict, head: bool) -> NodeType:
    pod = group["template"]["spec"]
    limits = (pod["containers"][0].get("resources") or {}).get("limits") or {}
    start = group.get("rayStartParams") or {}
    resources = {"CPU": _quantity(start.get("num-cpus", limits.get("cpu", 0)))}
    gpus = float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    if gpus:
        resources["GPU"] = gpus
    selector = pod.get("nodeSelector") or {}
    instance = selector.get("node.kubernetes.io/instance-type") or selector.get("cloud.google.com/gke-accelerator")
    gpu, gb = _gpu_of(instance)
    return NodeType(
        name,
        resources,
        int(group.get("minReplicas", 0) or 0),
        int(group.get("maxReplicas", 0) or 0),
        instance,
        gpu,
        gb,
        head,
    )


def read_node_types(path: str | Path) -> list[NodeType]:
    """The node types of a Ray cluster launcher YAML or a KubeRay RayCluster / RayJob manifest."""
    tree = read_yaml_mapping(path, "cluster YAML")
    if "available_node_types" in tree:
        return _launcher_types(tree)
    kind = tree.get("kind")
    spec = tree.get("spec") or {}
    if kind == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    if kind in ("RayCluster", "RayJob") and "workerGroupSpecs" in spec:
        head = _kuberay_group("head", spec["headGroupSpec"], head=True)
        return [head] + [_kuberay_group(g["groupName"], g, head=False) for g in spec["workerGroupSpecs"]]
    raise CheckError(
        f"{path} is neither a Ray cluster launcher YAML (available_node_types) nor a KubeRay RayCluster or RayJob"
    )


def worker_request(cfg: GramConfig) -> dict[str, float]:
    """What each trainer worker asks Ray for (Ray Train's default: 1 CPU, plus 1 GPU with use_gpu;
    scaling.resources_per_worker replaces those it names)."""
    request = {"CPU": 1.0} | ({"GPU": 1.0} if cfg.scaling.use_gpu else {})
    return request | {k: float(v) for k, v in (cfg.scaling.resources_per_worker or {}).items()}


@dataclass
class CheckResult:
    trainer_type: NodeType
    trainer_nodes: int
    workers_per_node: int
    decode_type: NodeType
    memory_gb: float | None = None  # the step's estimate per GPU
    memory_setup: str | None = None
    lines: list[str] = field(default_factory=list)
    fits_memory: bool | None = None


def _step_memory(cfg: GramConfig) -> tuple[str, float]:
    """The memory estimate per GPU of the config's own setup (strategy, gradient checkpointing and a frozen vision
    tower as the config says), in GB."""
    from gram_ray.train.memory import configured_estimate

    estimate = configured_estimate(cfg)
    return estimate.name, estimate.total_bytes / GIB


def check_cluster(cfg: GramConfig, yaml_path: str | Path, gpu_gb: float | None = None, memory=_step_memory):
    """The plan of a job on a cluster YAML, or CheckError naming what cannot be held. gpu_gb overrides the GPU
    memory the YAML implies (for manifests that do not name the instance type)."""
    types = read_node_types(yaml_path)
    workers = [t for t in types if not t.head and t.max_workers > 0]
    request = worker_request(cfg)
    hosts = [t for t in workers if t.holds(request)]
    if not hosts:
        missing = [k for k, v in request.items() if not any(t.resources.get(k, 0) >= v for t in workers)]
        named = ", ".join(f"{k}: {request[k]:g}" for k in missing) or ", ".join(
            f"{k}: {v:g}" for k, v in request.items()
        )
        raise CheckError(
            f"no worker node type of {yaml_path} can hold a trainer worker's request ({named}); node types: "
            + "; ".join(f"{t.name} {t.resources}" for t in workers)
            + ". Ray would leave the job pending for ever. Change scaling.use_gpu / resources_per_worker, or add a "
            "node type that has it."
        )
    # A job without GPUs stays off GPU nodes where it can; then the type that holds the most workers.
    host = max(hosts, key=lambda t: (not (t.resources.get("GPU") and "GPU" not in request), t.holds(request)))
    per_node = host.holds(request)
    trainers = cfg.scaling.max_workers  # elastic: the size it grows to when the nodes are there
    elastic = f" (elastic: {cfg.scaling.min_workers} to {trainers})" if cfg.scaling.elastic else ""
    nodes = math.ceil(trainers / per_node)
    if nodes > host.max_workers:
        raise CheckError(
            f"{trainers} trainer workers{elastic} need {nodes} {host.name} nodes ({per_node} each), but "
            f"{yaml_path} allows at most {host.max_workers}: raise its max_workers or lower scaling.num_workers"
        )
    cpu_only = [t for t in workers if t.holds({"CPU": 1}) and not t.resources.get("GPU")]
    decode = max(cpu_only or [t for t in workers if t.holds({"CPU": 1})], key=lambda t: t.resources.get("CPU", 0))
    result = CheckResult(host, nodes, per_node, decode)
    result.lines += identity_warnings(types)
    result.lines += [
        f"trainer workers: {trainers}{elastic} x {request} on node type {host.name} "
        f"({host.instance or 'instance not named'}, {host.resources}): {per_node} per node, {nodes} node(s) of "
        f"at most {host.max_workers}",
        f"Ray Data decode tasks: node type {decode.name} ({decode.instance or 'instance not named'}, "
        f"{decode.resources}), up to {decode.max_workers} nodes",
    ]
    if cfg.scaling.use_gpu:
        capacity = gpu_gb or host.gpu_gb
        setup, need = memory(cfg)
        result.memory_gb, result.memory_setup = need, setup
        if capacity is None:
            result.lines.append(
                f"GPU memory: the step needs about {need:.1f} GB per GPU ({setup}); {host.name} names no instance "
                "type gram-ray knows: give --gpu-gb"
            )
        else:
            result.fits_memory = need <= 0.9 * capacity  # 10% for the allocator and the CUDA context
            gpu = f"GPUs of {gpu_gb:g} GB (--gpu-gb)" if gpu_gb else f"{host.gpu} with {capacity:g} GB"
            verdict = "fits" if result.fits_memory else "does NOT fit"
            result.lines.append(
                f"GPU memory: the step needs about {need:.1f} GB per GPU ({setup}); {host.name} has {gpu}: {verdict} "
                "(10% kept for the allocator and the CUDA context)"
            )
    return result
