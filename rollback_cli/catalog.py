"""Finding backups: listing a storage, resolving a BACKUP argument, fetching for use, retention."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from rollback_cli.errors import BackupError, UsageError
from rollback_cli.log import get_logger
from rollback_cli.manifest import (
    Manifest,
    backup_key_for_manifest,
    is_manifest_key,
    manifest_key,
)
from rollback_cli.storage import Storage, StoredObject, open_storage
from rollback_cli.storage.base import sha256_artifact
from rollback_cli.storage.local import TEMP_PREFIX, LocalStorage, ensure_private_dir

if TYPE_CHECKING:
    from rollback_cli.settings import Settings

BACKUP_PREFIX = "backup_"


@dataclass(frozen=True)
class BackupEntry:
    key: str
    uri: str
    location: str
    size: int | None
    modified: datetime | None
    manifest: Manifest | None
    problem: str | None

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def created(self) -> datetime | None:
        return self.manifest.created if self.manifest else self.modified

    def to_dict(self) -> dict[str, object]:
        manifest = self.manifest
        return {
            "name": self.key,
            "uri": self.uri,
            "location": self.location,
            "size": self.size,
            "created_at": self.created.isoformat() if self.created else None,
            "type": manifest.type if manifest else None,
            "format": manifest.format if manifest else None,
            "environment": manifest.environment if manifest else None,
            "database": manifest.database if manifest else None,
            "alembic_revision": manifest.alembic_revision if manifest else None,
            "label": manifest.label if manifest else None,
            "sha256": manifest.sha256 if manifest else None,
            "valid": self.valid,
            "problem": self.problem,
        }


def read_manifest(storage: Storage, key: str) -> Manifest:
    """The manifest of the backup at ``key``; BackupError when missing or invalid."""
    mkey = manifest_key(key)
    try:
        text = storage.read_text(mkey)
    except (FileNotFoundError, IsADirectoryError):
        raise BackupError(
            f"backup {key} has no manifest ({mkey}); it may be incomplete or not made by this tool"
        ) from None
    except UnicodeDecodeError:
        raise BackupError(f"manifest {mkey} is not text") from None
    manifest = Manifest.from_json(text, source=mkey)
    if manifest.file_name != Path(key).name:
        raise BackupError(f"manifest {mkey} describes {manifest.file_name}, not {key}")
    return manifest


def list_backups(storage: Storage) -> list[BackupEntry]:
    objects = {obj.key: obj for obj in storage.list_objects()}
    entries: list[BackupEntry] = []
    for key, obj in objects.items():
        if not key.startswith(BACKUP_PREFIX) or key.startswith(TEMP_PREFIX):
            continue
        if is_manifest_key(key):
            data_key = backup_key_for_manifest(key)
            if data_key not in objects:
                entries.append(
                    _entry(
                        storage,
                        data_key,
                        None,
                        _safe_manifest(storage, data_key),
                        "backup file missing",
                    )
                )
            continue
        manifest: Manifest | None = None
        problem: str | None = None
        try:
            manifest = read_manifest(storage, key)
        except BackupError as exc:
            problem = "no manifest" if manifest_key(key) not in objects else exc.one_line()
        if manifest is not None and manifest.size != obj.size:
            problem = f"size {obj.size} differs from manifest ({manifest.size})"
        entries.append(_entry(storage, key, obj, manifest, problem))
    entries.sort(key=lambda e: e.created or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
    return entries


def _safe_manifest(storage: Storage, key: str) -> Manifest | None:
    try:
        return read_manifest(storage, key)
    except BackupError:
        return None


def _entry(
    storage: Storage,
    key: str,
    obj: StoredObject | None,
    manifest: Manifest | None,
    problem: str | None,
) -> BackupEntry:
    return BackupEntry(
        key=key,
        uri=storage.uri(key),
        location=storage.location,
        size=obj.size if obj else None,
        modified=obj.modified if obj else None,
        manifest=manifest,
        problem=problem,
    )


def locate(settings: Settings, ref: str) -> tuple[Storage, str]:
    """Resolve a BACKUP argument: a local path, a ``file://`` or ``s3://`` URI, or a name in
    the configured storage. The caller closes the returned storage."""
    if not ref or not ref.strip():
        raise UsageError("BACKUP must not be empty")
    parts = urlsplit(ref)
    if parts.scheme == "s3":
        storage = open_storage(settings)
        root = storage.uri().rstrip("/") + "/"
        if not ref.startswith(root):
            storage.close()
            raise UsageError(
                f"{ref} is not under the configured storage {root}: pass --storage with its "
                "bucket/prefix (and the same --environment)"
            )
        return storage, ref[len(root) :]
    path = Path(unquote(parts.path)) if parts.scheme == "file" else Path(ref)
    if parts.scheme not in ("", "file"):
        raise UsageError(f"unsupported backup location {ref!r}")
    if path.exists() or path.is_symlink() or path.parent != Path():
        if not path.exists():
            raise BackupError(f"backup {ref} does not exist")
        return LocalStorage(path.parent), path.name.rstrip("/")
    storage = open_storage(settings)
    if storage.stat(ref) is None and storage.stat(manifest_key(ref)) is None:
        where = storage.uri()
        storage.close()
        raise BackupError(
            f"backup {ref} does not exist (looked in {where} and the current directory)"
        )
    return storage, ref


@contextmanager
def fetched(storage: Storage, key: str, manifest: Manifest, scratch_dir: Path) -> Iterator[Path]:
    """A local path holding the backup, checked against the manifest's sha256.

    Local backups are used in place; remote ones are downloaded to a temporary file that is
    removed afterwards.
    """
    local = storage.local_path(key)
    if local is not None:
        if not local.exists():
            raise BackupError(f"backup {key} does not exist")
        yield local
        return
    ensure_private_dir(scratch_dir)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}download-", dir=scratch_dir))
    try:
        target = temp_dir / Path(key).name
        try:
            storage.download(key, target)
        except FileNotFoundError:
            raise BackupError(f"backup {storage.uri(key)} does not exist") from None
        actual = sha256_artifact(target)
        if actual != manifest.sha256:
            raise BackupError(
                f"downloaded {storage.uri(key)} does not match its manifest checksum "
                f"(sha256 {actual[:12]}…, expected {manifest.sha256[:12]}…)"
            )
        yield target
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class CleanupResult:
    removed: list[BackupEntry]
    kept: list[BackupEntry]
    dry_run: bool


def cleanup_backups(
    storage: Storage,
    *,
    environment: str,
    older_than_seconds: float,
    keep_last: int = 0,
    dry_run: bool = False,
    now: datetime | None = None,
) -> CleanupResult:
    """Remove backups of ``environment`` older than the cutoff, always keeping the newest
    ``keep_last`` valid ones. Invalid leftovers older than the cutoff go too."""
    logger = get_logger()
    now = now or datetime.now(timezone.utc)
    cutoff = now.timestamp() - older_than_seconds
    entries = [
        e
        for e in list_backups(storage)
        if e.manifest is None or e.manifest.environment == environment
    ]
    protected = {e.key for e in [e for e in entries if e.valid][:keep_last]}
    removed: list[BackupEntry] = []
    kept: list[BackupEntry] = []
    for entry in entries:
        created = entry.created
        if entry.key in protected or created is None or created.timestamp() >= cutoff:
            kept.append(entry)
            continue
        removed.append(entry)
        if dry_run:
            logger.info("would remove backup", backup=entry.key, created_at=created.isoformat())
            continue
        # Manifest first: a backup without its manifest is never listed as valid.
        storage.delete(manifest_key(entry.key))
        storage.delete(entry.key)
        logger.info("removed backup", backup=entry.key, created_at=created.isoformat())
    return CleanupResult(removed, kept, dry_run)


def age_text(when: datetime | None, now: float | None = None) -> str:
    if when is None:
        return "?"
    seconds = max(0.0, (now or time.time()) - when.timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
