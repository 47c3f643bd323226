"""A local S3 server for benchmarks and tests: moto's server on 127.0.0.1 (moto is a dev dependency), spoken to
over HTTP by pyarrow's S3FileSystem exactly as it speaks to AWS (same client, same code path).

point_s3_at(port) makes this process's S3 clients (and those of every process it starts afterwards, Ray's workers
among them) go to it, with moto's dummy credentials. The server logs one line per request, so a benchmark can
count what a job asked of storage (`requests()`). It runs in its own process group, stopped by its process id.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from gram_ray import storage
from gram_ray.cluster.processes import stop_group, wait_until_up

__all__ = ["LocalS3", "point_s3_at"]

# werkzeug's request line; statuses other than 200 (206 for a ranged read, 404) come wrapped in ANSI colours
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/')


def point_s3_at(port: int) -> None:
    """This process's (and its children's) S3 clients go to 127.0.0.1:port, with moto's dummy credentials."""
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        os.environ.pop(name, None)


class LocalS3:
    """moto's server, in its own process group (stopped by its process id, nothing else)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.endpoint, self.log_path = port, f"http://127.0.0.1:{port}", Path(log)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait_until_up(self.process, lambda: urllib.request.urlopen(self.endpoint, timeout=1).close(), 60, 0.2):
            self._log.close()
            raise RuntimeError(f"the local S3 server did not start on port {port}; see {log}")

    def bucket(self, prefix: str = "gram") -> str:
        """A new, empty bucket: its s3:// URI."""
        import pyarrow.fs as pafs

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
        fs.create_dir(name)
        return f"s3://{name}"

    def requests(self, under: str | None = None) -> Counter:
        """The requests the server has answered so far, by method; under: only those about this s3:// prefix
        (its objects, or listings of it)."""
        self._log.flush()
        bucket, _, prefix = (under or "").removeprefix("s3://").partition("/")
        counts: Counter = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _REQUEST.search(line)
            if match is None:
                continue
            method, target = match.groups()
            path, _, query = target.partition("?")
            if under is not None:
                key = path.lstrip("/")
                in_prefix = key.startswith(f"{bucket}/{prefix}") or (
                    key.rstrip("/") == bucket and f"prefix={prefix.split('/')[0]}" in query
                )
                if not in_prefix:
                    continue
            counts[method] += 1
        return counts

    def upload_dataset(self, paths: dict) -> dict:
        """A dataset written by gram_ray.data.synthetic.generate, copied into a fresh bucket: the same keys
        ("train", "val", "videos", "audios", ...), as URIs."""
        root = Path(paths["videos"]).parent
        bucket = self.bucket()
        storage.upload_dir(root, f"{bucket}/data")
        return {key: f"{bucket}/data/{Path(path).relative_to(root)}" for key, path in paths.items()}

    @staticmethod
    def bucket_of(dataset: dict) -> str:
        """The s3://bucket a dataset from upload_dataset was copied into."""
        return "/".join(dataset["val"].split("/")[:3])

    def stop(self) -> None:
        stop_group(self.process, grace_s=10)
        self._log.close()
