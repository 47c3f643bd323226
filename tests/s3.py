"""The local S3 server of the storage tests: gram_ray.bench.local_s3 (moto's server on 127.0.0.1, spoken to over
HTTP by pyarrow's S3FileSystem exactly as it speaks to AWS).

The session's environment points every S3 client at it (AWS_ENDPOINT_URL, set by conftest before any Ray starts,
so Ray's workers inherit it); the credentials are moto's dummies. Nothing in a test reaches a real bucket.
"""

from gram_ray.bench.local_s3 import LocalS3 as S3Server
from gram_ray.bench.local_s3 import point_s3_at

__all__ = ["S3Server", "point_s3_at"]
