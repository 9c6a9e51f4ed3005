"""Backups in S3 or an S3-compatible server (MinIO, SeaweedFS, Ceph, ...).

Artifacts live under ``s3://bucket/{prefix}/{environment}/``. A directory-format
backup is stored as one object per file below ``{key}/``. Credentials come only from
the standard AWS chain (environment variables, shared config, instance roles); this
package never sees, stores or logs them.

Integrity on upload: the file's SHA-256 (from the caller, who hashed the dump while it
streamed, or from one read here) is stored as ``x-amz-meta-sha256``; every part is sent
with its CRC32, which S3 checks against the bytes it received; afterwards ``head_object``
must report the size, the metadata and the composite CRC32 of what was sent. The manifest
is written by the caller only after this succeeds. Downloads stream into a temp file
while hashing and are checked against the manifest's SHA-256 before anything uses them.

``client`` holds the ``Storage`` backend and its configuration, ``transfer`` the
multipart uploader and the resumable downloader, ``errors`` the mapping of SDK exceptions
to one-line errors. boto3 and botocore are imported only when a client is made.
"""

from __future__ import annotations

from rollback_cli.storage.s3.client import (
    SDK_LOGGERS,
    SSE_ALIASES,
    RetryMode,
    S3Storage,
    quiet_sdk_logging,
    resolve_sse,
)
from rollback_cli.storage.s3.errors import is_connection_error, s3_errors
from rollback_cli.storage.s3.transfer import (
    DEFAULT_PART_SIZE,
    DELETE_BATCH,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    TARGET_MAX_PARTS,
    MiB,
    choose_part_size,
)

__all__ = [
    "DEFAULT_PART_SIZE",
    "DELETE_BATCH",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "SDK_LOGGERS",
    "SSE_ALIASES",
    "TARGET_MAX_PARTS",
    "MiB",
    "RetryMode",
    "S3Storage",
    "choose_part_size",
    "is_connection_error",
    "quiet_sdk_logging",
    "resolve_sse",
    "s3_errors",
]
