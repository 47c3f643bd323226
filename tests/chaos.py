"""Killing a Ray Train worker at a chosen moment, from a thread beside a fit()."""

import json
import os
import signal
import threading
import time
from pathlib import Path

SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_steps(run_root: Path) -> list[int]:
    """Steps of the checkpoints Ray Train registered for the run so far."""
    try:
        return [r["metrics"]["step"] for r in json.loads((run_root / SNAPSHOT).read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def kill_a_worker_when(
    run_root: Path, ready, sig: int = signal.SIGKILL
) -> tuple[threading.Thread, dict, threading.Event]:
    """Start a thread that sends `sig` (SIGKILL; SIGSTOP freezes it) to one Ray Train worker process as soon as
    ready(registered steps) is true. Returns (thread, info: {"after_step", "pid", "at"} once sent, an event to set
    when the fit is over)."""
    import ray
    from ray.util.state import list_actors

    info, finished = {}, threading.Event()
    # This session's own Ray, named: without an address the state API refuses to choose when another Ray runs on
    # the machine (a test's cluster, another user's).
    address = ray.get_runtime_context().gcs_address

    def watch():
        while not finished.is_set():
            steps = registered_steps(run_root)
            if steps and ready(steps):
                alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                workers = list_actors(address=address, filters=alive)
                if workers:
                    os.kill(workers[-1].pid, sig)
                    info.update(after_step=max(steps), pid=workers[-1].pid, at=time.time())
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, info, finished
