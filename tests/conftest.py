import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from s3 import S3Server, point_s3_at
from storage_faults import FaultyS3

from gram_ray.cluster.processes import free_port, init_local_ray

# Never talk to W&B's servers or prompt for a key from a test.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Token authentication is on for every Ray of the session, as on a cluster (Ray reads this when it is imported):
# the session's own Ray, the Cluster of several nodes and the commands tests run share this token; the
# `ray start` heads of test_cluster.py get their own.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

# Every Ray of the session stays on 127.0.0.1: Ray would otherwise rewrite 127.0.0.1 in an address it connects to
# into this machine's network address (its "remotely reachable IP"). This setting makes the loopback address
# every node's IP instead (Ray's own switch for single-machine clusters; Cluster's nodes start without `ray start`).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# Every S3 client of the session (this process, the Ray it starts, the Ray heads and nodes tests start) talks to
# the local S3 server, set before any of them starts; the server itself starts when a test first asks for it.
S3_PORT = free_port()
point_s3_at(S3_PORT)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: more logical CPUs than the machine's 2 cores, so Ray Data
    tasks and Train workers never wait on each other."""
    import ray

    # The dashboard (state API) lets Ray Train release the placement groups of trials Tune stops (cli.common.init_ray).
    # address="local": a Ray of its own even where a test's Cluster has recorded itself as the machine's cluster.
    init_local_ray(
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small synthetic dataset, generated once per session."""
    from gram_ray.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), n=24, seed=0)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The local S3 server (moto) on 127.0.0.1; .bucket() makes a fresh bucket and returns its s3:// URI."""
    server = S3Server(S3_PORT, tmp_path_factory.mktemp("s3") / "server.log")
    yield server
    server.stop()


class BucketBehindFaults(NamedTuple):
    data: dict  # synth_small's paths in the bucket (gram_ray.data.synthetic.generate's keys)
    bucket: str  # s3://...
    proxy: FaultyS3  # the fault layer: the endpoint the commands a test runs reach storage through


@pytest.fixture
def faulty_bucket(s3, synth_small) -> Iterator[BucketBehindFaults]:
    """synth_small in a fresh bucket of the session's S3 server, and the fault layer (tests/storage_faults.py) in
    front of it: seeded, answering every request until the test plans its faults. The test's own process talks to
    the server directly, so what it checks is read past the faults."""
    data = s3.upload_dataset(synth_small)
    proxy = FaultyS3(s3.port, seed=29)
    yield BucketBehindFaults(data, s3.bucket_of(data), proxy)
    proxy.stop()
