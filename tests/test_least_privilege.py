"""Least privilege on a cluster: the workers that decode untrusted video may only read and write the run's bucket,
the head alone may launch nodes, SSH is open to one address, nothing is installed by piping a script from a URL,
and the CLI's own local Ray keeps token authentication on."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gram_ray.cluster.check import LAUNCHER_IDENTITIES, identity_warnings, read_node_types

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = [CLUSTER / "aws.yaml", CLUSTER / "aws-docker.yaml", CLUSTER / "gcp.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_worker_nodes_run_as_a_bucket_only_identity_and_ssh_comes_from_one_address(path):
    tree = yaml.safe_load(path.read_text())
    head = tree["head_node_type"]
    for name, spec in tree["available_node_types"].items():
        node = spec["node_config"]
        if "aws" in path.name:
            assert node["IamInstanceProfile"]["Name"] == ("gram-ray-head" if name == head else "gram-ray-worker")
            assert node["SecurityGroupIds"] == ["YOUR-SECURITY-GROUP-ID"]  # Ray's own group opens SSH to 0.0.0.0/0
        else:
            subnet = node["networkInterfaces"][0]["subnetwork"]
            assert subnet.endswith("/subnetworks/gram-ray")  # the network whose firewall admits one address
            if name != head:  # the head is Ray's launcher account: it starts and stops the workers
                assert [a["email"].split("@")[0] for a in node["serviceAccounts"]] == ["gram-ray-worker"]
                assert node["serviceAccounts"][0]["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"]
    assert identity_warnings(read_node_types(path)) == []


def test_cluster_check_warns_when_a_worker_carries_the_launchers_own_role(tmp_path):
    for path, launcher in ((CLUSTER / "aws.yaml", "ray-autoscaler-v1"), (CLUSTER / "gcp.yaml", "ray-autoscaler-sa-v1")):
        text = path.read_text().replace("gram-ray-worker", launcher)
        changed = tmp_path / path.name
        changed.write_text(text)
        warnings = identity_warnings(read_node_types(changed))
        assert [w.split()[4] for w in warnings] == ["cpu_decode", "gpu_train"], warnings
        assert all(launcher in w and "the launcher's own identity" in w for w in warnings)
    assert LAUNCHER_IDENTITIES == ("ray-autoscaler-v1", "ray-autoscaler-sa-v1@")


def test_the_aws_policies_give_workers_the_bucket_and_the_head_the_workers_role_only():
    worker = json.loads((CLUSTER / "iam" / "aws-worker-policy.json").read_text())
    actions = {a for s in worker["Statement"] for a in s["Action"]}
    assert actions and all(a.startswith("s3:") for a in actions) and "s3:*" not in actions
    assert {r for s in worker["Statement"] for r in [s["Resource"]]} == {
        "arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/*",
    }  # fmt: skip
    head = json.loads((CLUSTER / "iam" / "aws-head-policy.json").read_text())
    passing = next(s for s in head["Statement"] if "iam:PassRole" in s["Action"])
    assert all(r.endswith("/gram-ray-worker") for r in passing["Resource"])  # never the head's own role
    assert not any(a.endswith(":*") or a == "*" for s in head["Statement"] for a in s["Action"])
    trust = json.loads((CLUSTER / "iam" / "aws-ec2-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_no_node_installs_by_piping_a_script_from_a_url_and_uv_is_pinned():
    files = [*LAUNCHER_YAMLS, *sorted((CLUSTER / "kuberay").glob("*.yaml")), CLUSTER / "Dockerfile"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"(curl|wget)[^\n|]*\|\s*(sh|bash)", text), path
    for path in (CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"):
        installs = [c for c in yaml.safe_load(path.read_text())["setup_commands"] if "install" in c and "uv==" in c]
        assert installs and all(re.search(r"uv==\d+\.\d+\.\d+", c) for c in installs), path


def test_the_clis_own_local_ray_runs_with_token_authentication(tmp_path):
    """`gram-ray` without RAY_ADDRESS starts its own Ray (init_ray): Ray 2.60 turns token authentication on for it,
    with a token in ~/.ray/auth_token it generates when there is none, unless RAY_AUTH_MODE says otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    script = (
        "import os\n"
        "from gram_ray.cli.common import init_ray\n"
        "init_ray()\n"
        "from ray._private.authentication.authentication_token_setup import get_authentication_mode\n"
        "from ray._raylet import AuthenticationMode\n"
        "print('token mode:', get_authentication_mode() == AuthenticationMode.TOKEN, os.environ['RAY_AUTH_MODE'])\n"
        "import ray\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "token mode: True token" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / ".ray" / "auth_token").is_file()
