"""The S3 ``Storage`` backend: client set-up, configuration, names, listing, small objects.

Uploads and downloads are delegated to ``transfer``; SDK exceptions become one-line
errors in ``errors.s3_errors``. Credentials come only from the standard AWS chain; they
are resolved when the client is made and handed to the log redactor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from rollback_cli.errors import ConfigError, UsageError
from rollback_cli.log import get_logger, redactor
from rollback_cli.storage.base import ArtifactStream, Storage, StoredObject, join_key
from rollback_cli.storage.s3.errors import s3_errors
from rollback_cli.storage.s3.transfer import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    Bucket,
    Downloader,
    MiB,
    StreamingUpload,
    Uploader,
    b64,
    plan_upload,
)

if TYPE_CHECKING:
    from rollback_cli.settings import StorageConfig

SDK_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")
SSE_ALIASES = {"aes256": "AES256", "aws:kms": "aws:kms", "kms": "aws:kms"}
RetryMode = Literal["standard", "adaptive", "legacy"]


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


class S3Storage(Storage):
    """Artifacts under ``s3://{bucket}/{prefix}/``.

    ``prefix`` is the complete key prefix (``from_config`` appends the environment).
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
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        config = _client_config(
            path_style=bool(custom_endpoint),
            retry_mode=retry_mode,
            max_attempts=self._max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=self._max_concurrency + 2,
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
        self._bucket = Bucket(self._client, bucket)

    @classmethod
    def from_config(
        cls,
        target: str,
        config: StorageConfig,
        environment: str,
        *,
        append_environment: bool = True,
    ) -> S3Storage:
        """Open ``s3://bucket/prefix``; objects live under ``{prefix}/{environment}/``
        (just ``{prefix}/`` without ``append_environment``)."""
        parts = urlsplit(target)
        if parts.scheme != "s3" or not parts.netloc:
            raise UsageError("S3 storage must look like s3://bucket/prefix")
        if "@" in parts.netloc:
            # Never echo the URL: whatever precedes "@" may be a secret.
            raise UsageError("S3 storage URLs take no credentials; use the AWS credential chain")
        return cls(
            parts.netloc,
            join_key(unquote(parts.path), environment if append_environment else ""),
            endpoint_url=config.s3_endpoint_url,
            region=config.s3_region,
            sse=config.s3_sse,
            kms_key_id=config.s3_kms_key_id,
            storage_class=config.s3_storage_class,
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

    def _errors(self, action: str) -> AbstractContextManager[None]:
        """``s3_errors`` for this endpoint and bucket."""
        return s3_errors(action, endpoint=self.endpoint, bucket=self.bucket)

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

    # -- listing -------------------------------------------------------------------

    def list_objects(self) -> list[StoredObject]:
        files: dict[str, StoredObject] = {}
        dirs: dict[str, StoredObject] = {}
        root = self.prefix + "/" if self.prefix else ""
        with self._errors("listing"):
            for item in self._bucket.objects(root):
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
            head = self._bucket.head(object_key)
            if head is not None:
                return StoredObject(key, int(head["ContentLength"]), _utc(head["LastModified"]))
            total, newest = 0, None
            for item in self._bucket.objects(object_key + "/"):
                total += int(item["Size"])
                modified = _utc(item["LastModified"])
                newest = modified if newest is None else max(newest, modified)
        if newest is None:
            return None
        return StoredObject(key, total, newest, is_dir=True)

    # -- transfers -----------------------------------------------------------------

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
        plan = plan_upload(source, object_key, sha256, self._min_part_size)
        uploader = Uploader(self._bucket, self._put_args(artifact=True), self._max_concurrency)
        with self._errors("upload"):
            sent = uploader.send(plan)
        seconds = time.monotonic() - started
        size = sum(s.size for s in sent)
        get_logger().info(
            "s3 upload",
            uri=self.uri(key),
            bytes=size,
            files=len(sent),
            part_size=plan.part_size,
            seconds=round(seconds, 3),
            mib_per_s=round(size / MiB / seconds, 1) if seconds else None,
        )

    def stream(self, key: str) -> ArtifactStream:
        """A multipart upload of ``key`` fed while pg_dump writes it: the upload overlaps
        the dump (see transfer.StreamingUpload); S3 errors become the usual ones."""
        with self._errors("upload"):
            upload = StreamingUpload(
                self._bucket,
                self._object_key(key),
                self._put_args(artifact=True),
                self._min_part_size,
                self._max_concurrency,
            )
        return _GuardedStream(upload, self)

    def download(self, key: str, destination: Path, *, sha256: str | None = None) -> None:
        """Fetch an artifact; every file is checked against its stored sha256 metadata.

        ``sha256`` (``sha256_artifact`` of the original) is checked as well; a mismatch
        raises BackupError and leaves nothing at ``destination``.
        """
        object_key = self._object_key(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        downloader = Downloader(self._bucket, self._max_attempts)
        with self._errors("download"):
            head = self._bucket.head(object_key)
            if head is not None:
                downloader.file(object_key, destination, head, sha256)
                return
            items = list(self._bucket.objects(object_key + "/"))
            if not items:
                raise FileNotFoundError(key)
            downloader.tree(object_key, items, destination, sha256, uri=self.uri(key))

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
                ChecksumSHA256=b64(digest.digest()),
                Metadata={"sha256": digest.hexdigest()},
                **args,
            )

    # -- removal -------------------------------------------------------------------

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        with self._errors("delete"):
            self._client.delete_object(Bucket=self.bucket, Key=object_key)
            self._bucket.delete([i["Key"] for i in self._bucket.objects(object_key + "/")])

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


class _GuardedStream:
    """A streaming upload whose S3 errors are translated like every other call's."""

    def __init__(self, upload: StreamingUpload, storage: S3Storage) -> None:
        self.upload, self.storage = upload, storage

    def write(self, chunk: bytes) -> None:
        with self.storage._errors("upload"):
            self.upload.write(chunk)

    def finish(self) -> object:
        started = time.monotonic()
        with self.storage._errors("upload"):
            sent = self.upload.finish()
        get_logger().info(
            "s3 upload",
            uri=f"s3://{self.storage.bucket}/{sent.object_key}",
            bytes=sent.size,
            streamed=True,
            finish_seconds=round(time.monotonic() - started, 3),
        )
        return sent

    def abort(self) -> None:
        self.upload.abort()


def _client_config(
    *,
    path_style: bool,
    retry_mode: RetryMode,
    max_attempts: int,
    connect_timeout: float,
    read_timeout: float,
    max_pool_connections: int,
) -> Any:
    """The botocore ``Config`` of the client."""
    from botocore.config import Config

    return Config(
        retries={"mode": retry_mode, "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        # S3-compatible servers rarely have wildcard DNS for virtual-hosted buckets.
        s3={"addressing_style": "path" if path_style else "auto"},
    )


def _register_credentials(session: Any) -> None:
    """Resolve the AWS credential chain now, so a missing key fails before any work, and
    hand the values to the log redactor so not even SDK debug output can show them."""
    credentials = session.get_credentials()
    if credentials is None:
        from botocore.exceptions import NoCredentialsError

        raise NoCredentialsError
    frozen = credentials.get_frozen_credentials()
    for value in (frozen.access_key, frozen.secret_key, frozen.token):
        redactor.add_secret(value)


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


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
