"""A local S3 server for the storage tests: moto's server on 127.0.0.1, spoken to over HTTP by pyarrow's
S3FileSystem exactly as it speaks to AWS (same client, same code path).

The session's environment points every S3 client at it (AWS_ENDPOINT_URL, set by conftest before any Ray starts,
so Ray's workers inherit it); the credentials are moto's dummies. Nothing in a test reaches a real bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from gram_ray import storage
from gram_ray.cluster.processes import stop_group, wait_until_up


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


class S3Server:
    """moto's server, in its own process group (stopped by its process id, nothing else)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.endpoint = port, f"http://127.0.0.1:{port}"
        self._log = log.open("wb")
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

    def upload_dataset(self, paths: dict) -> dict:
        """A dataset written by gram_ray.data.synthetic.generate, copied into a fresh bucket: the same keys
        ("train", "val", "videos", "audios"), as URIs."""
        root = Path(paths["videos"]).parent
        bucket = self.bucket()
        storage.upload_dir(root, f"{bucket}/data")
        return {key: f"{bucket}/data/{Path(path).relative_to(root)}" for key, path in paths.items()}

    def stop(self) -> None:
        stop_group(self.process, grace_s=10)
        self._log.close()
