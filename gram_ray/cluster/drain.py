"""Drain a Ray node for a preemption: Ray places no new work on it, marks its actors as preempted, and Ray Train
(train/preemption.py) has the run checkpoint before `deadline` and restart on the nodes left.

The same request as Ray's hidden `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` and as `ray start
--block`'s SIGTERM handler, made in-process: a watcher with a 30 s notice cannot spend seconds starting a CLI.
"""

from __future__ import annotations

import time

__all__ = ["DrainRefused", "drain_node", "node_is_gone", "own_node", "the_node"]


class DrainRefused(RuntimeError):
    pass


def drain_node(gcs_address: str, node_id: str, deadline_s: float | None, why: str, timeout_s: float = 10.0) -> None:
    """Drain the node `node_id` (hex) with reason PREEMPTION. deadline_s: seconds from now until it goes (None:
    not known; Ray Train then allows 120 s). A preemption drain is not refused by the node; raises DrainRefused
    if the GCS refuses it anyway, and Ray's error when the GCS cannot be reached within timeout_s."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    deadline_ms = 0 if deadline_s is None else int((time.time() + deadline_s) * 1000)
    client = ray._raylet.GcsClient(address=gcs_address)
    accepted, reason = client.drain_node(
        node_id,  # hex: the GCS decodes it from hex (binary reads as the nil id, accepted and never drained)
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        why,
        deadline_ms,
        timeout=timeout_s,
    )
    if not accepted:
        raise DrainRefused(f"the drain of node {node_id} was refused: {reason}")


def own_node(address: str = "auto") -> tuple[str, str]:
    """(the GCS address, the id of the Ray node this machine runs): a driver connects to the local node for a
    moment and asks it. With several Ray nodes on one machine (tests), name the node instead."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    try:
        context = ray.get_runtime_context()
        return context.gcs_address, context.get_node_id()
    finally:
        ray.shutdown()


def the_node(address: str, node_id: str | None) -> tuple[str, str]:
    """(GCS address, node id) of the node to drain: as given, or this machine's (own_node) where the address is
    "auto" or no node is named."""
    if node_id is not None and address != "auto":
        return address, node_id
    found_address, found = own_node(address)
    return found_address, node_id or found


def node_is_gone(gcs_address: str, node_id: str, timeout_s: float = 10.0) -> bool:
    """The node is dead to the GCS (a drained node whose work has gone shuts itself down), or unknown to it."""
    import ray._raylet
    from ray.core.generated import gcs_pb2

    nodes = ray._raylet.GcsClient(address=gcs_address).get_all_node_info(timeout=timeout_s)
    for nid, info in nodes.items():
        if nid.hex() == node_id:
            return info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD
    return True
