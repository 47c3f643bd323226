"""What the command modules share: the --config/--set/--verbose options, loading the config they name, checking what
a job reads and writes before it pays for anything, starting or joining Ray, and turning bad input into one
`Error: ...` line."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

__all__ = [
    "CONFIG_OPTION",
    "SET_OPTION",
    "VERBOSE_OPTION",
    "OneLineErrors",
    "input_error",
    "config_from_options",
    "check_then_start_ray",
    "init_ray",
    "dashboard_available",
    "training_failure",
    "training_errors",
]


class OneLineErrors(click.Group):
    """The `gram-ray` group: bad input that a command meets below its own checks (a file missing, unreadable or of
    the wrong kind, corrupt JSON or YAML, storage that does not answer) ends as one `Error: ...` line that names it,
    never a traceback. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as e:
            message = input_error(e)
            if message is None:
                raise
            raise click.ClickException(message) from None


_STORAGE_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused", "timed out")


def input_error(error: BaseException) -> str | None:
    """One line for an error that bad input or unreachable storage explains, or None for anything else. A Ray
    task's error is judged by its cause (Ray re-raises it wrapped, with the remote traceback in its text)."""
    import json

    import yaml

    from gram_ray.cluster.check import CheckError
    from gram_ray.config import ConfigError
    from gram_ray.data.manifest import ManifestError
    from gram_ray.data.preprocess import PreprocessError
    from gram_ray.model.safe_load import CheckpointError
    from gram_ray.retrieval.index import SearchIndexError
    from gram_ray.storage import CorruptFileError, StorageError

    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause
    # gram-ray's own errors say what is wrong and what to do (a StorageError: the operation, the object, the tries)
    own = (ConfigError, ManifestError, PreprocessError, CheckpointError, SearchIndexError, CheckError, CorruptFileError)
    if isinstance(error, (*own, StorageError)):
        return str(error)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:400]
    if isinstance(error, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(error).split())[:400]}"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {first}"
    if isinstance(error, UnicodeDecodeError):
        return f"a binary file where text was expected ({first}): is it the right file?"
    if isinstance(error, OSError):
        if error.filename is not None:  # a local path: the OS says what is wrong with it
            return f"{error.strerror or first}: {error.filename}"
        if any(sign in str(error) for sign in _STORAGE_UNREACHABLE):
            return (
                f"cannot reach storage: {first}. Check the endpoint (AWS_ENDPOINT_URL), the network and the "
                "credentials, then run again"
            )
        return f"storage or file error: {first}"
    if type(error).__name__ == "ArrowInvalid":  # pyarrow: a file that is not what it should be (not Parquet, ...)
        return f"unreadable data: {first}"
    return None


@contextlib.contextmanager
def training_errors():
    """A run (train, demo) that stops on its config or data, on the driver or on a worker, or on a known condition
    on a worker, ends as one `Error: ...` line; anything else keeps its traceback."""
    from gram_ray.data.preprocess import PreprocessError

    try:
        yield
    except (ValueError, FileNotFoundError, PreprocessError) as e:  # bad config or data: the message says which
        raise click.ClickException(str(e)) from None
    except Exception as e:
        reason = training_failure(e)
        if reason is None:
            raise
        raise click.ClickException(reason) from None


def training_failure(error: BaseException) -> str | None:
    """The one-line reason of a Ray Train run that failed because of a known condition on a worker (too many
    non-finite steps, a checkpoint that could not be written, a config the loop refuses), or None for anything
    else."""
    from gram_ray.model.checkpoint import CheckpointWriteError
    from gram_ray.storage import StorageError
    from gram_ray.train.step import NonFiniteTrainingError

    known = (NonFiniteTrainingError, CheckpointWriteError, ValueError, StorageError)
    controller = getattr(error, "controller_failure", None)  # Ray Train's controller: its checkpoint registry
    while controller is not None and not isinstance(controller, StorageError):
        controller = getattr(controller, "cause", None) or controller.__cause__
    if controller is not None:
        return f"training failed: Ray Train could not record the run's checkpoints: {controller}"
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = failure
        while cause is not None and not isinstance(cause, known):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            return f"training failed on worker {rank}: {cause}"
    return None


QUIET_LOG = "gram-ray-console.log"  # in Ray's session logs: the lines of Ray's kept off the console (cli/ray_noise.py)


