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
"""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import posixpath
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow.fs as pafs

__all__ = [
    "StorageSettings",
    "StorageError",
    "configure",
    "settings",
    "with_retries",
    "failure_in",
    "is_transient",
    "filesystem",
    "FORWARDED_ENV",
    "forwarded_env",
    "run_storage",
    "unwrapped",
    "is_uri",
    "resolve",
    "join",
    "absolute",
    "exists",
    "kind",
    "read_bytes",
    "read_text",
    "read_table",
    "read_json",
    "CorruptFileError",
    "write_text",
    "write_bytes_with",
    "delete_file",
    "delete_dir",
    "list_files",
    "list_names",
    "file_infos",
    "upload_dir",
    "copy_files_to",
    "put_bytes",
    "total_bytes",
]


@dataclass(frozen=True)
class StorageSettings:
    """How hard gram-ray tries before a storage fault ends a job. The defaults are for training runs of hours on
    spot nodes: a minute's outage is ridden out (tested: docs/faults.md)."""

    max_attempts: int = 5  # tries of one request, the first included (AWS_MAX_ATTEMPTS); ~7 s of backoff
    retry_mode: str = "standard"  # the AWS SDK's backoff: standard (random, up to 2^n s, 20 s at most) or legacy
    connect_timeout_s: float = 10.0  # a connection not made by then is a failed try
    request_timeout_s: float = 60.0  # a response silent for this long is a failed try
    outage_s: float = 120.0  # how long one operation keeps trying past max_attempts before the job ends

    def __post_init__(self) -> None:
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"storage retry_mode {self.retry_mode!r} is not one of {', '.join(RETRY_MODES)}")
        if self.max_attempts < 1:
            raise ValueError(f"storage max_attempts must be 1 or more (got {self.max_attempts})")
        for name in ("connect_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"storage {name} must be more than 0 (got {getattr(self, name)})")
        if self.outage_s < 0:
            raise ValueError(f"storage outage_s must be 0 or more (got {self.outage_s})")

    @classmethod
    def from_env(cls, env=None) -> StorageSettings:
        """The settings the environment gives (SETTINGS_ENV), the defaults for the rest; a bad value is an error
        naming its variable."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(SETTINGS_ENV[f.name])
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = raw.lower() if f.name == "retry_mode" else type(getattr(cls, f.name))(raw)
            except ValueError:
                raise ValueError(f"{SETTINGS_ENV[f.name]}={raw!r} is not a valid {f.type}") from None
        if values.get("retry_mode") == "adaptive":  # the AWS SDKs' client-side rate limiting: pyarrow has none
            values["retry_mode"] = "standard"
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{e} (from the environment: {', '.join(SETTINGS_ENV.values())})") from None

    def env(self) -> dict[str, str]:
        """These settings as environment variables, for this process and the Ray workers it starts."""
        return {SETTINGS_ENV[k]: str(v) for k, v in asdict(self).items()}


RETRY_MODES = ("standard", "legacy", "adaptive")
SETTINGS_ENV = {
    "max_attempts": "AWS_MAX_ATTEMPTS",
    "retry_mode": "AWS_RETRY_MODE",
    "connect_timeout_s": "GRAM_RAY_STORAGE_CONNECT_TIMEOUT_S",
    "request_timeout_s": "GRAM_RAY_STORAGE_REQUEST_TIMEOUT_S",
    "outage_s": "GRAM_RAY_STORAGE_OUTAGE_S",
}

_filesystems: dict = {}  # (URI's bucket and options, settings) -> filesystem: one client (and region lookup) each
_filesystems_lock = threading.Lock()


def settings() -> StorageSettings:
    """This process's storage settings: its environment's (configure() sets them), else the defaults."""
    return StorageSettings.from_env()


def configure(chosen: StorageSettings) -> None:
    """Make these the settings of this process and of the Ray workers it starts afterwards (they inherit the
    environment, and FORWARDED_ENV carries them to other nodes)."""
    os.environ.update(chosen.env())
    _gave_up.clear()
    with _filesystems_lock:
        _filesystems.clear()


class StorageError(OSError):
    """Storage failed for longer than the settings allow: the message names the operation, the object, how long
    it was tried and the last error."""

    def __str__(self) -> str:
        # One line, as written: Ray Data appends its generic retry advice to the text of an error raised in a task.
        return super().__str__().split("\n", 1)[0]


# Errors no retry mends: the object or bucket is not there, or the credentials may not touch it.
_PERMANENT = re.compile(
    r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|NO_SUCH_BUCKET|NO_SUCH_KEY|RESOURCE_NOT_FOUND"
    r"|HTTP status 40[0-4]\b|InvalidAccessKeyId|AccessDenied|NoSuchBucket"
    r"|Bucket '[^']*' not found"  # pyarrow's own word for a bucket that is not there (a typo in its name)
)


# Nothing answered at all: no such host, or nothing listening at the endpoint.
_UNREACHABLE = re.compile(r"curlCode: (6|7)\b|Could not resolve host|Couldn't connect|Connection refused")
_answered: set[str] = set()  # endpoints that have answered this process: later faults are an outage, not a typo
_gave_up = threading.Event()  # an operation outlasted outage_s: later ones try once until storage answers again


def is_transient(error: BaseException) -> bool:
    """Whether a storage error may pass if tried again later (throttling, a 5xx, a reset or a timeout). Storage
    that has never answered this process (a wrong endpoint or host) is not an outage to wait out."""
    if not isinstance(error, OSError) or isinstance(error, StorageError):
        return False
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _endpoint() not in _answered and _UNREACHABLE.search(str(error)):
        return False
    return _PERMANENT.search(str(error)) is None


def _endpoint() -> str:
    """Which storage this process talks to: the S3 endpoint the environment names ("" for AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def with_retries(action: str, target: str, operation, remote: bool | None = None):
    """operation(), tried again while it fails with a transient storage error, until the settings' outage_s have
    passed since it began (one try more can start before then: the bound is outage_s plus one try's attempts); then
    a StorageError naming the action and the target. remote: whether target is in object storage (default:
    whether it is a URI); local files are tried once."""
    if not (is_uri(target) if remote is None else remote):
        return operation()
    # Once an operation of this process has given up, storage is known to be down: the next operations (a failing
    # run's cleanup, its last writes) try once each instead of waiting out outage_s again, so a run ends within
    # one outage_s, not one per operation left.
    limit = 0.0 if _gave_up.is_set() else settings().outage_s
    started, tries, delay = time.monotonic(), 0, 1.0
    while True:
        tries += 1
        try:
            result = operation()
            _answered.add(_endpoint())
            _gave_up.clear()
            return result
        except FileNotFoundError:
            _answered.add(_endpoint())  # storage answered: the object is not there
            _gave_up.clear()
            raise
        except OSError as e:
            if not is_transient(e):
                raise
            waited = time.monotonic() - started  # from the first try's start: a try itself takes the attempts' time
            if waited + delay > limit:
                how_long = (
                    f"for longer than storage.outage_s={limit:g} s"
                    if not _gave_up.is_set()
                    else f"past storage.outage_s={settings().outage_s:g} s in this process already (so tried once)"
                )
                _gave_up.set()
                raise StorageError(
                    f"storage failed {action} {target}: {tries} tries over {waited:.0f} s, the last: {_short(e)}. "
                    f"Storage was unreachable or failing {how_long}; check it (endpoint, region, credentials, the "
                    "provider's status page) and run again (--resume auto continues a training run)"
                ) from e
            print(
                f"storage: {action} {target} failed ({_short(e)}); trying again in {delay:g} s "
                f"(gives up {limit - waited:.0f} s from now)",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


# A storage client's error: the AWS SDK's, or curl's beneath it (the first line of what pyarrow raises).
_CLIENT_ERROR = re.compile(r"AWS Error|curlCode")
# Ray Data's last line after its own read retries (ray.data._internal.util.iterate_with_retry).
_RAY_DATA_TRIES = re.compile(r"after (\d+)/\d+ attempts \(total backoff ([\d.]+)s\)")
# How pyarrow names an object in an error: 'bucket/key' (Could not open Parquet input source '...', When reading
# information for key '...').
_OBJECT_NAMED = re.compile(r"'[^'\s]+/[^'\s]+'")


def failure_in(error: BaseException, action: str, target: str) -> StorageError | None:
    """The StorageError to end a job with when storage failed inside code that retries it on its own (a Ray Data
    read: its tasks try a file 10 times before the error reaches the consumer, wrapped in Ray's exceptions, its
    message ending in Ray's generic retry advice): the object and the storage error, named on one line; None when
    storage is not what failed."""
    seen, pending = set(), [error]
    while pending:
        cause = pending.pop(0)
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        text = str(cause)
        first = text.strip().splitlines()[0] if text.strip() else ""
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError) and _CLIENT_ERROR.search(first):
            tries = _RAY_DATA_TRIES.search(text)
            how = f" ({tries[1]} tries, {float(tries[2]):.0f} s of backoff between them)" if tries else ""
            # pyarrow names the object when opening it fails, not when a read inside it does (its GetObject error
            # for a byte range carries no key, pyarrow 26): then only the folder read is known.
            where = (
                "" if _OBJECT_NAMED.search(first) else " (a read inside one of its files; pyarrow does not say which)"
            )
            return StorageError(
                f"storage failed {action} {target}{where}: {_short(first).rstrip(': ')}{how}. Check storage "
                "(endpoint, region, credentials, the provider's status page) and run again (--resume auto continues "
                "a training run)"
            )
        pending += [getattr(cause, "cause", None), cause.__cause__, cause.__context__]
    return None


def _short(error: BaseException) -> str:
    """An error's message on one line, without the AWS SDK's repeated detail."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI, with this process's storage settings. An S3 filesystem is made once
    per bucket (and settings): making one looks up the bucket's region, a request of its own."""
    scheme, _, rest = str(uri).partition("://")
    if scheme != "s3":
        return pafs.FileSystem.from_uri(str(uri))
    location, _, query = rest.partition("?")
    bucket = location.partition("/")[0]
    chosen = settings()
    key = (bucket, query, chosen)
    with _filesystems_lock:
        fs = _filesystems.get(key)
    if fs is None:
        plain, _ = pafs.FileSystem.from_uri(f"s3://{bucket}" + (f"?{query}" if query else ""))
        fs = SettledS3FileSystem(plain.__reduce__()[1][0], chosen)
        with _filesystems_lock:
            _filesystems[key] = fs
    return fs, location.rstrip("/") or location


class SettledS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with gram-ray's retry strategy and timeouts, kept when pickled (to a Ray Data
    task, a Train worker): pyarrow's own __reduce__ leaves the retry strategy out (apache/arrow GH-47348)."""

    def __init__(self, options: dict, chosen: StorageSettings) -> None:
        ours = ("retry_strategy", "connect_timeout", "request_timeout")
        options = {k: v for k, v in options.items() if k not in ours}
        strategy = (
            pafs.AwsDefaultS3RetryStrategy if chosen.retry_mode == "legacy" else pafs.AwsStandardS3RetryStrategy
        )(max_attempts=chosen.max_attempts)
        super().__init__(
            **options,
            retry_strategy=strategy,
            connect_timeout=chosen.connect_timeout_s,
            request_timeout=chosen.request_timeout_s,
        )
        self._options, self.settings = options, chosen

    def __reduce__(self):
        return (SettledS3FileSystem, (self._options, self.settings))


# Where storage is (not who may use it) and how hard to try: safe to hand to every worker of a job.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    *SETTINGS_ENV.values(),
)


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV variables set in this process, for a Ray runtime environment's env_vars."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def run_storage(path: str | Path) -> dict:
    """Ray Train's and Tune's RunConfig arguments for a storage path: a URI goes with a filesystem that gives Ray's
    own reads and writes (the checkpoint registry Ray Train's controller rewrites at every checkpoint, Tune's
    state) the storage settings and gram-ray's retries. Without them, Ray Train's controller ends the run on the
    first write of its registry that fails past the client's attempts (found with the fault layer: a 12 s blip)."""
    if not is_uri(path):
        return {"storage_path": str(path)}
    fs, inside = filesystem(str(path))
    return {"storage_path": inside, "storage_filesystem": pafs.PyFileSystem(PatientHandler(fs))}


