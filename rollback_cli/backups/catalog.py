"""Finding backups: listing a storage, resolving a BACKUP argument, fetching for use, retention."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from rollback_cli.backups.manifest import (
    Manifest,
    backup_key_for_manifest,
    is_manifest_key,
    manifest_key,
)
from rollback_cli.errors import BackupError, UsageError
from rollback_cli.files import TEMP_PREFIX, ensure_private_dir
from rollback_cli.log import get_logger
from rollback_cli.storage import (
    REMOTE_SCHEMES,
    LocalStorage,
    Storage,
    StoredObject,
    open_storage,
    open_uri,
    staging_dir,
)

if TYPE_CHECKING:
    from rollback_cli.settings import StorageConfig

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
    #: the backend holding this entry (cleanup deletes from it)
    storage: Storage | None = field(default=None, compare=False, repr=False)

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
    """Every backup in ``storage`` and, for a remote one, in its local staging directory
    (copies kept with ``--keep-local``), newest first; ``location`` tells them apart."""
    entries = _list_one(storage)
    if storage.staging is not None:
        entries += _list_one(LocalStorage(storage.staging))
    entries.sort(key=lambda e: e.created or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
    return entries


def _list_one(storage: Storage) -> list[BackupEntry]:
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
        storage=storage,
    )


def locate(config: StorageConfig, environment: str, ref: str) -> tuple[Storage, str]:
    """Resolve a BACKUP argument: a local path, a ``file://`` or ``s3://`` URI, or a name in
    the configured storage. The caller closes the returned storage."""
    if not ref or not ref.strip():
        raise UsageError("BACKUP must not be empty")
    parts = urlsplit(ref)
    if parts.scheme in REMOTE_SCHEMES:
        # The configured storage when the URI lies under it (so its prefix and environment
        # apply), else a storage opened on the URI's own bucket and prefix.
        storage = open_storage(config, environment)
        root = storage.uri().rstrip("/") + "/"
        if ref.startswith(root) and "/" not in ref[len(root) :].strip("/"):
            return storage, ref[len(root) :].strip("/")
        storage.close()
        return open_uri(config, environment, ref)
    path = Path(unquote(parts.path)) if parts.scheme == "file" else Path(ref)
    if parts.scheme not in ("", "file"):
        raise UsageError(f"unsupported backup location {ref!r}")
    if path.exists() or path.is_symlink() or path.parent != Path():
        if not path.exists():
            raise BackupError(f"backup {ref} does not exist")
        return LocalStorage(path.parent), path.name.rstrip("/")
    storage = open_storage(config, environment)
    if storage.stat(ref) is None and storage.stat(manifest_key(ref)) is None:
        where = storage.uri()
        storage.close()
        raise BackupError(
            f"backup {ref} does not exist (looked in {where} and the current directory)"
        )
    return storage, ref


@contextmanager
def fetched(storage: Storage, key: str, manifest: Manifest) -> Iterator[Path]:
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
    scratch_dir = staging_dir(storage)
    ensure_private_dir(scratch_dir)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}download-", dir=scratch_dir))
    try:
        target = temp_dir / Path(key).name
        try:
            # The backend checks the sha256 while it writes; a mismatch leaves no file.
            storage.download(key, target, sha256=manifest.sha256)
        except FileNotFoundError:
            raise BackupError(f"backup {storage.uri(key)} does not exist") from None
        except BackupError as exc:
            raise BackupError(
                f"downloaded {storage.uri(key)} does not match its manifest checksum: "
                "corrupt or replaced; it was not used",
                hint=exc.one_line(),
            ) from None
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
    ``keep_last`` valid ones in each location (the storage, and for a remote storage the
    local staging directory). Invalid leftovers of the environment older than the cutoff
    go too. A dry run removes nothing and returns what would go."""
    logger = get_logger()
    now = now or datetime.now(timezone.utc)
    cutoff = now.timestamp() - older_than_seconds
    own_prefix = f"{BACKUP_PREFIX}{environment}_"
    entries = [
        e
        for e in list_backups(storage)
        if (e.manifest.environment == environment if e.manifest else e.key.startswith(own_prefix))
    ]
    protected: set[tuple[str, str]] = set()
    for location in {e.location for e in entries}:
        newest = [e for e in entries if e.location == location and e.valid][:keep_last]
        protected |= {(e.location, e.key) for e in newest}
    removed: list[BackupEntry] = []
    kept: list[BackupEntry] = []
    for entry in entries:
        created = entry.created
        if (entry.location, entry.key) in protected or created is None:
            kept.append(entry)
            continue
        if created.timestamp() >= cutoff:
            kept.append(entry)
            continue
        removed.append(entry)
        fields = {"backup": entry.key, "uri": entry.uri, "created_at": created.isoformat()}
        if dry_run:
            logger.info("would remove backup", **fields)
            continue
        holder = entry.storage or storage
        # Manifest first: a backup without its manifest is never listed as valid.
        holder.delete(manifest_key(entry.key))
        holder.delete(entry.key)
        logger.info("removed backup", **fields)
    return CleanupResult(removed, kept, dry_run)