def init_ray(verbose: bool = False) -> None:
    """Join the cluster RAY_ADDRESS names (a job submitted with `ray job submit` has it set; `RAY_ADDRESS=auto`
    joins the cluster `ray start` runs on this machine), else start a fresh local Ray in-process, with more
    logical CPUs than cores, so Ray Data decode tasks and Train workers never wait on each other. Without
    RAY_ADDRESS a job never lands on a cluster it was not sent to: ray.init() alone would join the latest
    `ray start` cluster of this machine (even a dead one), and refuse the CPU count.

    The variables that say where storage is (storage.FORWARDED_ENV) go to every worker of a job started here.
    Unless verbose, Ray's own INFO lines and the workers' output stay in Ray's session logs (the console says
    where), and so do the lines of Ray's that are known to be harmless (cli/ray_noise.py); gram-ray prints its
    progress lines itself."""
    import logging
    import warnings

    import ray
    import ray.data

    from gram_ray import storage
    from gram_ray.cli.ray_noise import quiet_ray
    from gram_ray.cluster.processes import init_local_ray

    # Ray Data's progress bars are for terminals; elsewhere (logs, CI, `ray job` output) they stay off.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stdout.isatty()
    # A function of gram-ray's that fails in a Ray Data task (a decode task's write that storage refused past its
    # retries) reaches the driver as its own error, naming what failed, not as Ray Data's UserCodeException (which
    # arrives without it: a pickled exception loses its __cause__, and Ray's text ends in generic retry advice).
    context.raise_original_map_exception = True
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    if not ray.is_initialized():
        if not verbose:
            quiet_ray()  # before ray.init: it logs at start
        options = {"log_to_driver": verbose, "logging_level": level}
        # A submitted job's workers get the job's runtime environment already (Ray ignores another one here).
        if storage.forwarded_env() and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            options["runtime_env"] = {"env_vars": storage.forwarded_env()}
        if os.environ.get("RAY_ADDRESS"):
            info = ray.init(address=os.environ["RAY_ADDRESS"], **options)
            click.echo(f"joined the Ray cluster at {info.address_info['gcs_address']} (RAY_ADDRESS)")
        else:
            # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls every second:
            # without it the cleaner logs a warning each time, and the workers' placement group of every trial
            # Tune stops (ASHA, or its last report) is never released, so a sweep stalls once they fill the
            # node. Bound to this machine only.
            dashboard = dashboard_available()
            if not dashboard:
                click.echo(
                    "Ray's dashboard dependencies (ray[default]) are not installed: starting Ray without it. Tune "
                    "sweeps need it to release the workers of stopped trials."
                )
            cpus = max(8, os.cpu_count() or 1)
            info = init_local_ray(num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **options)
            click.echo(
                f"started a local Ray ({cpus} logical CPUs); to run on a cluster, set RAY_ADDRESS (auto: the "
                "`ray start` cluster of this machine) or use `ray job submit`"
            )
        if not verbose:
            logs = Path(info.address_info["session_dir"]) / "logs"
            quiet_ray(logs / QUIET_LOG)
            click.echo(
                f"Ray's full logs: {logs} (Ray's known-harmless console lines: {QUIET_LOG}; --verbose shows all)"
            )
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if not verbose:  # off the terminal the bars are off on purpose: no need to say so
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def check_then_start_ray(needs: list, data_config, verbose: bool = False) -> None:
    """Before paying (cluster/preflight.py): what the job reads and writes checked here (URIs; local paths too
    without a cluster), then Ray started or joined, then the local paths checked on a CPU node of the cluster. Every
    problem is one `Error: ...` line naming the key, the value and what to do; none of them costs a decoded clip or
    a GPU node."""
    from gram_ray.cluster.preflight import PreflightError, check_here, check_on_cluster

    try:
        left = check_here(needs, data_config)
        init_ray(verbose)
        check_on_cluster(left, data_config)
    except PreflightError as e:
        raise click.ClickException("\nError: ".join(e.lines)) from None


def dashboard_available() -> bool:
    """Whether Ray can start its dashboard here: Ray decides by importing this module (a slim Ray, like the one
    carried to a bare GPU machine, lacks aiohttp_cors, opencensus and the like)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
SET_OPTION = click.option("--set", "overrides", multiple=True, help="override a config key, e.g. --set train.lr=2e-5")
VERBOSE_OPTION = click.option("--verbose", "-v", is_flag=True, help="also show Ray's INFO logs and the workers' output")


def config_from_options(config_path, overrides):
    """The config of --config (default: the built-in one) with --set applied; a bad one is a usage error."""
    from gram_ray import storage
    from gram_ray.config import ConfigError, load_config

    try:
        cfg = load_config(config_path, overrides)
        # Before Ray starts: its workers inherit this process's environment, and FORWARDED_ENV carries it further.
        storage.configure(storage.StorageSettings.of(cfg.storage))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except ValueError as e:  # a bad AWS_MAX_ATTEMPTS, AWS_RETRY_MODE or GRAM_RAY_STORAGE_* in the environment
        raise click.UsageError(str(e)) from None
    return cfg