def unwrapped(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem under a run_storage() one (large uploads go to it directly: the wrapper buffers writes)."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, PatientHandler):
        return fs.handler.fs
    return fs


class PatientHandler(pafs.FileSystemHandler):
    """A filesystem whose every operation is tried again on transient errors until the storage settings'
    outage_s (with_retries), for code that is not gram-ray's (Ray Train, Tune). A file written through it is
    gathered in memory and stored in one upload when closed: Ray writes small files (JSON state) this way."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        # Writes go through a twin that uploads in the calling thread: Ray Tune syncs through pyarrow's copy_files,
        # which calls this handler from pyarrow's I/O threads, and an upload that waited there for a background
        # write on the same pool deadlocked (found by the shared-storage sweep test).
        self._writer = (
            SettledS3FileSystem(fs._options | {"background_writes": False}, fs.settings)
            if isinstance(fs, SettledS3FileSystem)
            else fs
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, PatientHandler) and self.fs.equals(other.fs)

    def __reduce__(self):
        return (PatientHandler, (self.fs,))

    def _try(self, action: str, path: str, operation):
        return with_retries(action, f"{self.fs.type_name}://{path}", operation, remote=True)

    def get_type_name(self) -> str:
        return f"patient-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._try("looking up", ",".join(paths), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._try("listing", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._try("creating", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._try("deleting", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._try("deleting", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._try("deleting", "/", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._try("deleting", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._try("moving", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._try("copying", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._try("reading", path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path):
        return self._try("reading", path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        return pa.PythonFile(
            _GatheredUpload(lambda data: self._try("writing", path, lambda: _put(self._writer, path, data)))
        )

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("object storage has no appends")


class _GatheredUpload(io.RawIOBase):
    """A writable file that stores what was written in one upload when closed."""

    def __init__(self, store) -> None:
        self._buffer, self._store = io.BytesIO(), store

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buffer.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._store(self._buffer.getbuffer())
            finally:
                super().close()


def _put(fs: pafs.FileSystem, path: str, data) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)  # one write, then close: an error leaves the upload uncompleted, never a cut object


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; object storage with this process's settings."""
    if is_uri(path):
        return filesystem(str(path))
    return pafs.LocalFileSystem(), _resolved(path)


def join(base: str | Path, *parts: str) -> str:
    """base/part/...: posix joins for URIs (s3://bucket/a + b -> s3://bucket/a/b), pathlib for local paths."""
    if is_uri(base):
        return posixpath.join(str(base), *parts)
    return str(Path(base, *parts))


def absolute(path: str | Path) -> str:
    """URIs unchanged, local paths made absolute (Ray workers run in other working directories)."""
    return str(path) if is_uri(path) else _resolved(path)


def _resolved(path: str | Path) -> str:
    """An absolute local path; a symbolic link loop is the OSError it is (pathlib raises RuntimeError)."""
    try:
        return str(Path(path).resolve())
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def exists(path: str | Path) -> bool:
    return kind(path) != pafs.FileType.NotFound


def kind(path: str | Path) -> pafs.FileType:
    """File, Directory (a prefix with objects under it, in object storage) or NotFound, with the settings' retries;
    an OSError when storage cannot be reached or refuses."""

    def look():
        fs, p = resolve(path)
        return fs.get_file_info(p).type

    return with_retries("looking up", str(path), look)


def read_bytes(path: str | Path) -> bytes:
    def read():
        fs, p = resolve(path)
        with fs.open_input_stream(p) as f:
            return f.read()

    return with_retries("reading", str(path), read)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def read_table(path: str | Path, columns: list[str] | None = None):
    """A Parquet file (or a folder of them) as one Arrow table, read again whole if storage fails part way: a
    read is many ranged GETs, and the client's attempts cover each one alone."""
    import pyarrow.parquet as pq

    def read():
        fs, p = resolve(path)
        return pq.read_table(p, columns=columns, filesystem=fs)

    return with_retries("reading", str(path), read)


class CorruptFileError(ValueError):
    """A file that is there but does not hold what it should (cut off, or another file under its name)."""


def read_json(path: str | Path):
    """The JSON a file or object holds; a CorruptFileError naming it when it is not JSON."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}): was it cut off, or another file?"
        ) from None


def write_text(path: str | Path, text: str) -> None:
    write_bytes_with(path, lambda f: f.write(text.encode()))


def write_bytes_with(path: str | Path, write) -> None:
    """write(stream) into a new file at path (parent folders made as needed), whole or not at all.

    In object storage the bytes are gathered first and sent in one go: pyarrow's output stream completes the
    upload when it is closed, even by an exception (apache/arrow#40502), so writing into it directly would store
    whatever came before an error in write() as a whole object. Locally, the file is written beside and renamed.
    """
    if not is_uri(path):
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        partial = f"{p}.partial"
        try:
            with fs.open_output_stream(partial) as f:
                write(f)
            fs.move(partial, p)
        except BaseException:
            if fs.get_file_info(partial).type == pafs.FileType.File:
                fs.delete_file(partial)
            raise
        return
    buffer = io.BytesIO()
    write(buffer)
    put_bytes(path, buffer.getbuffer())


def put_bytes(path: str | Path, data) -> None:
    """Store data (bytes-like) as the object at path, with the storage settings' retries."""

    def put():
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        _put(fs, p, data)

    with_retries("writing", str(path), put)


def delete_file(path: str | Path) -> None:
    def delete():
        fs, p = resolve(path)
        if fs.get_file_info(p).type == pafs.FileType.File:
            fs.delete_file(p)

    with_retries("deleting", str(path), delete)


def delete_dir(path: str | Path) -> None:
    """Remove a folder and everything under it; nothing happens if it is not there."""

    def delete():
        fs, p = resolve(path)
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            fs.delete_dir(p)

    with_retries("deleting", str(path), delete)


def _files(path: str | Path, suffix: str) -> list[pafs.FileInfo]:
    def listing():
        fs, p = resolve(path)
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(p, recursive=False))

    infos = with_retries("listing", str(path), listing)
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)), key=lambda i: i.path
    )


