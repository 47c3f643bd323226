"""Paths that may be local or in cloud storage (s3://, gs://, file://, anything pyarrow.fs knows).

On a cluster, checkpoints, results, the Parquet cache and the media must live where every node can read them, so
every file gram-ray reads or writes outside the driver's own output folder goes through these helpers.

Where storage is and who may use it comes from the environment, as every AWS tool takes it: AWS_ENDPOINT_URL (an
S3-compatible server: MinIO, Ceph, a local test server; pyarrow reads it), AWS_REGION, AWS_PROFILE, the
credentials variables or files, instance roles, workload identity (GOOGLE_* for gs://). Nothing of it is written
into a config or any file of a run. gram-ray forwards the variables that say where storage is (FORWARDED_ENV, no
secrets) to the Ray workers it schedules; credentials must be on every node (a role, or the node's environment).

Storage fails: S3 answers 503 SlowDown to bursts, connections reset, requests stall, regions go down. Two layers
ride that out, set once (StorageSettings: the config's `storage` section, or the environment the way AWS tools
read it) and applied in every process that touches storage:
- each request: pyarrow's S3 client retries a failed request up to `max_attempts` times with the AWS SDK's backoff
  (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE), and gives up on a connection or a stalled response after its timeouts;
- each whole operation gram-ray does (read, write, list, upload a checkpoint): what fails past those attempts is
  tried again with a backoff of 1, 2, 4, 8, 15, 15, ... s until `outage_s` have passed since it began, then
  ends as a StorageError naming the object. So an outage shorter than `outage_s` costs its length in time
  and nothing else, and a longer one ends the job, bounded, never hung.
The filesystems built here keep the settings when pickled to a Ray worker (pyarrow's own S3FileSystem drops its
retry strategy on the way, apache/arrow GH-47348).

The package, one concern a module: storage_settings.py (StorageSettings, configure), filesystems.py (which filesystem a
path is on; URIs and joins), retries.py (with_retries, StorageError), files.py (read, write, list, delete,
upload, each with the retries), ray_handler.py (the filesystem Ray Train and Tune write a run's storage through).
Every public name is importable from gram_ray.storage.
"""

from gram_ray.storage import files as _files
from gram_ray.storage import filesystems as _filesystems
from gram_ray.storage import ray_handler as _ray_handler
from gram_ray.storage import retries as _retries
from gram_ray.storage import storage_settings as _settings
from gram_ray.storage.files import *  # noqa: F403 (the package's names: each module's __all__)
from gram_ray.storage.filesystems import *  # noqa: F403
from gram_ray.storage.ray_handler import *  # noqa: F403 (PatientHandler: pickled by name in Ray's run state)
from gram_ray.storage.retries import *  # noqa: F403
from gram_ray.storage.storage_settings import *  # noqa: F403

__all__ = [*_settings.__all__, *_filesystems.__all__, *_retries.__all__, *_files.__all__, *_ray_handler.__all__]
