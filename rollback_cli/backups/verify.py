"""Verification: manifest, size, sha256, archive readability, and a real restore test.

:func:`prepared_backup` is the one way a stored backup becomes a checked local file; both
``backup verify`` and every rollback that restores a backup go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli.backups.catalog import fetched, locate, read_manifest
from rollback_cli.backups.dump import archive_version_from_header
from rollback_cli.backups.manifest import (
    Manifest,
    backup_key_for_manifest,
    check_signature,
    is_manifest_key,
)
from rollback_cli.backups.scratch import RestoreFailed, restored_copy, restores_as_superuser
from rollback_cli.checks import WARNING, Check
from rollback_cli.errors import BackupError
from rollback_cli.log import get_logger, redactor, step
from rollback_cli.postgres import registry
from rollback_cli.postgres.catalog import role_privileges
from rollback_cli.postgres.clients import ClientTools, find_client
from rollback_cli.postgres.connection import maintenance_connection
from rollback_cli.postgres.restore import check_archive_readable
from rollback_cli.settings import SigningKeys
from rollback_cli.storage.base import sha256_artifact

if TYPE_CHECKING:
    from rollback_cli.settings import StorageConfig, Target
    from rollback_cli.storage import Storage


@dataclass
class VerifiedBackup:
    """A stored backup whose manifest, size, checksum and readability were checked, and the
    local file that holds it while it is in use."""

    storage: Storage
    key: str
    manifest: Manifest
    local: Path
    tools: ClientTools
    checks: list[Check] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.storage.uri(self.key)


@dataclass
class VerifyResult:
    key: str
    uri: str
    manifest: Manifest
    checks: list[Check] = field(default_factory=list)
    restore_test: dict[str, Any] | None = None


def manifest_client_major(manifest: Manifest) -> int:
    try:
        return int(manifest.pg_dump_version.split(".")[0])
    except ValueError:
        return 0


@contextmanager
def prepared_backup(
    storage: Storage,
    key: str,
    *,
    pg_bin_dir: Path | None,
    admit: Callable[[Manifest], None] | None = None,
    signing: SigningKeys | None = None,
) -> Iterator[VerifiedBackup]:
    """The backup at ``key``, checked and on local disk for the duration of the block.

    Raises BackupError (exit 4) at the first failed check. ``admit`` sees the manifest
    before anything is downloaded and may refuse the backup for its own reasons.
    """
    manifest = read_manifest(storage, key)
    checks = [
        Check.of(
            "manifest",
            True,
            f"format {manifest.manifest_version}, {manifest.type}/{manifest.format}",
        )
    ]
    stored = storage.stat(key)
    if stored is None:
        raise BackupError(f"backup {key} is listed in its manifest but the file is missing")
    if stored.size != manifest.size:
        raise BackupError(
            f"backup {key} is {stored.size} bytes but its manifest says {manifest.size}: "
            "truncated or replaced"
        )
    checks.append(Check.of("size", True, f"{stored.size} bytes"))
    keys = signing or SigningKeys()
    for signing_key in keys.keys:
        redactor.add_secret(signing_key)
    checks.append(Check.of("signature", True, check_signature(manifest, keys.keys, keys.source)))
    if admit is not None:
        admit(manifest)
    tools = find_client(manifest_client_major(manifest), pg_bin_dir, purpose="archive's pg_dump")
    with fetched(storage, key, manifest) as local:
        with step("verify-checksum", backup=key):
            checks += check_local(tools, local, manifest)
        yield VerifiedBackup(storage, key, manifest, local, tools, checks)


def archive_version_of(local: Path) -> str | None:
    """The format version in a custom archive's (or a directory's toc.dat) header."""
    header_file = local / "toc.dat" if local.is_dir() else local
    try:
        with header_file.open("rb") as handle:
            return archive_version_from_header(handle.read(8))
    except OSError:
        return None


def check_local(tools: ClientTools, local: Path, manifest: Manifest) -> list[Check]:
    """Checksum and readability of a backup already on local disk."""
    actual = sha256_artifact(local)
    if actual != manifest.sha256:
        raise BackupError(
            f"backup {manifest.file_name} fails its checksum (sha256 {actual[:12]}…, manifest "
            f"{manifest.sha256[:12]}…): corrupt or modified"
        )
    if manifest.archive_version and manifest.format != "plain":
        found = archive_version_of(local)
        # No archive header at all: pg_restore says what the file is not, below.
        if found is not None and found != manifest.archive_version:
            # A header that differs from the one recorded at backup time is corruption, not
            # a client too old to read it.
            raise BackupError(
                f"backup {manifest.file_name} has archive header version {found}, "
                f"its manifest recorded {manifest.archive_version}: corrupt or modified"
            )
    entries = check_archive_readable(tools, local, manifest.format)
    readable = (
        f"pg_restore --list: {entries} entries"
        if manifest.format != "plain"
        else "header and completion trailer present"
    )
    return [Check.of("sha256", True, actual), Check.of("readable", True, readable)]


def verify_backup(
    config: StorageConfig,
    environment: str,
    ref: str,
    *,
    pg_bin_dir: Path | None = None,
    target: Target | None = None,
) -> VerifyResult:
    """Verify the backup ``ref`` names; with a ``target``, also restore it into a scratch
    database on that server (the restore test)."""
    storage, key = locate(config, environment, ref)
    if is_manifest_key(key) and storage.stat(backup_key_for_manifest(key)) is not None:
        key = backup_key_for_manifest(key)  # the manifest's path was given: verify its backup
    try:
        with (
            step("verify", backup=key),
            prepared_backup(storage, key, pg_bin_dir=pg_bin_dir, signing=config.signing) as backup,
        ):
            result = VerifyResult(key, backup.uri, backup.manifest, list(backup.checks))
            if target is not None:
                result.restore_test = run_restore_test(target, backup, signed=bool(config.signing))
                result.checks.append(
                    Check.of("restore-test", True, restore_test_detail(backup.manifest.type))
                )
                if result.restore_test.get("restored_as_superuser") and not config.signing:
                    result.checks.append(
                        Check(
                            "restore-role",
                            WARNING,
                            "the backup's SQL ran with superuser rights and no signing key is "
                            "configured: anyone who can write the storage could run SQL as a "
                            "superuser here (configure DB_ROLLBACK_SIGNING_KEY, or "
                            "--restore-url with the database owner)",
                        )
                    )
    finally:
        storage.close()
    get_logger().info(
        "backup verified",
        backup=key,
        sha256=result.manifest.sha256,
        restore_test=target is not None,
    )
    return result


def restore_test_detail(backup_type: str) -> str:
    """What a passed restore test proved, for a backup of ``backup_type``."""
    if backup_type == "schema":
        return (
            "restored into a scratch database: its tables exist (a schema-only backup holds "
            "no rows, so no row counts or revision to compare)"
        )
    if backup_type == "data":
        return "restored into a scratch database; row counts match the manifest"
    return "restored into a scratch database; row counts and revision match the manifest"


def run_restore_test(
    target: Target, backup: VerifiedBackup, *, signed: bool = False
) -> dict[str, Any]:
    """Restore into a scratch database, compare row counts and revision, drop it."""
    manifest = backup.manifest
    with step("restore-test") as details:
        admin = maintenance_connection(target.conninfo)
        note = ""
        try:
            superuser = role_privileges(admin)["superuser"]
            if not signed and restores_as_superuser(target, superuser):
                note = (
                    "; its SQL ran with superuser rights and no signing key is configured "
                    "(configure DB_ROLLBACK_SIGNING_KEY, or --restore-url with the owner)"
                )
            with restored_copy(
                admin,
                target,
                backup.tools,
                backup.local,
                manifest,
                registry.VERIFY,
                purpose="the restore test",
            ) as copy:
                comparison = {**copy.comparison, "restored_as_superuser": not copy.no_owner}
        except RestoreFailed as exc:
            # The backup cannot be restored here: it fails verification (exit 4).
            raise BackupError(
                f"restore test of {manifest.file_name} failed: {exc.message}{note}"
            ) from None
        finally:
            admin.close()
        details.update(comparison)
    if comparison["mismatches"]:
        raise BackupError(
            f"restore test of {manifest.file_name} does not match its manifest: "
            + "; ".join(comparison["mismatches"][:5])
            + note
        )
    return comparison


__all__ = [
    "VerifiedBackup",
    "VerifyResult",
    "check_local",
    "prepared_backup",
    "run_restore_test",
    "verify_backup",
]
