"""Backup storage backends: a local directory, or S3 (and S3-compatible servers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, unquote, urlsplit

from rollback_cli.errors import UsageError
from rollback_cli.storage.base import Storage, StoredObject
from rollback_cli.storage.local import LocalStorage

if TYPE_CHECKING:
    from rollback_cli.settings import StorageConfig

__all__ = [
    "REMOTE_SCHEMES",
    "LocalStorage",
    "Storage",
    "StoredObject",
    "open_storage",
    "open_uri",
    "staging_dir",
    "staging_dir_of",
]

REMOTE_SCHEMES = ("s3",)


def open_storage(config: StorageConfig, environment: str) -> Storage:
    """The backend named by ``config.storage`` (default: the local backup directory); a
    remote one keeps ``environment``'s backups under its own prefix."""
    target = config.storage
    if not target:
        return LocalStorage(config.backup_dir)
    parts = _split(target)
    if parts.scheme == "file":
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        # Imported for an S3 storage only: a local one needs none of it (start-up time).
        from rollback_cli.storage.s3 import S3Storage

        s3: Storage = S3Storage.from_config(target, config, environment)
        s3.staging = config.backup_dir
        return s3
    if not parts.scheme:
        return LocalStorage(Path(target))
    raise UsageError(f"unsupported storage {target!r}: use file:///path or s3://bucket/prefix")


def open_uri(config: StorageConfig, environment: str, uri: str) -> tuple[Storage, str]:
    """The backend holding the artifact named by a full remote URI, and its key there.

    ``s3://bucket/some/prefix/backup_x.dump`` opens ``s3://bucket/some/prefix`` with the
    endpoint, region and encryption settings of ``config``; the environment is not
    appended, since the URI already names the object. The caller closes the storage.
    """
    parts = _split(uri)
    if parts.scheme not in REMOTE_SCHEMES or not parts.netloc:
        raise UsageError(f"{uri!r} is not a storage URI such as s3://bucket/prefix/backup")
    path = unquote(parts.path).strip("/")
    prefix, _, key = path.rpartition("/")
    if not key:
        raise UsageError(f"{uri!r} names no backup")
    from rollback_cli.storage.s3 import S3Storage

    storage: Storage = S3Storage.from_config(
        f"s3://{parts.netloc}/{prefix}", config, environment, append_environment=False
    )
    storage.staging = config.backup_dir
    return storage, key


def _split(uri: str) -> SplitResult:
    try:
        return urlsplit(uri)
    except ValueError:
        # urllib's message may repeat the URI, which may hold a credential: name no part.
        raise UsageError("storage location is not a valid URI (malformed host part)") from None


def staging_dir_of(config: StorageConfig) -> Path:
    """Where backups for ``config``'s storage are staged, without opening it (no client
    for a remote one): the local directory itself, else the backup directory."""
    target = config.storage
    if not target:
        return config.backup_dir
    parts = _split(target)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme in REMOTE_SCHEMES:
        return config.backup_dir
    if not parts.scheme:
        return Path(target)
    raise UsageError(f"unsupported storage {target!r}: use file:///path or s3://bucket/prefix")


def staging_dir(storage: Storage) -> Path:
    """Where a backup for ``storage`` is written before it is stored: the directory itself
    for a local storage, the staging directory of a remote one."""
    if isinstance(storage, LocalStorage):
        return storage.root
    if storage.staging is None:
        raise UsageError(f"storage {storage.uri()} has no local staging directory")
    return storage.staging
