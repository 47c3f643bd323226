"""Which filesystem a path or URI is on: local paths, and object storage with this process's settings (one S3
client per bucket and settings, kept when pickled to a Ray worker), and the environment that says where
storage is, forwarded to Ray's workers."""

from __future__ import annotations

import errno
import os
import posixpath
import threading
from pathlib import Path

import pyarrow.fs as pafs

from gram_ray.storage.storage_settings import SETTINGS_ENV, StorageSettings, on_configure, settings

__all__ = [
    "filesystem",
    "SettledS3FileSystem",
    "FORWARDED_ENV",
    "forwarded_env",
    "is_uri",
    "resolve",
    "join",
    "absolute",
]


_filesystems: dict = {}  # (URI's bucket and options, settings) -> filesystem: one client (and region lookup) each


_filesystems_lock = threading.Lock()


def _forget_filesystems() -> None:
    with _filesystems_lock:
        _filesystems.clear()


on_configure(_forget_filesystems)


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
