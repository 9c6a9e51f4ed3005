"""Backup manifests: ``<backup>.json``, written last and atomically, read strictly."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
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
    #: "hmac-sha256:<key id>:<hex>" over every other field (the backup's sha256 included)
    signature: str | None = None

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
        counts_ok = all(
            isinstance(k, str) and type(v) is int and v >= 0
            for k, v in values["row_counts"].items()
        )
        if not counts_ok:
            raise BackupError(f"manifest {source} has invalid row counts")
        if not all(isinstance(r, str) for r in values["alembic_revisions"]):
            raise BackupError(f"manifest {source} has invalid alembic_revisions")
        if values["type"] not in BACKUP_TYPES or values["format"] not in BACKUP_FORMATS:
            raise BackupError(f"manifest {source} has an unknown type or format")
        if values.get("signature") is not None and not isinstance(values["signature"], str):
            raise BackupError(f"manifest {source} has an invalid signature")
        if len(values["sha256"]) != 64:
            raise BackupError(f"manifest {source} has an invalid sha256")
        try:
            datetime.fromisoformat(values["created_at"])
        except ValueError:
            raise BackupError(f"manifest {source} has an invalid created_at") from None
        return cls(**values)


SIGNATURE_ALGORITHM = "hmac-sha256"


def _payload(manifest: Manifest) -> bytes:
    data = asdict(manifest)
    data.pop("signature", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def key_id(key: str) -> str:
    """A short public name of a key (never the key): the start of its SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def _mac(manifest: Manifest, key: str) -> str:
    return hmac.new(key.encode("utf-8"), _payload(manifest), hashlib.sha256).hexdigest()


def sign(manifest: Manifest, key: str) -> Manifest:
    """``manifest`` with a signature over all its other fields by ``key``."""
    unsigned = replace(manifest, signature=None)
    return replace(unsigned, signature=f"{SIGNATURE_ALGORITHM}:{key_id(key)}:{_mac(unsigned, key)}")


def check_signature(manifest: Manifest, keys: tuple[str, ...], source: str) -> str:
    """With keys configured, the manifest must be signed by one of them: BackupError (exit
    4) otherwise, saying which. Returns what was checked, for the verify report."""
    if not keys:
        if manifest.signature:
            return "signed, not checked: no signing key configured"
        return "unsigned; no signing key configured"
    if not manifest.signature:
        raise BackupError(
            f"backup {manifest.file_name} is not signed, and a signing key is configured "
            f"({source}): refused; anyone who can write the storage could have made it"
        )
    algorithm, _, rest = manifest.signature.partition(":")
    signer, _, value = rest.partition(":")
    if algorithm != SIGNATURE_ALGORITHM:
        raise BackupError(
            f"backup {manifest.file_name} has an unknown signature type {algorithm!r}"
        )
    for key in keys:
        if hmac.compare_digest(_mac(manifest, key), value):
            return f"signed by key {key_id(key)}"
    raise BackupError(
        f"backup {manifest.file_name} has a signature (key {signer[:8]}) that no configured "
        "key verifies: it was altered or signed elsewhere; refused"
    )


def manifest_key(backup_key: str) -> str:
    return backup_key.rstrip("/") + MANIFEST_SUFFIX


def is_manifest_key(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX)


def backup_key_for_manifest(key: str) -> str:
    return key[: -len(MANIFEST_SUFFIX)]
