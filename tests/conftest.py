import os
from pathlib import Path

import pytest

# Never talk to W&B's servers or prompt for a key from a test.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

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

    # The dashboard (state API) lets Ray Train release the placement groups of trials Tune stops; see cli._init_ray.
    ray.init(
        num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small synthetic dataset, generated once per session."""
    from gram_ray.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), n=24, seed=0)
