"""The processes gram-ray starts beside a job: a Ray head on 127.0.0.1 on free ports, stopped by its process group.

Stopping by process group (never `ray stop`, never by name) ends exactly the head that was started here, and
every process it started that stayed in its group, and leaves any other Ray on the machine alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["free_port", "init_local_ray", "ray_head_command", "stop_group", "wait_until_up"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_ray(**options):
    """ray.init(address="local", **options) on a GCS port chosen here, with RAY_ADDRESS naming it in every worker's
    environment (the job's runtime env). Ray code that runs in a worker and finds its cluster from the machine
    (Ray Train's PlacementGroupCleaner asks the state API whether a stopped trial's controller is alive) otherwise
    fails with "Found multiple active Ray instances" when another Ray runs on the machine, and the stopped trial's
    placement group, with its CPUs, is never released."""
    import ray

    port = free_port()
    runtime_env = dict(options.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # Ray's own switch for a head's GCS port
    try:
        return ray.init(address="local", runtime_env=runtime_env, **options)
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def ray_head_command(
    gcs_port: int,
    num_cpus: int,
    dashboard_port: int | None = None,
    temp_dir: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`ray start --head --block` of this Python's Ray, bound to 127.0.0.1, every port chosen (free ones where not
    given), the dashboard and job server on dashboard_port (none without it)."""
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--num-cpus={num_cpus}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
    ]
    if dashboard_port:
        command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        command += ["--include-dashboard=false"]
    return command + ([f"--temp-dir={temp_dir}"] if temp_dir else []) + list(extra)


def stop_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group of a process started with start_new_session=True (`ray start --block` stops
    its own processes on it), then SIGKILL to whatever of the group is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_until_up(
    process: subprocess.Popen, answers: Callable[[], object], timeout_s: float, poll_s: float = 1
) -> bool:
    """Call answers() until it returns without raising (True), or the process exits or timeout_s passes (then the
    process group is stopped and False returned)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answers()
            return True
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_group(process)
                return False
            time.sleep(poll_s)
