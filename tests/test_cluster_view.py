"""An elastic restart follows the nodes left (train/cluster_view.py): after a worker group fails, or a start at
some size times out, the controller callback has Ray's autoscaling coordinator refresh its view of the cluster
every second for a while, instead of at its own 20 s tick. The whole path on several nodes:
tests/test_silent_loss.py."""

import time

import pytest
from ray import cloudpickle

pytestmark = pytest.mark.ray
NAME = ("TestCoordinator", "test-cluster-view")  # not Ray's own, which an elastic run of the session may have made


@pytest.fixture
def coordinator(ray_session):
    """An actor standing in for the coordinator, counting the refreshes it is asked for."""
    import ray

    @ray.remote(num_cpus=0)
    class Coordinator:
        def __init__(self) -> None:
            self.ticks: list[float] = []  # when each refresh ended (time.time)

        def _tick(self) -> None:
            time.sleep(0.2)  # a refresh reads the GCS's node table: it takes a moment
            self.ticks.append(time.time())

        def count(self) -> int:
            return len(self.ticks)

        def first(self) -> float:
            return self.ticks[0]

    actor = Coordinator.options(name=NAME[0], namespace=NAME[1]).remote()
    yield actor
    ray.kill(actor)


def _state(name: str):
    return type(name, (), {})()


def test_a_failed_group_has_the_coordinator_refresh_its_view_every_second_for_a_while(coordinator):
    import ray

    from gram_ray.train.cluster_view import fresh_cluster_view_callback

    callback = fresh_cluster_view_callback(refresh_for_s=2.5, every_s=0.5, coordinator=NAME)
    callback = cloudpickle.loads(cloudpickle.dumps(callback))  # as Ray Train hands it to its controller
    callback.after_controller_state_update(_state("RunningState"), _state("SchedulingState"))
    callback.after_controller_state_update(_state("SchedulingState"), _state("RunningState"))
    time.sleep(1.0)
    assert ray.get(coordinator.count.remote()) == 0  # a start and a run: nothing to refresh
    callback.after_controller_state_update(_state("RunningState"), _state("RestartingState"))
    returned = time.time()
    # Refreshed before the callback returned: the controller decides the restart's size right after its callbacks.
    assert ray.get(coordinator.first.remote()) <= returned
    callback.thread.join(timeout=10)
    ticks = ray.get(coordinator.count.remote())
    assert 4 <= ticks <= 7, ticks  # once, then every 0.5 s (and 0.2 s of its own) for 2.5 s, then it stops
    callback.after_controller_state_update(_state("SchedulingState"), _state("ReschedulingState"))
    callback.thread.join(timeout=10)
    assert ray.get(coordinator.count.remote()) > ticks  # a start that timed out refreshes it again


def test_without_a_coordinator_nothing_fails(ray_session):
    from gram_ray.train.cluster_view import refresh_cluster_view

    assert refresh_cluster_view(timeout_s=1.0, coordinator=("NoCoordinator", "test-cluster-view")) is False
