"""The node provider of `gram-ray cluster local`: Ray's fake multi-node provider, with one runtime-env folder per node.

Ray's fake provider starts every "node" in the head's session folder, and so every node's runtime-env agent in the
same `runtime_resources/` folder. On a real cluster each node has its own disk, and an agent setting up a job's
working_dir for its first worker deletes and re-extracts that folder (Ray 2.60: working_dir.py downloads with
overwrite=True), harmlessly. On one machine the folder is shared: a node that comes up mid-job deletes the working
directory of every worker on every other node, and of the job's driver, whose next `os.getcwd()` fails
(FileNotFoundError in Tune's end-of-sweep analysis, workers dying). Each node here gets its own
`runtime_resources_<node>` folder, as it would have its own disk.

The autoscaler (the head's monitor process) imports this module by name; it needs only Ray.
"""

from __future__ import annotations

from unittest import mock

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

__all__ = ["LocalNodeProvider"]


class LocalNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        make_params = ray._private.parameter.RayParams

        def own_runtime_env_dir(*args, **kwargs):
            params = make_params(*args, **kwargs)
            node_id = (kwargs.get("env_vars") or {}).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", "")
            params.runtime_env_dir_name = f"runtime_resources_{node_id[-5:] or 'node'}"
            return params

        # The parent builds each node's RayParams inline; this is the one place to give it its own folder.
        with mock.patch.object(ray._private.parameter, "RayParams", own_runtime_env_dir):
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
