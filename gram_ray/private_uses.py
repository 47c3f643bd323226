"""Every use gram-ray makes of its dependencies' private or unstable internals, in one list: where, what, why no
public API serves, and a check that the installed version still has it (tests/test_private_uses.py runs every
check against the locked versions, so an upgrade that drops one fails there, not in a user's run).

Public APIs replaced the rest: resume reads Ray Train's checkpoint registry through ray.train.Result.from_path,
not its snapshot file. RAY_DEDUP_LOGS_SKIP_REGEX does not serve the console filter (cli/ray_noise.py): Ray reads
it once, when `ray` is first imported (before a command knows it will filter), it drops the lines where the
filter keeps them in gram-ray-console.log, and it covers only one of the three ways Ray's lines reach a console.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PRIVATE_USES", "PrivateUse", "problems"]


@dataclass(frozen=True)
class PrivateUse:
    where: str  # the module of gram-ray's that uses it
    what: str  # the internal it relies on
    why: str  # what it is for, and why no public API serves
    check: Callable[[], None]  # raises (AttributeError, ImportError, AssertionError) when it is gone


def _train_context_module() -> None:
    from ray.train.v2._internal.execution import context

    assert context.__file__.endswith(".py")


def _controller_callback() -> None:
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import ResizingState

    for hook in ("before_controller_execute_resize_decision", "after_controller_state_update"):
        assert callable(getattr(ControllerCallback, hook)), hook
    assert "scaling_decision" in inspect.signature(ResizingState.__init__).parameters


def _print_to_stdstream() -> None:
    import ray._private.worker as worker

    assert list(inspect.signature(worker.print_to_stdstream).parameters) == ["data", "ignore_prefix"]
    assert "print_to_stdstream(" in inspect.getsource(worker.listen_error_messages)


def _fake_provider() -> None:
    import ray._private.parameter as parameter
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    assert "runtime_env_dir_name" in inspect.signature(parameter.RayParams.__init__).parameters
    source = inspect.getsource(FakeMultiNodeProvider._create_node_with_resources_and_labels)
    assert "RayParams(" in source


def _ray_data_progress_logger() -> None:
    import ray.data._internal.progress as progress

    assert progress.__name__ == "ray.data._internal.progress"


def _ray_data_retry_message() -> None:
    from ray.data._internal import util

    assert "attempts (total backoff" in inspect.getsource(util._annotate_exception_with_retry_context)


def _train_storage_context() -> None:
    from ray.train.v2._internal.execution.storage import StorageContext

    assert callable(StorageContext.build_checkpoint_path_from_name)
    assert "storage_filesystem" in inspect.signature(StorageContext.__init__).parameters


def _start_timeout_env() -> None:
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    assert WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _preemption_poll_env() -> None:
    from ray.train.v2._internal import constants

    assert constants.PREEMPTION_POLL_INTERVAL_S_ENV_VAR == "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"
    assert constants.PREEMPTION_POLL_INTERVAL_S_ENV_VAR in constants.ENV_VARS_TO_PROPAGATE  # driver -> controller


def _gcs_health_check_config() -> None:
    import ray._raylet

    # The GCS reads RayConfig from RAY_<name>: these are names of its options (src/ray/common/ray_config_def.h).
    from gram_ray.cluster.health import NODE_HEALTH_CHECKS

    config = ray._raylet.Config
    assert all(hasattr(config, name) for name in NODE_HEALTH_CHECKS), [
        n for n in NODE_HEALTH_CHECKS if not hasattr(config, n)
    ]


def _autoscaling_coordinator() -> None:
    import inspect

    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    from gram_ray.train.cluster_view import COORDINATOR

    name, namespace = COORDINATOR
    source = inspect.getsource(coordinator.get_or_create_autoscaling_coordinator)
    assert f'name="{name}"' in source and f'namespace="{namespace}"' in source, source
    assert callable(coordinator._AutoscalingCoordinatorActor._tick)
    assert "_update_cluster_node_resources" in inspect.getsource(coordinator._AutoscalingCoordinatorActor._tick)


def _gcs_drain_node() -> None:
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    doc = ray._raylet.InnerGcsClient.drain_node.__doc__
    assert "reason_message" in doc and "deadline_timestamp_ms" in doc and "timeout" in doc, doc
    assert autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    from ray.core.generated import gcs_pb2

    assert "Dict[NodeID, gcs_pb2.GcsNodeInfo]" in ray._raylet.InnerGcsClient.get_all_node_info.__doc__
    assert gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD


def _head_node_resource() -> None:
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    assert HEAD_NODE_RESOURCE_NAME == "node:__internal_head__"


def _s3_reduce_layout() -> None:
    import pyarrow.fs as pafs

    options = pafs.S3FileSystem(region="us-east-1", anonymous=True).__reduce__()[1][0]
    # (without the retry strategy: apache/arrow GH-47348, why SettledS3FileSystem exists)
    assert isinstance(options, dict) and options["region"] == "us-east-1" and "endpoint_override" in options


PRIVATE_USES = (
    PrivateUse(
        "train/worker.py (_quiet_ray_train_reports)",
        "ray.train.v2._internal.execution.context: its file path, the name of the logger Ray Train logs every "
        "ray.train.report with",
        "each report is logged at INFO with all its ~100 metrics; the logger is named by file path, not by a name",
        _train_context_module,
    ),
    PrivateUse(
        "train/console.py (resize_callback)",
        "ray.train.v2._internal.execution.callback.ControllerCallback, its resize hooks and ResizingState",
        "the note that an elastic group is being resized: the public UserCallback has no hook for it",
        _controller_callback,
    ),
    PrivateUse(
        "cli/ray_noise.py (quiet_ray)",
        "ray._private.worker.print_to_stdstream, which the driver's error listener prints raylet messages with",
        "keeping Ray's known-harmless lines off the console and in gram-ray-console.log (see this module's text)",
        _print_to_stdstream,
    ),
    PrivateUse(
        "cluster/local_provider.py (LocalNodeProvider)",
        "ray.autoscaler._private.fake_multi_node's FakeMultiNodeProvider and ray._private.parameter.RayParams's "
        "runtime_env_dir_name",
        "`gram-ray cluster local`: Ray's own provider of several nodes on one machine, each node given its own "
        "runtime-env folder as it would have its own disk",
        _fake_provider,
    ),
    PrivateUse(
        "cli/common.py (init_ray)",
        "the logger name ray.data._internal.progress",
        "Ray Data's progress bars' warnings, kept off a job's console",
        _ray_data_progress_logger,
    ),
    PrivateUse(
        "storage/retries.py (failure_in)",
        "the text of Ray Data's last retry line: 'after N/M attempts (total backoff Xs)'",
        "saying how often a read was tried when it failed inside Ray Data, which raises it wrapped",
        _ray_data_retry_message,
    ),
    PrivateUse(
        "train/worker.py (_upload_checkpoint)",
        "ray.train.get_context().get_storage(): Ray Train's StorageContext (a DeveloperAPI)",
        "the checkpoint's place in the run's storage, for an upload with gram-ray's retries (checkpoint_upload_fn)",
        _train_storage_context,
    ),
    PrivateUse(
        "train/trainer.py (train_env)",
        "the environment variable RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
        "scaling.start_timeout_s: Ray Train's ScalingConfig has no field for the worker group's start timeout",
        _start_timeout_env,
    ),
    PrivateUse(
        "train/trainer.py (train_env)",
        "the environment variable RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S",
        "how often Ray Train's preemption watcher looks for drained nodes (5 s by default, a sixth of GCP's notice); "
        "no config field sets it",
        _preemption_poll_env,
    ),
    PrivateUse(
        "cluster/health.py (NODE_HEALTH_CHECKS), the cluster YAMLs and KubeRay manifests",
        "the GCS's health_check_period_ms, health_check_timeout_ms and health_check_failure_threshold, set as "
        "RAY_<name> in the head's environment",
        "how soon a node gone without notice is declared dead (about 15 s by default, 65 s for a node that drops "
        "off the network); Ray documents no other way to set them",
        _gcs_health_check_config,
    ),
    PrivateUse(
        "train/cluster_view.py (refresh_cluster_view)",
        "Ray Data's AutoscalingCoordinator actor (by name) and its _tick method: the periodic refresh of its view "
        "of the cluster's nodes, called at once",
        "an elastic restart after a node is lost without notice takes the size the coordinator reserves, from a "
        "view it refreshes every 20 s; until then each start at the old size times out",
        _autoscaling_coordinator,
    ),
    PrivateUse(
        "cluster/drain.py (drain_node)",
        "ray._raylet.GcsClient.drain_node and autoscaler_pb2.DrainNodeReason: the GCS's drain request; "
        "GcsClient.get_all_node_info and gcs_pb2.GcsNodeInfo: whether a drained node has gone (drain-self --wait)",
        "a preemption notice becomes a drain with its deadline; Ray's only other way is the hidden `ray drain-node` "
        "CLI (the same call, seconds slower to start, not covered by Ray's API guarantees either)",
        _gcs_drain_node,
    ),
    PrivateUse(
        "tune.py (_TRIAL_DRIVER)",
        "the head node's resource node:__internal_head__ (ray._common.constants.HEAD_NODE_RESOURCE_NAME)",
        "trial drivers pinned to the head, off spot nodes (Tune's resources take no scheduling strategy); Ray Train "
        "pins its own state actor the same way",
        _head_node_resource,
    ),
    PrivateUse(
        "storage/filesystems.py (filesystem)",
        "pyarrow.fs.S3FileSystem.__reduce__()[1][0]: the options it was made with, as a dict",
        "an S3FileSystem made from a URI, rebuilt with gram-ray's retry strategy and timeouts (pyarrow has no "
        "getter for its options); pyproject bounds pyarrow to the tested major",
        _s3_reduce_layout,
    ),
)


def problems() -> list[str]:
    """Each private use the installed versions no longer have: where, what, and the error."""
    found = []
    for use in PRIVATE_USES:
        try:
            use.check()
        except (AssertionError, AttributeError, ImportError, TypeError, OSError) as e:
            found.append(f"{use.where}: {use.what}: {type(e).__name__} {e}")
    return found
