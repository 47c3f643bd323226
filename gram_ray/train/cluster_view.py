"""An elastic run restarted on the nodes left without waiting for Ray's next look at the cluster.

How many workers an elastic group restarts with is what Ray's autoscaling coordinator (a Ray Data actor that
Ray Train's elastic policy asks) has reserved for it, from its view of the cluster's nodes, which it refreshes
every 20 s. After a node is lost without notice, Ray declares it dead in seconds (cluster/health.py), but the
coordinator goes on counting its resources until its next refresh, and meanwhile every start at the old size
waits scaling.start_timeout_s for resources that are gone. This controller callback has the coordinator refresh
its view as the controller enters a restart, before it decides the restart's size (the controller calls its
callbacks on its own thread and decides right after them; a node lost without notice is already dead in the GCS
when its worker's death fails the group), then every second for a while after, for a node the GCS declares dead
later: the restart's size follows the nodes that are there within about a second of the GCS knowing.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["COORDINATOR", "DECIDING_TIMEOUT_S", "REFRESH_FOR_S", "fresh_cluster_view_callback", "refresh_cluster_view"]

# Ray Data's AutoscalingCoordinator actor: its name and namespace (get_or_create_autoscaling_coordinator)
COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")
REFRESH_FOR_S = 15.0  # after a failure: the GCS declares a node dead within ~6 s (3 probes a second apart, 1 s each)
DECIDING_TIMEOUT_S = 2.0  # the refresh the controller waits for before it decides; a busy coordinator delays it no more
_AFTER = ("RestartingState", "ReschedulingState")  # a group failed; a start at some size timed out

log = logging.getLogger(__name__)


def refresh_cluster_view(timeout_s: float = 5.0, coordinator: tuple[str, str] = COORDINATOR) -> bool:
    """Have the coordinator (its actor's name and namespace) look at the cluster's nodes now (its periodic tick).
    False when there is none (no elastic run started it) or it did not answer."""
    import ray

    name, namespace = coordinator
    try:
        actor = ray.get_actor(name, namespace=namespace)
        ray.get(actor._tick.remote(), timeout=timeout_s)
    except Exception as e:  # never fail a run over a faster restart
        log.debug("the autoscaling coordinator's view was not refreshed: %s", e)
        return False
    return True


def fresh_cluster_view_callback(
    refresh_for_s: float = REFRESH_FOR_S, every_s: float = 1.0, coordinator: tuple[str, str] = COORDINATOR
):
    """A Ray Train controller callback (RunConfig.callbacks) refreshing the coordinator's view when the controller
    enters a restart or a rescheduling (on the controller's thread: the size it decides next reads that view),
    then every `every_s` for `refresh_for_s`, from a thread of its own."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class FreshClusterView(ControllerCallback):
        def __init__(self) -> None:
            # Made in the controller's process: the callback is pickled to it, and a lock or a thread cannot be.
            self.until, self.lock, self.thread = 0.0, None, None

        def after_controller_state_update(self, previous_state, current_state):
            if type(current_state).__name__ not in _AFTER:
                return
            refresh_cluster_view(timeout_s=DECIDING_TIMEOUT_S, coordinator=coordinator)
            if self.lock is None:  # the controller calls its callbacks from one thread
                self.lock = threading.Lock()
            with self.lock:
                self.until = time.monotonic() + refresh_for_s
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._refresh, name="fresh-cluster-view", daemon=True)
                    self.thread.start()

        def _refresh(self) -> None:
            while True:
                with self.lock:
                    if time.monotonic() >= self.until:
                        return
                refresh_cluster_view(coordinator=coordinator)
                time.sleep(every_s)

    return FreshClusterView()
