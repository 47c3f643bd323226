"""What guards a training worker, wired to Ray: Ray Train's preemption info as the loop's Notices (a drain notice
costs no step: preemption.py), and the step watchdog (watchdog.py) with the small actor through which the ranks of a
group tell each other their phase.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from gram_ray import storage
from gram_ray.config import GramConfig
from gram_ray.train.console import on_this_node, put_record
from gram_ray.train.events import FROZEN, NOTE
from gram_ray.train.preemption import Notice, Notices
from gram_ray.train.watchdog import StepWatchdog, dump_stacks

__all__ = ["StepBeacon", "preemption_notices", "step_beacon", "step_watchdog"]

# How long a rank the watchdog ends may spend on its last writes (the stacks' copy, the logs): storage or W&B that
# hang must not keep the group from restarting.
FINAL_WRITES_S = 30.0


def preemption_notices(
    args, cfg: GramConfig, tracker, watchdog: StepWatchdog | None, rank: int, fresh: bool
) -> Notices | None:
    """Ray Train's preemption info (its watcher polls the nodes being drained; train_env sets how often) as the
    loop's Notices: what happens goes to the console, result.json and W&B (rank 0). For the step watchdog's test,
    test_hang "S:R" has rank R of a group started afresh never join the poll after step S (a collective). None where
    train.preemption_checkpoint is off. args: the worker's WorkerArgs (worker.py)."""
    import ray.train

    if not cfg.train.preemption_checkpoint:
        return None

    hang = tuple(int(x) for x in args.test_hang.split(":")) if args.test_hang and fresh else None

    def poll(step: int) -> Notice | None:
        if hang == (step, rank):
            threading.Event().wait()  # for ever: the other ranks wait in the barrier below
        info = ray.train.get_preemption_info()  # a barrier: every rank asks after every step
        if info is None:
            return None
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        return Notice(deadline, tuple(info.preempted_ranks), tuple(info.preempted_node_ids))

    def announce(event: str, text: str, fields: dict) -> None:
        print(text, flush=True)
        tracker.log({"step": fields["step"]} | {f"preemption/{k}": v for k, v in fields.items() if k != "step"})
        if args.progress is not None:
            put_record(args.progress, {"kind": NOTE, "event": event, "text": text, "source": args.source} | fields)

    def confirm(step: int, timeout_s: float) -> bool:
        committed = ray.train.CheckpointConsistencyMode.COMMITTED
        registered = ray.train.get_all_reported_checkpoints(consistency_mode=committed, timeout_s=timeout_s)
        return any(r.metrics.get("step") == step for r in registered)

    def wait_for_restart(notice: Notice, step: int) -> None:
        """Block until Ray Train tears the group down (at the drain's deadline; FailureConfig.preemption_grace_s
        after it) and restarts it from the checkpoint just written. Returning would end the run as finished."""
        with watchdog.pause() if watchdog is not None else contextlib.nullcontext():  # waiting is no freeze
            while True:  # (the watchdog's thread keeps saying so: the other ranks do not find this one silent)
                time.sleep(60)

    return Notices(poll, wait=wait_for_restart, announce=announce, confirm=confirm)


class StepBeacon:
    """Every rank's phase (a step, or reading its next batch, and since when), for the step watchdogs: a rank stuck
    in a collective holds while another waits on storage, and finds one that has gone silent. A zero-CPU actor on
    the driver's node (step_beacon), for the run's whole life: each worker group is told apart by its own id."""

    def __init__(self) -> None:
        self.group: str | None = None  # the group heard from last: a newer one means the old one is gone
        self.beats: dict[int, tuple[str, float, float]] = {}  # rank: (phase, since, said at)

    def beat(self, group: str, rank: int, phase: str, since: float) -> None:
        if group != self.group:
            self.group, self.beats = group, {}
        self.beats[rank] = (phase, since, time.time())

    def peers(self, group: str, rank: int) -> dict[int, tuple[str, float, float]]:
        """The other ranks of `group`: {rank: (phase, since, seconds since it last said)}."""
        if group != self.group:
            return {}
        now = time.time()
        return {r: (phase, since, now - said) for r, (phase, since, said) in self.beats.items() if r != rank}


def step_beacon():
    import ray

    return ray.remote(num_cpus=0, scheduling_strategy=on_this_node())(StepBeacon).remote()


# Ray Data retries a failed read of a cache on its own, on top of storage's: 10 tries with a random backoff of up to
# 2, 4, 8, 16, then 32 s between them, at most 190 s (docs/faults.md). A wait for data is no freeze before that.
RAY_DATA_READ_RETRIES_S = 190.0


def step_watchdog(args, cfg: GramConfig, rank: int, tracker) -> StepWatchdog | None:  # args: a WorkerArgs
    """The step watchdog of this rank (train.watchdog_steps), started; its stall dumps this process's stacks into
    the run's stacks/ folder (and its storage) and ends the process: Ray Train restarts the group."""
    import ray
    import ray.train

    if not cfg.train.watchdog_steps or args.beacon is None:
        return None
    settings = storage.settings()  # as the worker configured them from cfg.storage
    beat_s = 2.0
    # This worker group, as every rank of it names it: Ray Train gives each group start its own rendezvous.
    group = (
        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}/{ray.train.get_context().get_world_size()}"
    )

    def on_stall(why: str) -> None:
        node = ray.get_runtime_context().get_node_id()[:8]
        name = f"rank-{rank}-node-{node}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        where = Path(args.output_dir) / "stacks"
        where.mkdir(parents=True, exist_ok=True)
        dump_stacks(where / name)
        sync_to = (args.tracking or {}).get("sync_to")
        if sync_to is not None:  # the stacks on this node's disk stay where storage fails
            copy = lambda: storage.put_bytes(storage.join(sync_to, "stacks", name), (where / name).read_bytes())  # noqa: E731
            _at_most(FINAL_WRITES_S, copy, f"copying the stacks to {sync_to}")
        text = f"step watchdog on rank {rank}: {why}; its Python stacks are in {where / name}; ending this worker"
        text += " so that the group restarts from the last whole checkpoint"
        print(text, flush=True)
        if args.progress is not None:
            put_record(args.progress, {"kind": NOTE, "event": FROZEN, "text": text, "source": args.source})
        _at_most(FINAL_WRITES_S, tracker.finish, "closing the run's logs")  # the logs so far reach its storage
        time.sleep(2 * beat_s)  # the other ranks see this one's FROZEN within a beat: their stacks first
        os._exit(70)  # the main thread is stuck: only the process's end frees the group

    return StepWatchdog(
        on_stall,
        steps=cfg.train.watchdog_steps,
        floor_s=cfg.train.watchdog_floor_s,
        data_grace_s=settings.outage_s + settings.request_timeout_s + RAY_DATA_READ_RETRIES_S,
        publish=lambda phase, since: args.beacon.beat.remote(group, rank, phase, since),
        peers=lambda: ray.get(args.beacon.peers.remote(group, rank), timeout=10),
        beat_s=beat_s,
    ).start()


def _at_most(seconds: float, action, what: str) -> None:
    """action() in a thread, waited for `seconds` at most; a failure or a hang is said, not raised."""

    def run() -> None:
        try:
            action()
        except Exception as e:
            print(f"step watchdog: {what} failed: {e}", flush=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        print(f"step watchdog: {what} took over {seconds:.0f} s; going on without it", flush=True)
