"""Backup storage backends: a local directory, or S3 (and S3-compatible servers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from rollback_cli.errors import UsageError
from rollback_cli.storage.base import Storage, StoredObject

if TYPE_CHECKING:
    from rollback_cli.settings import Settings

__all__ = ["Storage", "StoredObject", "open_storage"]


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
        return s3
    if not parts.scheme:
        return LocalStorage(Path(target))
    raise UsageError(f"unsupported storage {target!r}: use file:///path or s3://bucket/prefix")
