"""How soon Ray declares a node dead: the GCS's health checks of every raylet, set on the head.

Ray's defaults probe each node every 3 s and declare it dead after 5 failed probes, each given 10 s: about 15 s
for a node whose processes are gone (probes fail at once) and about 65 s for one that dropped off the network
(probes time out). Until then Ray Train cannot restart on the nodes left: a run waits for a node that is not
coming back. gram-ray's heads probe every second with a 1 s timeout and declare a node dead after 3 failed
probes: about 3 s and 6 s. Faster still invites false deaths of loaded nodes (ray-project/ray#59193): keep the
period x threshold at 1.5 s or more; the multi-node tests check that no node dies that a test did not remove.

The settings are the GCS's (RayConfig), read from `RAY_<name>` in the environment of `ray start --head`: the
cluster YAMLs and KubeRay manifests set them there (tests/test_cluster_check.py keeps them equal to these), and
`gram-ray cluster local` and the tests' clusters from here. A local single-node Ray (`gram-ray train` without
RAY_ADDRESS) keeps Ray's defaults: it has no other node to fail over to, only its own to lose.
"""

from __future__ import annotations

__all__ = ["NODE_HEALTH_CHECKS", "node_health_env"]

NODE_HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def node_health_env() -> dict[str, str]:
    """NODE_HEALTH_CHECKS as the environment of a `ray start --head` (RAY_health_check_period_ms=1000, ...)."""
    return {f"RAY_{name}": str(value) for name, value in NODE_HEALTH_CHECKS.items()}
