"""Moving artifacts in and out of a bucket: the multipart uploader and the resumable downloader.

Uploads send each part with its CRC32 (at most ``max_concurrency`` parts in memory) and
then compare S3's size, sha256 metadata and composite CRC32 with what was sent. Downloads
stream into a temp file while hashing, resume with a ranged GET pinned to the ETag when
the stream breaks, and move the file into place only once its SHA-256 matches. Every call
here may raise botocore exceptions: callers wrap them in ``errors.s3_errors``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rollback_cli.errors import BackupError, ConfigError
from rollback_cli.files import TEMP_PREFIX
from rollback_cli.log import get_logger
from rollback_cli.storage.base import CHUNK_SIZE, sha256_file, sha256_tree
from rollback_cli.storage.s3.errors import is_connection_error

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
DEFAULT_PART_SIZE = 8 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
# S3 allows 10,000 parts; aiming lower leaves room so the transfer library never has
# to adjust the part size behind our back (our composite checksum depends on it).
TARGET_MAX_PARTS = 9000
DELETE_BATCH = 1000


def choose_part_size(size: int, minimum: int = DEFAULT_PART_SIZE) -> int:
    """A part size (whole MiB) that fits ``size`` bytes in at most 9,000 parts."""
    needed = math.ceil(size / TARGET_MAX_PARTS / MiB) * MiB
    return min(max(minimum, MIN_PART_SIZE, needed), MAX_PART_SIZE)


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _crc32_b64(value: int) -> str:
    return b64(value.to_bytes(4, "big"))


def _read_part(handle: BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining and (chunk := handle.read(remaining)):
        parts.append(chunk)
        remaining -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass(frozen=True)
class Bucket:
    """One bucket through a boto3 client (typed by mypy-boto3-s3, not a dependency)."""

    client: Any
    name: str

    def head(self, object_key: str, *, checksums: bool = False) -> dict[str, Any] | None:
        """The object's metadata, or None when there is no such object."""
        from botocore.exceptions import ClientError

        extra = {"ChecksumMode": "ENABLED"} if checksums else {}
        try:
            head: dict[str, Any] = self.client.head_object(
                Bucket=self.name, Key=object_key, **extra
            )
        except ClientError as exc:
            # HEAD has no body: a missing bucket is a bare 404 as well; the caller's
            # next listing call reports NoSuchBucket properly.
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return None
            if status in (400, 403):
                # HEAD answers have no body, so no error code: ask again with a request
                # whose error says why (bad signature, unknown key, denied).
                self.client.list_objects_v2(Bucket=self.name, Prefix=object_key, MaxKeys=1)
            raise
        return head

    def objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object below ``prefix``, except "folder" placeholders."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield item

    def delete(self, object_keys: list[str]) -> None:
        for start in range(0, len(object_keys), DELETE_BATCH):
            batch = object_keys[start : start + DELETE_BATCH]
            response = self.client.delete_objects(
                Bucket=self.name,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise ConfigError(
                    f"S3 could not delete {len(errors)} object(s) such as "
                    f"s3://{self.name}/{first.get('Key')}: {first.get('Code')}"
                )


# -- upload -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What one file upload sent, to be compared with what S3 reports."""

    object_key: str
    size: int
    sha256: str
    crc32: str  # S3's ChecksumCRC32: whole object, or composite "...-N" for multipart


@dataclass(frozen=True)
class UploadPlan:
    """The files of one artifact, each as (local path, object key, sha256), and the part
    size they are sent in."""

    object_key: str
    files: list[tuple[Path, str, str]]
    part_size: int
    is_dir: bool


def plan_upload(
    source: Path, object_key: str, sha256: str | None, min_part_size: int
) -> UploadPlan:
    """Hash what needs hashing before the first byte is sent (the hash is metadata).

    ``sha256`` is ``sha256_artifact(source)`` when the caller knows it: a file's is used
    as is, a directory's is checked against the files about to be sent.
    """
    if not source.is_dir():
        part_size = choose_part_size(source.stat().st_size, min_part_size)
        files = [(source, object_key, sha256 or sha256_file(source))]
        return UploadPlan(object_key, files, part_size, is_dir=False)
    paths = sorted(p for p in source.rglob("*") if p.is_file())
    part_size = choose_part_size(max((p.stat().st_size for p in paths), default=0), min_part_size)
    files = [
        (path, f"{object_key}/{path.relative_to(source).as_posix()}", sha256_file(path))
        for path in paths
    ]
    if sha256 is not None and sha256_tree(source) != sha256:
        raise BackupError(f"{source} does not match its recorded checksum; not uploading")
    return UploadPlan(object_key, files, part_size, is_dir=True)


@dataclass(frozen=True)
class Uploader:
    """Sends planned files: a single PUT below the part size, else a multipart upload with
    at most ``max_concurrency`` parts in flight; then checks what S3 stored."""

    bucket: Bucket
    #: server-side encryption and storage class of artifacts (``ServerSideEncryption``...)
    put_args: dict[str, Any]
    max_concurrency: int

    def send(self, plan: UploadPlan) -> list[Sent]:
        """Upload and verify every file; on failure remove what was sent, if S3 is still
        reachable. A directory's objects that are not part of it any more are removed."""
        sent: list[Sent] = []
        try:
            for path, object_key, sha256 in plan.files:
                sent.append(self._upload_file(path, object_key, sha256, plan.part_size))
                self._verify(path, sent[-1])
            if plan.is_dir:
                keep = {s.object_key for s in sent}
                below = self.bucket.objects(plan.object_key + "/")
                self.bucket.delete([i["Key"] for i in below if i["Key"] not in keep])
        except BaseException as exc:
            if not is_connection_error(exc):
                self._discard([object_key for _, object_key, _ in plan.files])
            raise
        return sent

    def _upload_file(self, path: Path, object_key: str, sha256: str, part_size: int) -> Sent:
        extra = {**self.put_args, "Metadata": {"sha256": sha256}}
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size >= part_size:
                return self._multipart(handle, object_key, sha256, part_size, extra)
            data = _read_part(handle, size)
        crc = _crc32_b64(zlib.crc32(data))
        self.bucket.client.put_object(
            Bucket=self.bucket.name, Key=object_key, Body=data, ChecksumCRC32=crc, **extra
        )
        return Sent(object_key, len(data), sha256, crc)

    def _multipart(
        self,
        handle: BinaryIO,
        object_key: str,
        sha256: str,
        part_size: int,
        extra: dict[str, Any],
    ) -> Sent:
        client, bucket = self.bucket.client, self.bucket.name
        created = client.create_multipart_upload(
            Bucket=bucket, Key=object_key, ChecksumAlgorithm="CRC32", **extra
        )
        upload_id = str(created["UploadId"])
        try:
            parts, size = self._send_parts(handle, object_key, upload_id, part_size)
            client.complete_multipart_upload(
                Bucket=bucket, Key=object_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Best effort (the server may be gone); cleanup-artifacts aborts what is left.
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=object_key, UploadId=upload_id)
            raise
        return Sent(object_key, size, sha256, composite_crc32(parts))

    def _send_parts(
        self, handle: BinaryIO, object_key: str, upload_id: str, part_size: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Send the parts of an open multipart upload; return them in order, and the size."""
        parts: dict[int, dict[str, Any]] = {}
        size = 0

        def send(number: int, data: bytes) -> None:
            parts[number] = upload_part(self.bucket, object_key, upload_id, number, data)

        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-part") as pool:
            pending: set[Future[None]] = set()
            number = 0
            while data := _read_part(handle, part_size):
                number += 1
                size += len(data)
                pending.add(pool.submit(send, number, data))
                del data
                if len(pending) >= self.max_concurrency:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
            for future in pending:
                future.result()
        return [parts[n] for n in sorted(parts)], size

    def _verify(self, path: Path, sent: Sent) -> None:
        verify_stored(self.bucket, str(path), sent, sha256_metadata=True)

    def _discard(self, object_keys: list[str]) -> None:
        """Best effort: remove what a failed upload left (the server may be gone)."""
        with contextlib.suppress(Exception):
            self.bucket.delete(object_keys)


def upload_part(
    bucket: Bucket, object_key: str, upload_id: str, number: int, data: bytes
) -> dict[str, Any]:
    """Send one part of a multipart upload with its CRC32 (S3 checks it on receipt)."""
    # zlib releases the GIL on large buffers: parts are checksummed in parallel.
    crc = _crc32_b64(zlib.crc32(data))
    response = bucket.client.upload_part(
        Bucket=bucket.name,
        Key=object_key,
        UploadId=upload_id,
        PartNumber=number,
        Body=data,
        ChecksumCRC32=crc,
    )
    return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc}


def composite_crc32(parts: list[dict[str, Any]]) -> str:
    """S3's checksum of a multipart object: the CRC32 of the parts' CRC32s, and their count."""
    composite = zlib.crc32(b"".join(base64.b64decode(p["ChecksumCRC32"]) for p in parts))
    return f"{_crc32_b64(composite)}-{len(parts)}"


def verify_stored(bucket: Bucket, source: str, sent: Sent, *, sha256_metadata: bool) -> None:
    """Check what S3 stored against what was sent: size, CRC32, the sha256 metadata."""
    head = bucket.head(sent.object_key, checksums=True)
    problems = []
    if head is None:
        problems.append("the object is missing after upload")
    else:
        if int(head["ContentLength"]) != sent.size:
            problems.append(f"size {head['ContentLength']} instead of {sent.size}")
        if sha256_metadata and head.get("Metadata", {}).get("sha256") != sent.sha256:
            problems.append("sha256 metadata differs")
        stored = head.get("ChecksumCRC32")
        if stored is not None and stored != sent.crc32:
            problems.append(f"the server's CRC32 checksum {stored} differs from {sent.crc32}")
    if problems:
        raise BackupError(
            f"upload of {source} to s3://{bucket.name}/{sent.object_key} failed "
            f"verification: {'; '.join(problems)}"
        )


class StreamingUpload:
    """A multipart upload fed while the artifact is still being written (pg_dump's output):
    parts are sent as they fill, at most ``max_concurrency`` in flight (the writer waits:
    memory stays at about that many parts), each with its CRC32. :meth:`finish` completes
    the upload and checks S3's size and composite CRC32; :meth:`abort` discards it.

    The object's SHA-256 is not known when the upload starts, so it carries no sha256
    metadata: its manifest, written afterwards, holds the SHA-256 every download checks.
    Parts grow as the artifact does (16 MiB, doubling every 1,000 parts), so an artifact of
    any size fits in S3's 10,000 parts.
    """

    def __init__(
        self,
        bucket: Bucket,
        object_key: str,
        put_args: dict[str, Any],
        part_size: int,
        max_concurrency: int,
    ) -> None:
        self.bucket, self.object_key = bucket, object_key
        self.part_size = max(part_size, 2 * DEFAULT_PART_SIZE)
        self.max_concurrency = max(1, max_concurrency)
        created = bucket.client.create_multipart_upload(
            Bucket=bucket.name,
            Key=object_key,
            ChecksumAlgorithm="CRC32",
            **{**put_args, "Metadata": {"checksum": "sha256 in the manifest"}},
        )
        self.upload_id = str(created["UploadId"])
        self.size = 0
        self._buffer = bytearray()
        self._number = 0
        self._parts: dict[int, dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-stream")
        self._pending: set[Future[None]] = set()

    def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        self.size += len(chunk)
        while len(self._buffer) >= self.part_size:
            data = bytes(self._buffer[: self.part_size])
            del self._buffer[: self.part_size]
            self._submit(data)

    def _submit(self, data: bytes) -> None:
        self._number += 1
        number = self._number
        if number % 1000 == 0:
            self.part_size = min(self.part_size * 2, MAX_PART_SIZE)

        def send() -> None:
            self._parts[number] = upload_part(
                self.bucket, self.object_key, self.upload_id, number, data
            )

        self._pending.add(self._pool.submit(send))
        if len(self._pending) >= self.max_concurrency:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()

    def finish(self) -> Sent:
        """Send what is left, complete the upload, check what S3 stored."""
        if self._buffer or self._number == 0:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        for future in self._pending:
            future.result()
        self._pending.clear()
        self._pool.shutdown()
        parts = [self._parts[n] for n in sorted(self._parts)]
        self.bucket.client.complete_multipart_upload(
            Bucket=self.bucket.name,
            Key=self.object_key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )
        sent = Sent(self.object_key, self.size, "", composite_crc32(parts))
        verify_stored(self.bucket, "the streamed dump", sent, sha256_metadata=False)
        return sent

    def abort(self) -> None:
        """Best effort (the server may be gone); cleanup-artifacts aborts what is left."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.bucket.client.abort_multipart_upload(
                Bucket=self.bucket.name, Key=self.object_key, UploadId=self.upload_id
            )
        with contextlib.suppress(Exception):
            self.bucket.delete([self.object_key])


# -- download -----------------------------------------------------------------------


@dataclass(frozen=True)
class Downloader:
    """Streams objects into temp files, resuming broken streams up to ``max_attempts``
    times, and moves them into place only once their SHA-256 matches."""

    bucket: Bucket
    max_attempts: int

    def file(
        self, object_key: str, destination: Path, head: dict[str, Any], sha256: str | None
    ) -> None:
        """Fetch one object; ``head`` is its metadata (its ETag pins the version read),
        ``sha256`` overrides the object's sha256 metadata as the expected checksum."""
        expected = sha256 or head.get("Metadata", {}).get("sha256")
        fd, temp_name = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{destination.name}.", dir=destination.parent
        )
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = self._stream(object_key, out, str(head["ETag"]))
            if expected is not None and actual != expected:
                raise BackupError(
                    f"s3://{self.bucket.name}/{object_key} does not match its checksum "
                    f"(expected sha256 {expected[:12]}…, got {actual[:12]}…)"
                )
            temp.replace(destination)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def tree(
        self,
        object_key: str,
        items: list[dict[str, Any]],
        destination: Path,
        sha256: str | None,
        *,
        uri: str,
    ) -> None:
        """Fetch a directory artifact (``items``: the objects below ``object_key``) into a
        temp directory, check it as a whole against ``sha256``, then move it into place.
        ``uri`` names the artifact in error messages."""
        if destination.exists():
            raise FileExistsError(destination)
        temp = Path(
            tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{destination.name}.", dir=destination.parent)
        )
        try:
            for item in items:
                relative = item["Key"][len(object_key) + 1 :]
                target = (temp / relative).resolve()
                if temp.resolve() not in target.parents:
                    raise BackupError(f"object name {item['Key']!r} escapes its backup")
                target.parent.mkdir(parents=True, exist_ok=True)
                item_head = self.bucket.head(item["Key"])
                if item_head is None:
                    raise BackupError(f"{uri} changed while it was downloaded")
                self.file(item["Key"], target, item_head, None)
            if sha256 is not None and sha256_tree(temp) != sha256:
                raise BackupError(f"{uri} does not match its recorded checksum")
            temp.replace(destination)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def _stream(self, object_key: str, out: BinaryIO, etag: str) -> str:
        """Copy the object into ``out``; resume with a ranged GET if the stream breaks.
        Returns the SHA-256 of what was written."""
        from botocore import exceptions as bex

        digest = hashlib.sha256()
        written, total, failures = 0, -1, 0
        while True:
            # If-Match pins the version whose metadata the caller read.
            request: dict[str, Any] = {
                "Bucket": self.bucket.name,
                "Key": object_key,
                "IfMatch": etag,
            }
            if written:
                request["Range"] = f"bytes={written}-"
            response = self.bucket.client.get_object(**request)
            if total < 0:
                total = int(response["ContentLength"])
            body = response["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK_SIZE):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
            except (bex.ReadTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError):
                failures += 1
                if failures >= self.max_attempts:
                    raise
                get_logger().warning("s3.download_resumed", key=object_key, offset=written)
                continue
            finally:
                body.close()
            if written >= total:
                return digest.hexdigest()
            failures += 1
            if failures >= self.max_attempts:
                raise ConfigError(f"S3 sent {written} of {total} bytes of {object_key}")
