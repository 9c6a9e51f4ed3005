"""Backup storage backends: a local directory, or S3 (and S3-compatible servers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from rollback_cli.errors import UsageError
from rollback_cli.storage.base import Storage, StoredObject

if TYPE_CHECKING:
    from rollback_cli.settings import Settings

__all__ = ["Storage", "StoredObject", "open_storage", "open_uri"]

REMOTE_SCHEMES = ("s3",)


def open_storage(settings: Settings) -> Storage:
    """The backend named by ``--storage`` (default: the local backup directory)."""
    from rollback_cli.storage.local import LocalStorage

    target = settings.storage
    if not target:
        return LocalStorage(settings.backup_dir)
    parts = urlsplit(target)
    if parts.scheme == "file":
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        from rollback_cli.storage.s3 import S3Storage

        s3: Storage = S3Storage.from_settings(target, settings)
        s3.staging = settings.backup_dir
        return s3
    if not parts.scheme:
        return LocalStorage(Path(target))
    raise UsageError(f"unsupported storage {target!r}: use file:///path or s3://bucket/prefix")


def open_uri(settings: Settings, uri: str) -> tuple[Storage, str]:
    """The backend holding the artifact named by a full remote URI, and its key there.

    ``s3://bucket/some/prefix/backup_x.dump`` opens ``s3://bucket/some/prefix`` with the
    endpoint, region and encryption settings of ``settings``; the environment is not
    appended, since the URI already names the object. The caller closes the storage.
    """
    parts = urlsplit(uri)
    if parts.scheme not in REMOTE_SCHEMES or not parts.netloc:
        raise UsageError(f"{uri!r} is not a storage URI such as s3://bucket/prefix/backup")
    path = unquote(parts.path).strip("/")
    prefix, _, key = path.rpartition("/")
    if not key:
        raise UsageError(f"{uri!r} names no backup")
    from rollback_cli.storage.s3 import S3Storage

    storage: Storage = S3Storage.from_settings(
        f"s3://{parts.netloc}/{prefix}", settings, append_environment=False
    )
    storage.staging = settings.backup_dir
    return storage, key
