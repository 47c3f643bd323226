"""`gram-ray cluster local`: the project's own cluster YAMLs, tried on this machine with Ray's real autoscaler
(its fake multi-node provider launches and removes nodes as local processes): the node types keep their
resources (scaled down, a GPU as `local_gpu`), min and max workers; a job that asks for GPUs brings the GPU node
type up from 0 to the YAML's maximum, and it goes back to 0 after the idle timeout (shortened to 15 s)."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gram_ray.cluster.check import read_node_types
from gram_ray.cluster.local import LOCAL_GPU, autoscaling_config, local_node_types

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml", REPO / "cluster" / "kuberay" / "raycluster.yaml"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_local_cluster_keeps_the_node_types_and_passes_rays_validator(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    types = local_node_types(read_node_types(path), node_cpus=4, object_store_mb=200)
    config = autoscaling_config(types, idle_timeout_minutes=0.25, gcs_address="127.0.0.1:1")
    validate_config(prepare_config(copy.deepcopy(config)))
    originals = {t.name: t for t in read_node_types(path) if not t.head}
    assert set(config["available_node_types"]) == set(originals) | {config["head_node_type"]}
    for name, t in originals.items():
        local = config["available_node_types"][name]
        assert (local["min_workers"], local["max_workers"]) == (t.min_workers, t.max_workers)
        assert local["resources"]["CPU"] == min(4, t.resources["CPU"])
        assert local["resources"].get(LOCAL_GPU) == t.resources.get("GPU") and "GPU" not in local["resources"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.multinode
def test_aws_yaml_on_this_machine_brings_gpu_nodes_up_from_zero_for_a_job_and_down_after_the_idle_timeout():
    """8 tasks that each need a GPU (local_gpu: 1, 1 CPU) on 4-CPU local nodes: two gpu_train nodes, the YAML's
    maximum, from zero; then back to zero 15 s after they are idle (--idle-timeout-minutes 0.25 for the
    YAML's 10 minutes)."""
    command = [sys.executable, "-m", "gram_ray", "cluster", "local", "cluster/aws.yaml"]
    command += ["--idle-timeout-minutes", "0.25", "--job", "python tests/local_gpu_job.py"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert f"gpu_train (g6e.12xlarge): CPU 48, GPU 4 -> CPU 4, {LOCAL_GPU} 4" in output  # the mapping, printed
    assert ": SUCCEEDED" in output
    timeline = output[output.index("node timeline:") :]
    assert "gpu_train: at most 2 node(s) at once; 0 left at the end" in timeline, output[-3000:]
    assert "cpu_decode" not in timeline  # nothing asked for a decode node
    ups = [float(t) for t in re.findall(r"at (\d+) s a gpu_train node came up", timeline)]
    downs = [float(t) for t in re.findall(r"at (\d+) s a gpu_train node went away", timeline)]
    assert len(ups) == len(downs) == 2 and min(downs) - max(ups) >= 15  # not before the idle timeout
    print(output[-3000:])
