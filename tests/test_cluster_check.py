"""`gram-ray cluster check`: a job planned against the project's own cluster YAMLs before anything is paid for."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from gram_ray.cli import main
from gram_ray.cluster.check import CheckError, check_cluster, read_node_types
from gram_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
YAMLS = [REPO / "cluster" / name for name in ("aws.yaml", "gcp.yaml", "aws-docker.yaml")]
KUBERAY = [REPO / "cluster" / "kuberay" / name for name in ("raycluster.yaml", "rayjob.yaml")]


@pytest.mark.parametrize("path", YAMLS + KUBERAY, ids=lambda p: p.name)
def test_every_cluster_file_has_a_gpu_and_a_cpu_node_type(path):
    types = {t.name: t for t in read_node_types(path) if not t.head}
    assert any(t.resources.get("GPU") for t in types.values())
    assert any(not t.resources.get("GPU") and t.resources["CPU"] >= 8 for t in types.values())
    if path in YAMLS:  # the launcher YAMLs name their instances: gram-ray knows their GPUs' memory
        assert all(t.gpu_gb for t in types.values() if t.resources.get("GPU"))


def test_msrvtt_on_the_project_clusters_and_on_24_gb_gpus():
    """GRAM's 1.24 B model under DDP needs ~24 GB a GPU: the YAMLs' GPUs hold it (L40S, A100), a 24 GB A10G or L4
    does not, and the check says so (the real memory estimate, computed once)."""
    cfg = load_config(REPO / "configs" / "msrvtt.yaml")
    aws = check_cluster(cfg, YAMLS[0])
    assert aws.trainer_type.name == "gpu_train" and aws.trainer_nodes == 1 and aws.workers_per_node == 4
    assert aws.decode_type.name == "cpu_decode"
    assert 20 < aws.memory_gb < 28 and aws.fits_memory and aws.trainer_type.gpu == "NVIDIA L40S"
    estimate = lambda c: (aws.memory_setup, aws.memory_gb)  # noqa: E731 - the same config's estimate, reused
    assert check_cluster(cfg, YAMLS[1], memory=estimate).fits_memory  # A100 40 GB
    assert check_cluster(cfg, YAMLS[0], gpu_gb=24, memory=estimate).fits_memory is False
    unknown = check_cluster(cfg, KUBERAY[0], memory=estimate)
    assert unknown.fits_memory is None and "give --gpu-gb" in unknown.lines[-1]


def test_a_request_no_node_type_can_hold_is_an_error_naming_the_resource():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["scaling.resources_per_worker={CPU: 1, TPU: 1}"])
    with pytest.raises(CheckError, match=r"request \(TPU: 1\).*pending for ever"):
        check_cluster(cfg, YAMLS[0])
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 64}"]
    )
    with pytest.raises(CheckError, match=r"request \(CPU: 64\)"):
        check_cluster(cfg, YAMLS[1], memory=lambda c: ("x", 1.0))
    cfg = load_config(REPO / "configs" / "demo.yaml", ["scaling.use_gpu=true", "scaling.num_workers=12"])
    with pytest.raises(CheckError, match=r"12 trainer workers need 3 gpu_train nodes \(4 each\).*at most 2"):
        check_cluster(cfg, YAMLS[0], memory=lambda c: ("x", 1.0))


def test_a_cpu_job_stays_off_the_gpu_nodes_and_the_cli_prints_the_plan():
    result = CliRunner().invoke(main, ["cluster", "check", "--yaml", str(YAMLS[0]), "--config", "configs/demo.yaml"])
    assert result.exit_code == 0, result.output
    assert "trainer workers: 2 x {'CPU': 1.0} on node type cpu_decode" in result.output
    assert "Ray Data decode tasks: node type cpu_decode" in result.output
    bad = CliRunner().invoke(
        main,
        ["cluster", "check", "--yaml", str(YAMLS[0]), "--config", "configs/demo.yaml", "--set"]
        + ["scaling.resources_per_worker={CPU: 1, TPU: 1}"],
    )
    assert bad.exit_code != 0 and "TPU: 1" in bad.output


def _head_env(path: Path) -> dict[str, str]:
    """The environment a cluster file gives the head's `ray start`: a launcher YAML's command prefix, a KubeRay
    head container's env."""
    import yaml

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if path in YAMLS:
        (command,) = [c for c in docs[0]["head_start_ray_commands"] if "ray start --head" in c]
        before = command.split("ray start --head")[0].split(";")[-1].split()
        return dict(word.split("=", 1) for word in before)
    spec = docs[-1]["spec"]
    head = (spec.get("rayClusterSpec") or spec)["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in head.get("env", [])}


@pytest.mark.parametrize("path", YAMLS + KUBERAY, ids=lambda p: p.name)
def test_every_cluster_file_gives_its_head_gram_rays_node_health_checks(path):
    from gram_ray.cluster.health import NODE_HEALTH_CHECKS, node_health_env

    env = _head_env(path)
    assert {k: env.get(k) for k in node_health_env()} == node_health_env()
    # ray-project/ray#59193: faster than 1.5 s of failed probes declares loaded nodes dead that are not
    checks = NODE_HEALTH_CHECKS
    assert checks["health_check_period_ms"] * checks["health_check_failure_threshold"] >= 1500
