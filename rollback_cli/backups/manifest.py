"""Backup manifests: ``<backup>.json``, written last and atomically, read strictly."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from rollback_cli.errors import BackupError

MANIFEST_FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".json"
BACKUP_TYPES = ("full", "schema", "data")
BACKUP_FORMATS = ("custom", "plain", "directory")
FORMAT_EXTENSIONS = {"custom": ".dump", "plain": ".sql", "directory": ".dir"}


@dataclass(frozen=True)
class Manifest:
    file_name: str
    size: int
    sha256: str
    created_at: str
    environment: str
    database: str
    host: str
    server_version: str
    pg_dump_version: str
    type: str
    format: str
    compression: str | None
    alembic_revisions: list[str]
    row_counts: dict[str, int]
    tool_version: str
    manifest_version: int = MANIFEST_FORMAT_VERSION
    label: str | None = None
    git_commit: str | None = None
    archive_version: str | None = None
    snapshot: str | None = None
    duration_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def alembic_revision(self) -> str | None:
        return (
            self.alembic_revisions[0]
            if len(self.alembic_revisions) == 1
            else (",".join(self.alembic_revisions) or None)
        )

    @property
    def created(self) -> datetime:
        """``created_at`` as an aware datetime; a time without a zone is UTC (as in names)."""
        created = datetime.fromisoformat(self.created_at)
        return created if created.tzinfo else created.replace(tzinfo=timezone.utc)

    @property
    def has_data(self) -> bool:
        return self.type in ("full", "data")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        """Parse and check a manifest; any problem is a BackupError naming ``source``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BackupError(f"manifest {source} is not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise BackupError(f"manifest {source} is not a JSON object")
        version = data.get("manifest_version")
        if not isinstance(version, int) or version > MANIFEST_FORMAT_VERSION:
            raise BackupError(
                f"manifest {source} has unsupported format version {version!r} "
                f"(this tool reads up to {MANIFEST_FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(name for name in required if name not in data)
        if missing:
            raise BackupError(f"manifest {source} lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        checks: list[tuple[str, type | tuple[type, ...]]] = [
            ("file_name", str),
            ("size", int),
            ("sha256", str),
            ("created_at", str),
            ("environment", str),
            ("type", str),
            ("format", str),
            ("alembic_revisions", list),
            ("row_counts", dict),
        ]
        for name, expected in checks:
            if not isinstance(values.get(name), expected):
                raise BackupError(f"manifest {source} has an invalid {name}")
        if values["type"] not in BACKUP_TYPES or values["format"] not in BACKUP_FORMATS:
            raise BackupError(f"manifest {source} has an unknown type or format")
        if len(values["sha256"]) != 64:
            raise BackupError(f"manifest {source} has an invalid sha256")
        try:
            datetime.fromisoformat(values["created_at"])
        except ValueError:
            raise BackupError(f"manifest {source} has an invalid created_at") from None
        return cls(**values)


def manifest_key(backup_key: str) -> str:
    return backup_key.rstrip("/") + MANIFEST_SUFFIX


def is_manifest_key(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX)


def backup_key_for_manifest(key: str) -> str:
    return key[: -len(MANIFEST_SUFFIX)]
