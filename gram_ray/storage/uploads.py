"""Unfinished multipart uploads: found and aborted.

A large object goes to S3 as a multipart upload (pyarrow: 10 MB parts and up), completed when the writer closes
it. A writer killed mid-upload (a spot node reclaimed, a SIGKILL) never completes it, and neither does one whose
part failed past its retries (pyarrow does not abort it): its parts stay in the bucket, invisible to listings and
billed, until the upload is aborted. gram-ray lists and aborts them under a prefix (`gram-ray storage uploads`),
and a resumed run does so under its own folder for the uploads begun before it started (every writer of that
folder then was the run that died). The bucket lifecycle rule AbortIncompleteMultipartUpload (docs/cluster.md)
does it for every prefix after a day.

pyarrow has no call for these, so this speaks S3's API through boto3, with the storage settings' attempts and
timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from gram_ray.storage.storage_settings import settings

__all__ = ["Upload", "unfinished_uploads", "abort_uploads"]


@dataclass(frozen=True)
class Upload:
    bucket: str
    key: str
    upload_id: str
    initiated: datetime
    parts: int
    bytes: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def _client():
    import boto3
    from botocore.config import Config

    chosen = settings()
    return boto3.client(
        "s3",
        config=Config(
            retries={"max_attempts": chosen.max_attempts, "mode": chosen.retry_mode},
            connect_timeout=chosen.connect_timeout_s,
            read_timeout=chosen.request_timeout_s,
        ),
    )


def _split(prefix_uri: str) -> tuple[str, str]:
    if not prefix_uri.startswith("s3://"):
        raise ValueError(
            f"{prefix_uri} is not an s3:// URI: multipart uploads are an S3 thing (local files and gs:// have none)"
        )
    bucket, _, prefix = prefix_uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{prefix_uri} names no bucket")
    return bucket, prefix


def unfinished_uploads(prefix_uri: str, begun_before: datetime | None = None) -> list[Upload]:
    """The multipart uploads begun under an s3:// prefix and not completed or aborted, oldest first, with their
    parts' sizes; begun_before: only those begun before then (a run's own start: anything newer may be a live
    writer's)."""
    bucket, prefix = _split(prefix_uri)
    client = _client()
    found = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Uploads", []):
            if begun_before is not None and item["Initiated"] >= begun_before:
                continue
            parts = [
                part
                for parts_page in client.get_paginator("list_parts").paginate(
                    Bucket=bucket, Key=item["Key"], UploadId=item["UploadId"]
                )
                for part in parts_page.get("Parts", [])
            ]
            found.append(
                Upload(
                    bucket, item["Key"], item["UploadId"], item["Initiated"], len(parts), sum(p["Size"] for p in parts)
                )
            )
    return sorted(found, key=lambda u: u.initiated)


def abort_uploads(uploads: list[Upload]) -> int:
    """Abort each upload (its parts are deleted); returns the bytes freed. One already gone counts as done."""
    from botocore.exceptions import ClientError

    client = _client()
    freed = 0
    for upload in uploads:
        try:
            client.abort_multipart_upload(Bucket=upload.bucket, Key=upload.key, UploadId=upload.upload_id)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
        freed += upload.bytes
    return freed


def abort_orphans_of_a_dead_run(prefix_uri: str, started: datetime, log=print) -> None:
    """At the start of a run that continues another under prefix_uri (--resume, a preprocessing run redoing what
    a killed one left): abort the uploads begun there before this run started, saying what was freed. Storage
    that is not S3 has none; a failure here is reported and the run goes on (the lifecycle rule catches them)."""
    if not prefix_uri.startswith("s3://"):
        return
    try:
        orphans = unfinished_uploads(prefix_uri, begun_before=started)
        if orphans:
            freed = abort_uploads(orphans)
            log(
                f"aborted {len(orphans)} unfinished upload(s) a killed run left under {prefix_uri} "
                f"({freed / 1e6:.1f} MB of parts)"
            )
    except Exception as e:  # noqa: BLE001 (cleaning up is a courtesy: never the reason a run fails)
        log(f"could not check {prefix_uri} for unfinished uploads ({e}); the bucket's lifecycle rule will abort them")


def now() -> datetime:
    return datetime.now(timezone.utc)