def list_files(path: str | Path, suffix: str = "") -> list[str]:
    """Files directly in a folder whose names end with suffix, as paths (or URIs) that resolve() accepts."""
    return [join(path, info.base_name) for info in _files(path, suffix)]


def file_infos(path: str | Path) -> dict[str, pafs.FileInfo]:
    """{name: FileInfo (size, mtime)} of the files directly in a folder: one listing, one request on object
    storage."""
    return {info.base_name: info for info in _files(path, "")}


def list_names(path: str | Path) -> list[str]:
    """Names of the files directly in a folder (one listing)."""
    return list(file_infos(path))


def upload_dir(local: str | Path, dest: str | Path, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder's files to dest (a path or URI), replacing what is there under the same names. Files
    named in last go after all others, in that order (a manifest a reader trusts only once it is there)."""
    fs, p = resolve(dest)
    copy_files_to(Path(local), fs, p, last=last, target=str(dest))


def copy_files_to(local: Path, fs: pafs.FileSystem, dest: str, last: tuple[str, ...] = (), target: str = "") -> None:
    """Copy a local folder's files (subfolders' too) into dest on fs, one file at a time, each with the storage
    settings' retries; the files named in last go at the end, in that order."""
    remote = not isinstance(fs, pafs.LocalFileSystem)
    target = target or dest
    local = Path(local).resolve()
    names = sorted(f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file())
    names = [n for n in names if n not in last] + [n for n in last if n in names]
    for folder in sorted({posixpath.dirname(n) for n in names} | {""}):
        where = posixpath.join(dest, folder) if folder else dest
        with_retries("creating", target, lambda where=where: fs.create_dir(where, recursive=True), remote=remote)
    for name in names:
        with_retries(
            "uploading",
            posixpath.join(target, name),
            lambda name=name: _upload_file(local / name, fs, posixpath.join(dest, name)),
            remote=remote,
        )


def _upload_file(local: Path, fs: pafs.FileSystem, dest: str) -> None:
    """One local file into dest on fs, whole or not at all. Not pyarrow's copy_files: when a part of its upload
    fails past the client's attempts it returns as if done, the object never completed (pyarrow 26, found with
    the fault layer: the checkpoint's state.pt missing, the rest of the folder uploaded). The file goes in as one
    write of its memory map, so nothing (an exception, an interrupt) can come between two writes and have the
    stream's close complete a cut-off object (apache/arrow#40502); close's own error is raised."""
    with open(local, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        data = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            with fs.open_output_stream(dest) as out:
                out.write(data)
        finally:
            if size:
                data.close()


def total_bytes(path: str | Path, suffix: str = "") -> int:
    return sum(info.size for info in _files(path, suffix))
