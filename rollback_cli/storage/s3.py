"""Backups in S3 or an S3-compatible server (MinIO, SeaweedFS, Ceph, ...).

Artifacts live under ``s3://bucket/{prefix}/{environment}/``. A directory-format
backup is stored as one object per file below ``{key}/``. Credentials come only from
the standard AWS chain (environment variables, shared config, instance roles); this
module never sees, stores or logs them.

Integrity on upload: the file's SHA-256 (from the caller, who hashed the dump while it
streamed, or from one read here) is stored as ``x-amz-meta-sha256``; every part is sent
with its CRC32, which S3 checks against the bytes it received; afterwards ``head_object``
must report the size, the metadata and the composite CRC32 of what was sent. The manifest
is written by the caller only after this succeeds. Downloads stream into a temp file
while hashing and are checked against the manifest's SHA-256 before anything uses them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal
from urllib.parse import unquote, urlsplit

import structlog

from rollback_cli.errors import BackupError, ConfigError, UsageError
from rollback_cli.storage.base import (
    CHUNK_SIZE,
    Storage,
    StoredObject,
    join_key,
    sha256_file,
    sha256_tree,
)

if TYPE_CHECKING:
    from rollback_cli.settings import Settings

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
DEFAULT_PART_SIZE = 8 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
# S3 allows 10,000 parts; aiming lower leaves room so the transfer library never has
# to adjust the part size behind our back (our composite checksum depends on it).
TARGET_MAX_PARTS = 9000
DELETE_BATCH = 1000
SDK_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")
SSE_ALIASES = {"aes256": "AES256", "aws:kms": "aws:kms", "kms": "aws:kms"}
RetryMode = Literal["standard", "adaptive", "legacy"]


def choose_part_size(size: int, minimum: int = DEFAULT_PART_SIZE) -> int:
    """A part size (whole MiB) that fits ``size`` bytes in at most 9,000 parts."""
    needed = math.ceil(size / TARGET_MAX_PARTS / MiB) * MiB
    return min(max(minimum, MIN_PART_SIZE, needed), MAX_PART_SIZE)


def quiet_sdk_logging(log_level: str) -> None:
    """Keep boto3/botocore chatter out of the logs unless the user asked for debug."""
    level = logging.NOTSET if log_level.lower() == "debug" else logging.WARNING
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(level)


def resolve_sse(sse: str | None, kms_key_id: str | None) -> tuple[str | None, str | None]:
    """Normalise the server-side encryption settings; a KMS key id implies aws:kms."""
    if not sse:
        return ("aws:kms", kms_key_id) if kms_key_id else (None, None)
    mode = SSE_ALIASES.get(sse.lower())
    if mode is None:
        raise UsageError(f"unknown S3 server-side encryption {sse!r}: use AES256 or aws:kms")
    if mode == "AES256" and kms_key_id:
        raise UsageError("a KMS key id needs server-side encryption aws:kms, not AES256")
    return mode, kms_key_id


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


@dataclass(frozen=True)
class _Sent:
    """What one file upload sent, to be compared with what S3 reports."""

    object_key: str
    size: int
    sha256: str
    crc32: str  # S3's ChecksumCRC32: whole object, or composite "...-N" for multipart


def _crc32_b64(value: int) -> str:
    return _b64(value.to_bytes(4, "big"))


def _read_part(handle: BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining and (chunk := handle.read(remaining)):
        parts.append(chunk)
        remaining -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class S3Storage(Storage):
    """Artifacts under ``s3://{bucket}/{prefix}/``.

    ``prefix`` is the complete key prefix (``from_settings`` appends the environment).
    ``part_size`` overrides the 8 MiB minimum part size (tests use 5 MiB); larger files
    still get bigger parts so they fit in S3's 10,000-part limit.
    """

    location = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        sse: str | None = None,
        kms_key_id: str | None = None,
        storage_class: str | None = None,
        part_size: int | None = None,
        max_concurrency: int = 8,
        max_attempts: int = 5,
        retry_mode: RetryMode = "standard",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._sse, self._kms_key_id = resolve_sse(sse, kms_key_id)
        self._storage_class = storage_class.upper() if storage_class else None
        self._min_part_size = max(part_size or DEFAULT_PART_SIZE, MIN_PART_SIZE)
        self._max_concurrency = max(1, max_concurrency)
        self._max_attempts = max(1, max_attempts)
        custom_endpoint = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or (os.environ.get("AWS_ENDPOINT_URL"))
        )
        config = Config(
            retries={"mode": retry_mode, "max_attempts": self._max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=self._max_concurrency + 2,
            # S3-compatible servers rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
        )
        session = boto3.session.Session()
        self.endpoint = _redact_url(custom_endpoint or "https://s3.amazonaws.com")
        with self._errors("setup"):
            _register_credentials(session)
            # The client type comes from mypy-boto3-s3, which is not a dependency.
            self._client: Any = session.client(
                "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
            )
        self.endpoint = _redact_url(str(self._client.meta.endpoint_url))

    @classmethod
    def from_settings(
        cls, target: str, settings: Settings, *, append_environment: bool = True
    ) -> S3Storage:
        """Open ``s3://bucket/prefix``; objects live under ``{prefix}/{environment}/``."""
        parts = urlsplit(target)
        if parts.scheme != "s3" or not parts.netloc:
            raise UsageError("S3 storage must look like s3://bucket/prefix")
        if "@" in parts.netloc:
            # Never echo the URL: whatever precedes "@" may be a secret.
            raise UsageError("S3 storage URLs take no credentials; use the AWS credential chain")
        quiet_sdk_logging(settings.log_level)
        return cls(
            parts.netloc,
            join_key(unquote(parts.path), settings.environment if append_environment else ""),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            sse=settings.s3_sse,
            kms_key_id=settings.s3_kms_key_id,
            storage_class=settings.s3_storage_class,
            max_attempts=_env_int("AWS_MAX_ATTEMPTS", 5),
            retry_mode=_retry_mode(os.environ.get("AWS_RETRY_MODE")),
        )

    # -- names ---------------------------------------------------------------------

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{join_key(self.prefix, key)}"

    def _object_key(self, key: str) -> str:
        name = key.strip("/")
        if not name or any(part in ("", ".", "..") for part in name.split("/")):
            raise ConfigError(f"backup name {key!r} is not a valid storage key")
        return join_key(self.prefix, name)

    def _relative(self, object_key: str) -> str:
        return object_key[len(self.prefix) + 1 :] if self.prefix else object_key

    # -- errors --------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SDK exceptions into one-line ConfigErrors; they never carry credentials."""
        from botocore import exceptions as bex

        where = f"(endpoint {self.endpoint})"
        try:
            try:
                yield
            except (bex.BotoCoreError, bex.ClientError):
                # Users see the one-line error below; the trace is for --log-level debug.
                log.debug("s3 request failed", action=action, exc_info=True)
                raise
        except bex.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "")) or "unknown"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = " ".join(str(error.get("Message", "")).split())
            if code == "NoSuchBucket":
                raise ConfigError(f"S3 bucket '{self.bucket}' does not exist {where}") from exc
            if code == "InvalidAccessKeyId":
                raise ConfigError(
                    f"S3 does not recognise the access key id {where}",
                    hint="check AWS_ACCESS_KEY_ID or AWS_PROFILE",
                ) from exc
            if code == "SignatureDoesNotMatch":
                raise ConfigError(
                    f"S3 rejected the request signature {where}",
                    hint="the secret access key does not match the access key id",
                ) from exc
            if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem", "403"):
                raise ConfigError(
                    f"access denied to S3 bucket '{self.bucket}' during {action} {where}",
                    hint="check the credentials and their permissions on the bucket",
                ) from exc
            if code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
                raise ConfigError(
                    f"S3 bucket '{self.bucket}' is in another region {where}",
                    hint="set --s3-region or AWS_REGION",
                ) from exc
            if code == "PreconditionFailed":
                raise BackupError(f"an object changed while it was read during {action}") from exc
            if code == "InvalidBucketName":
                raise ConfigError(f"'{self.bucket}' is not a valid S3 bucket name") from exc
            detail = f"{code}: {message}" if message else f"{code} (HTTP {status})"
            raise ConfigError(f"S3 {action} failed {where}: {detail}") from exc
        except (bex.NoCredentialsError, bex.PartialCredentialsError) as exc:
            raise ConfigError(
                "no usable AWS credentials found",
                hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            ) from exc
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError) as exc:
            raise ConfigError(f"cannot connect to the S3 endpoint {self.endpoint}") from exc
        except (
            bex.ReadTimeoutError,
            bex.ConnectionClosedError,
            bex.ResponseStreamingError,
            bex.IncompleteReadError,
            bex.ConnectionError,
        ) as exc:
            raise ConfigError(
                f"lost the connection to the S3 endpoint {self.endpoint} during {action}"
            ) from exc
        except bex.FlexibleChecksumError as exc:
            raise BackupError(
                f"S3 returned data that fails its own checksum during {action}"
            ) from exc
        except bex.BotoCoreError as exc:
            raise ConfigError(f"S3 {action} failed {where}: {exc}") from exc

    # -- listing -------------------------------------------------------------------

    def _iter_objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # skip "folder" placeholder objects
                    yield item

    def list_objects(self) -> list[StoredObject]:
        files: dict[str, StoredObject] = {}
        dirs: dict[str, StoredObject] = {}
        root = self.prefix + "/" if self.prefix else ""
        with self._errors("listing"):
            for item in self._iter_objects(root):
                name, sep, _ = self._relative(item["Key"]).partition("/")
                modified = _utc(item["LastModified"])
                if not sep:
                    files[name] = StoredObject(name, int(item["Size"]), modified)
                    continue
                seen = dirs.get(name)
                dirs[name] = StoredObject(
                    name,
                    int(item["Size"]) + (seen.size if seen else 0),
                    max(modified, seen.modified) if seen else modified,
                    is_dir=True,
                )
        merged = {**dirs, **files}
        return [merged[name] for name in sorted(merged)]

    def stat(self, key: str) -> StoredObject | None:
        object_key = self._object_key(key)
        with self._errors("stat"):
            head = self._head(object_key)
            if head is not None:
                return StoredObject(key, int(head["ContentLength"]), _utc(head["LastModified"]))
            total, newest = 0, None
            for item in self._iter_objects(object_key + "/"):
                total += int(item["Size"])
                modified = _utc(item["LastModified"])
                newest = modified if newest is None else max(newest, modified)
        if newest is None:
            return None
        return StoredObject(key, total, newest, is_dir=True)

    def _head(self, object_key: str, *, checksums: bool = False) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        extra = {"ChecksumMode": "ENABLED"} if checksums else {}
        try:
            head: dict[str, Any] = self._client.head_object(
                Bucket=self.bucket, Key=object_key, **extra
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
                self._client.list_objects_v2(Bucket=self.bucket, Prefix=object_key, MaxKeys=1)
            raise
        return head

    # -- upload --------------------------------------------------------------------

    def _put_args(self, *, artifact: bool) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self._sse:
            args["ServerSideEncryption"] = self._sse
        if self._kms_key_id:
            args["SSEKMSKeyId"] = self._kms_key_id
        # Manifests stay in the default class: an archive class would make them
        # unreadable without a restore request.
        if artifact and self._storage_class:
            args["StorageClass"] = self._storage_class
        return args

    def upload(self, source: Path, key: str, *, sha256: str | None = None) -> None:
        """Upload a file or a directory; ``sha256`` is ``sha256_artifact(source)``.

        A file's SHA-256 is stored as object metadata, so it must be known before the first
        byte is sent: the caller's (``backup create`` hashes the dump while it streams) or
        one read of the file here. The upload then reads the file once more, in parts,
        with a bounded pool sending them: memory stays at about ``max_concurrency`` parts
        whatever the file size. Each part carries a CRC32 that S3 checks on receipt, and
        afterwards S3's size, metadata and composite CRC32 must match what was sent.
        """
        object_key = self._object_key(key)
        started = time.monotonic()
        if source.is_dir():
            paths = sorted(p for p in source.rglob("*") if p.is_file())
            part_size = choose_part_size(
                max((p.stat().st_size for p in paths), default=0), self._min_part_size
            )
            targets = [
                (path, f"{object_key}/{path.relative_to(source).as_posix()}", sha256_file(path))
                for path in paths
            ]
            if sha256 is not None and sha256_tree(source) != sha256:
                raise BackupError(f"{source} does not match its recorded checksum; not uploading")
        else:
            part_size = choose_part_size(source.stat().st_size, self._min_part_size)
            targets = [(source, object_key, sha256 or sha256_file(source))]
        sent: list[_Sent] = []
        with self._errors("upload"):
            try:
                for path, target_key, file_sha256 in targets:
                    sent.append(self._upload_file(path, target_key, file_sha256, part_size))
                    self._verify(path, sent[-1])
                if source.is_dir():
                    self._delete_stale(object_key, {s.object_key for s in sent})
            except BaseException as exc:
                if not _is_connection_error(exc):
                    self._discard([target_key for _, target_key, _ in targets])
                raise
        seconds = time.monotonic() - started
        size = sum(s.size for s in sent)
        log.info(
            "s3 upload",
            uri=self.uri(key),
            bytes=size,
            files=len(sent),
            part_size=part_size,
            seconds=round(seconds, 3),
            mib_per_s=round(size / MiB / seconds, 1) if seconds else None,
        )

    def _upload_file(self, path: Path, object_key: str, sha256: str, part_size: int) -> _Sent:
        """Send one file: a single PUT below ``part_size``, else a multipart upload."""
        extra = {**self._put_args(artifact=True), "Metadata": {"sha256": sha256}}
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size >= part_size:
                return self._multipart(handle, object_key, sha256, part_size, extra)
            data = _read_part(handle, size)
        crc = _crc32_b64(zlib.crc32(data))
        self._client.put_object(
            Bucket=self.bucket, Key=object_key, Body=data, ChecksumCRC32=crc, **extra
        )
        return _Sent(object_key, len(data), sha256, crc)

    def _multipart(
        self,
        handle: BinaryIO,
        object_key: str,
        sha256: str,
        part_size: int,
        extra: dict[str, Any],
    ) -> _Sent:
        created = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=object_key, ChecksumAlgorithm="CRC32", **extra
        )
        upload_id = str(created["UploadId"])
        parts: dict[int, dict[str, Any]] = {}
        size = 0

        def send(number: int, data: bytes) -> None:
            # zlib releases the GIL on large buffers: parts are checksummed in parallel.
            crc = _crc32_b64(zlib.crc32(data))
            response = self._client.upload_part(
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumCRC32=crc,
            )
            parts[number] = {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc}

        try:
            with ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="s3-part") as pool:
                pending: set[Future[None]] = set()
                number = 0
                while data := _read_part(handle, part_size):
                    number += 1
                    size += len(data)
                    pending.add(pool.submit(send, number, data))
                    del data
                    if len(pending) >= self._max_concurrency:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()
                for future in pending:
                    future.result()
            ordered = [parts[n] for n in sorted(parts)]
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": ordered},
            )
        except BaseException:
            # Best effort (the server may be gone); cleanup-artifacts aborts what is left.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload_id
                )
            raise
        composite = zlib.crc32(b"".join(base64.b64decode(p["ChecksumCRC32"]) for p in ordered))
        return _Sent(object_key, size, sha256, f"{_crc32_b64(composite)}-{len(ordered)}")

    def _verify(self, path: Path, sent: _Sent) -> None:
        """Check what S3 stored against what was sent: size, sha256 metadata, CRC32."""
        head = self._head(sent.object_key, checksums=True)
        problems = []
        if head is None:
            problems.append("the object is missing after upload")
        else:
            if int(head["ContentLength"]) != sent.size:
                problems.append(f"size {head['ContentLength']} instead of {sent.size}")
            if head.get("Metadata", {}).get("sha256") != sent.sha256:
                problems.append("sha256 metadata differs")
            stored = head.get("ChecksumCRC32")
            if stored is not None and stored != sent.crc32:
                problems.append(f"the server's CRC32 checksum {stored} differs from {sent.crc32}")
        if problems:
            raise BackupError(
                f"upload of {path} to s3://{self.bucket}/{sent.object_key} failed "
                f"verification: {'; '.join(problems)}"
            )

    def _delete_stale(self, object_key: str, keep: set[str]) -> None:
        stale = [i["Key"] for i in self._iter_objects(object_key + "/") if i["Key"] not in keep]
        self._delete_keys(stale)

    def _discard(self, object_keys: list[str]) -> None:
        """Best effort: remove what a failed upload left (the server may be gone)."""
        with contextlib.suppress(Exception):
            self._delete_keys(object_keys)

    # -- download ------------------------------------------------------------------

    def download(self, key: str, destination: Path, *, sha256: str | None = None) -> None:
        """Fetch an artifact; every file is checked against its stored sha256 metadata.

        ``sha256`` (``sha256_artifact`` of the original) is checked as well; a mismatch
        raises BackupError and leaves nothing at ``destination``.
        """
        object_key = self._object_key(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("download"):
            head = self._head(object_key)
            if head is not None:
                self._download_file(object_key, destination, head, sha256)
                return
            items = list(self._iter_objects(object_key + "/"))
            if not items:
                raise FileNotFoundError(key)
            if destination.exists():
                raise FileExistsError(destination)
            temp = Path(
                tempfile.mkdtemp(prefix=f".tmp-{destination.name}.", dir=destination.parent)
            )
            try:
                for item in items:
                    relative = item["Key"][len(object_key) + 1 :]
                    target = (temp / relative).resolve()
                    if temp.resolve() not in target.parents:
                        raise BackupError(f"object name {item['Key']!r} escapes its backup")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    item_head = self._head(item["Key"])
                    if item_head is None:
                        raise BackupError(f"{self.uri(key)} changed while it was downloaded")
                    self._download_file(item["Key"], target, item_head, None)
                if sha256 is not None and sha256_tree(temp) != sha256:
                    raise BackupError(f"{self.uri(key)} does not match its recorded checksum")
                temp.replace(destination)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise

    def _download_file(
        self, object_key: str, destination: Path, head: dict[str, Any], sha256: str | None
    ) -> None:
        expected = sha256 or head.get("Metadata", {}).get("sha256")
        fd, temp_name = tempfile.mkstemp(prefix=f".tmp-{destination.name}.", dir=destination.parent)
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = self._stream(object_key, out, str(head["ETag"]))
            if expected is not None and actual != expected:
                raise BackupError(
                    f"s3://{self.bucket}/{object_key} does not match its checksum "
                    f"(expected sha256 {expected[:12]}…, got {actual[:12]}…)"
                )
            temp.replace(destination)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _stream(self, object_key: str, out: Any, etag: str) -> str:
        """Copy the object into ``out``; resume with a ranged GET if the stream breaks."""
        from botocore import exceptions as bex

        digest = hashlib.sha256()
        written, total, failures = 0, -1, 0
        while True:
            # If-Match pins the version whose metadata the caller read.
            request: dict[str, Any] = {"Bucket": self.bucket, "Key": object_key, "IfMatch": etag}
            if written:
                request["Range"] = f"bytes={written}-"
            response = self._client.get_object(**request)
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
                if failures >= self._max_attempts:
                    raise
                log.warning("s3.download_resumed", key=object_key, offset=written)
                continue
            finally:
                body.close()
            if written >= total:
                return digest.hexdigest()
            failures += 1
            if failures >= self._max_attempts:
                raise ConfigError(f"S3 sent {written} of {total} bytes of {object_key}")

    # -- small objects -------------------------------------------------------------

    def read_text(self, key: str) -> str:
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        with self._errors("read"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=object_key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise FileNotFoundError(key) from None
                raise
            data: bytes = response["Body"].read()
        return data.decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        data = text.encode("utf-8")
        digest = hashlib.sha256(data)
        args = self._put_args(artifact=False)
        with self._errors("write"):
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._object_key(key),
                Body=data,
                ContentType="text/plain; charset=utf-8",
                ChecksumSHA256=_b64(digest.digest()),
                Metadata={"sha256": digest.hexdigest()},
                **args,
            )

    # -- removal -------------------------------------------------------------------

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        with self._errors("delete"):
            self._client.delete_object(Bucket=self.bucket, Key=object_key)
            self._delete_keys([i["Key"] for i in self._iter_objects(object_key + "/")])

    def _delete_keys(self, object_keys: list[str]) -> None:
        for start in range(0, len(object_keys), DELETE_BATCH):
            batch = object_keys[start : start + DELETE_BATCH]
            response = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise ConfigError(
                    f"S3 could not delete {len(errors)} object(s) such as "
                    f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}"
                )

    def cleanup_incomplete(self, older_than_seconds: float, *, dry_run: bool = False) -> list[str]:
        """Abort multipart uploads under the prefix started before the cutoff."""
        cutoff = datetime.now(timezone.utc).timestamp() - older_than_seconds
        root = self.prefix + "/" if self.prefix else ""
        aborted = []
        with self._errors("cleanup"):
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() > cutoff:
                        continue
                    if not dry_run:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    aborted.append(f"{self._relative(upload['Key'])} (unfinished upload)")
        return aborted

    def close(self) -> None:
        self._client.close()


def _register_credentials(session: Any) -> None:
    """Resolve the AWS credential chain now, so a missing key fails before any work, and
    hand the values to the log redactor so not even SDK debug output can show them."""
    from rollback_cli.log import redactor

    credentials = session.get_credentials()
    if credentials is None:
        from botocore.exceptions import NoCredentialsError

        raise NoCredentialsError
    frozen = credentials.get_frozen_credentials()
    for value in (frozen.access_key, frozen.secret_key, frozen.token):
        redactor.add_secret(value)


def _is_connection_error(exc: BaseException) -> bool:
    from botocore import exceptions as bex

    return isinstance(exc, bex.ConnectionError | bex.HTTPClientError)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)


def _retry_mode(text: str | None) -> RetryMode:
    if not text or text == "standard":
        return "standard"
    if text in ("adaptive", "legacy"):
        return "adaptive" if text == "adaptive" else "legacy"
    raise ConfigError(f"AWS_RETRY_MODE must be standard, adaptive or legacy, not {text!r}")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} is not a whole number: {text!r}") from None
