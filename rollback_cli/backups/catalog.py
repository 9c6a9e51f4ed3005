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
from rollback_cli.files import TEMP_PREFIX, ensure_private_dir, writing_in
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
    try:
        parts = urlsplit(ref)
    except ValueError:
        raise UsageError("BACKUP is not a valid path or URI (malformed host part)") from None
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
    with writing_in(scratch_dir):
        yield from _downloaded(storage, key, manifest, scratch_dir)


def _downloaded(
    storage: Storage, key: str, manifest: Manifest, scratch_dir: Path
) -> Iterator[Path]:
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


#: why cleanup keeps a backup that its age and ``keep_last`` would have removed
NEWEST_FULL_REASON = (
    "newest valid full backup of its database in this location: cleanup never removes it"
)

#: (location, database, host) of a backup with a manifest; host is "" when unknown
DatabaseKey = tuple[str, str, str]
#: (location, key): one backup in one location
EntryId = tuple[str, str]


@dataclass(frozen=True)
class CleanupResult:
    removed: list[BackupEntry]
    kept: list[BackupEntry]
    dry_run: bool
    #: entries kept only because each is the newest valid full backup of its database in its
    #: location (also in ``kept``); age and ``keep_last`` alone would have removed them
    protected: list[BackupEntry] = field(default_factory=list)


def _ident(entry: BackupEntry) -> EntryId:
    return (entry.location, entry.key)


def _text(value: object) -> str:
    """A manifest field used as a name: ``database`` and ``host`` are not type-checked."""
    return value if isinstance(value, str) else ""


def _database_keys(entries: list[BackupEntry]) -> dict[EntryId, DatabaseKey]:
    """Which database each entry with a manifest is a backup of, keyed by location and name.

    A database is its manifest ``database`` in one location, told apart by ``host`` when
    the manifests have one. A manifest without a host belongs with the backups of that
    database's only known host; when several hosts have a database of that name it cannot be
    told which, so it stays a database of its own (more is kept, never less).
    """
    hosts: dict[tuple[str, str], set[str]] = {}
    for entry in entries:
        if entry.manifest is not None:
            name = (entry.location, _text(entry.manifest.database))
            host = _text(entry.manifest.host)
            hosts.setdefault(name, set()).update({host} if host else set())
    keys: dict[EntryId, DatabaseKey] = {}
    for entry in entries:
        if entry.manifest is None:
            continue
        location, database = entry.location, _text(entry.manifest.database)
        host = _text(entry.manifest.host)
        known = hosts[(location, database)]
        if not host and len(known) == 1:
            host = next(iter(known))
        keys[_ident(entry)] = (location, database, host)
    return keys


def _retained(
    entries: list[BackupEntry], keys: dict[EntryId, DatabaseKey], keep_last: int
) -> tuple[set[EntryId], set[EntryId]]:
    """``(kept by keep_last, newest valid full backups)``.

    ``entries`` is newest first. ``keep_last`` counts the valid backups of each database per
    kind of backup (the manifest ``type``: full, schema or data; a rollback's safety backup
    is a full one), so a newer schema-only backup never pushes out the full ones and one
    database's backups never push out another's.
    """
    groups: dict[tuple[DatabaseKey, str], list[BackupEntry]] = {}
    newest_full: dict[DatabaseKey, BackupEntry] = {}
    for entry in entries:
        if not entry.valid or entry.manifest is None:
            continue
        key = keys[_ident(entry)]
        groups.setdefault((key, entry.manifest.type), []).append(entry)
        if entry.manifest.type == "full":
            newest_full.setdefault(key, entry)
    by_count = {_ident(e) for group in groups.values() for e in group[:keep_last]}
    return by_count, {_ident(e) for e in newest_full.values()}


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
    ``keep_last`` valid ones of each database and kind of backup (full, schema, data) in each
    location (the storage, and for a remote storage the local staging directory).

    Whatever the arguments, the newest valid full backup of each database in each location
    is kept: a retention rule must never remove the last restorable backup. Invalid
    leftovers of the environment older than the cutoff go too (those without a manifest are
    told by their name's environment prefix). A dry run removes nothing and returns what
    would go."""
    logger = get_logger()
    now = now or datetime.now(timezone.utc)
    cutoff = now.timestamp() - older_than_seconds
    own_prefix = f"{BACKUP_PREFIX}{environment}_"
    entries = [
        e
        for e in list_backups(storage)
        if (e.manifest.environment == environment if e.manifest else e.key.startswith(own_prefix))
    ]
    keys = _database_keys(entries)
    by_count, newest_full = _retained(entries, keys, keep_last)
    removed: list[BackupEntry] = []
    kept: list[BackupEntry] = []
    protected: list[BackupEntry] = []
    for entry in entries:
        created = entry.created
        if _ident(entry) in by_count or created is None or created.timestamp() >= cutoff:
            kept.append(entry)
            continue
        fields = {"backup": entry.key, "uri": entry.uri, "created_at": created.isoformat()}
        if _ident(entry) in newest_full:
            kept.append(entry)
            protected.append(entry)
            location, database, host = keys[_ident(entry)]
            logger.info(
                "kept backup",
                **fields,
                location=location,
                database=database,
                host=host or None,
                reason=NEWEST_FULL_REASON,
            )
            continue
        removed.append(entry)
        if dry_run:
            logger.info("would remove backup", **fields)
            continue
        holder = entry.storage or storage
        # Manifest first: a backup without its manifest is never listed as valid.
        holder.delete(manifest_key(entry.key))
        holder.delete(entry.key)
        logger.info("removed backup", **fields)
    return CleanupResult(removed, kept, dry_run, protected)
