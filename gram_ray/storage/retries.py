"""Riding out storage faults: an operation is tried again on a transient error until the settings' outage_s
have passed, then ends as a StorageError naming the object; a failure inside code that retries on its own (Ray
Data's reads) is named the same way."""

from __future__ import annotations

import os
import re
import sys
import threading
import time

from gram_ray.storage.filesystems import is_uri
from gram_ray.storage.storage_settings import on_configure, settings

__all__ = [
    "StorageError",
    "with_retries",
    "failure_in",
    "is_transient",
]


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
on_configure(_gave_up.clear)


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


# Ray Data's last line after its own read retries (gram_ray/private_uses.py lists it).
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
