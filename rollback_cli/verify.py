"""``backup verify``: manifest, size, sha256, archive readability, and a real restore test."""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli import pg
from rollback_cli.artifacts import VERIFY_MARK, derived_name
from rollback_cli.catalog import fetched, locate, read_manifest
from rollback_cli.errors import BackupError, OperationFailed
from rollback_cli.log import get_logger, redactor, step
from rollback_cli.manifest import backup_key_for_manifest, is_manifest_key
from rollback_cli.restore import (
    check_archive_readable,
    create_database_like,
    database_properties,
    drop_database,
    maintenance_connection,
    restore_into,
    role_privileges,
)
from rollback_cli.storage import Storage
from rollback_cli.storage.base import sha256_artifact

if TYPE_CHECKING:
    from rollback_cli.manifest import Manifest
    from rollback_cli.settings import ConnInfo, Settings


@dataclass
class VerifyResult:
    key: str
    uri: str
    manifest: Manifest
    checks: list[dict[str, Any]] = field(default_factory=list)
    restore_test: dict[str, Any] | None = None

    def add(self, name: str, detail: str) -> None:
        self.checks.append({"check": name, "ok": True, "detail": detail})


def manifest_client_major(manifest: Manifest) -> int:
    try:
        return int(manifest.pg_dump_version.split(".")[0])
    except ValueError:
        return 0


def verify_backup(
    settings: Settings,
    ref: str,
    *,
    restore_test: bool = False,
    conninfo: ConnInfo | None = None,
) -> VerifyResult:
    storage, key = locate(settings, ref)
    if is_manifest_key(key) and storage.stat(backup_key_for_manifest(key)) is not None:
        key = backup_key_for_manifest(key)  # the manifest's path was given: verify its backup
    try:
        return verify_stored(settings, storage, key, restore_test=restore_test, conninfo=conninfo)
    finally:
        storage.close()


def verify_stored(
    settings: Settings,
    storage: Storage,
    key: str,
    *,
    restore_test: bool = False,
    conninfo: ConnInfo | None = None,
    keep_fetched: Path | None = None,
) -> VerifyResult:
    """Verify the backup at ``key``; raises BackupError (exit 4) at the first failed check."""
    logger = get_logger()
    with step("verify", backup=key):
        manifest = read_manifest(storage, key)
        result = VerifyResult(key, storage.uri(key), manifest)
        result.add(
            "manifest", f"format {manifest.manifest_version}, {manifest.type}/{manifest.format}"
        )
        stored = storage.stat(key)
        if stored is None:
            raise BackupError(f"backup {key} is listed in its manifest but the file is missing")
        if stored.size != manifest.size:
            raise BackupError(
                f"backup {key} is {stored.size} bytes but its manifest says {manifest.size}: "
                "truncated or replaced"
            )
        result.add("size", f"{stored.size} bytes")
        tools = pg.find_client(
            manifest_client_major(manifest), settings.pg_bin_dir, purpose="archive's pg_dump"
        )
        with fetched(storage, key, manifest, settings.backup_dir) as local:
            for name, detail in check_local(tools, local, manifest):
                result.add(name, detail)
            if restore_test:
                result.restore_test = run_restore_test(
                    conninfo or settings.conninfo(), tools, local, manifest, settings.pg_bin_dir
                )
                result.add("restore-test", "restored into a scratch database and compared")
    logger.info(
        "backup verified", backup=key, sha256=manifest.sha256, restore_test=bool(restore_test)
    )
    return result


def check_local(tools: pg.ClientTools, local: Path, manifest: Manifest) -> list[tuple[str, str]]:
    """Checksum and readability of a backup already on local disk."""
    actual = sha256_artifact(local)
    if actual != manifest.sha256:
        raise BackupError(
            f"backup {manifest.file_name} fails its checksum (sha256 {actual[:12]}…, manifest "
            f"{manifest.sha256[:12]}…): corrupt or modified"
        )
    entries = check_archive_readable(tools, local, manifest.format)
    readable = (
        f"pg_restore --list: {entries} entries"
        if manifest.format != "plain"
        else "header and completion trailer present"
    )
    return [("sha256", actual), ("readable", readable)]


def run_restore_test(
    conninfo: ConnInfo,
    tools: pg.ClientTools,
    local: Path,
    manifest: Manifest,
    pg_bin_dir: Path | None,
) -> dict[str, Any]:
    """Restore into a scratch database, compare row counts and revision, drop it."""
    scratch = derived_name(conninfo.dbname, VERIFY_MARK)
    with step("restore-test", scratch_database=scratch) as details:
        admin = maintenance_connection(conninfo)
        try:
            server_tools = pg.find_client(pg.server_major(admin), pg_bin_dir)
            if server_tools.major < tools.major:
                server_tools = tools
            privileges = role_privileges(admin)
            like = (
                database_properties(admin, conninfo.dbname)
                if _exists(admin, conninfo.dbname)
                else None
            )
            create_database_like(
                admin, scratch, like, set_owner=privileges["superuser"], purpose="the restore test"
            )
            no_owner = not privileges["superuser"]
            try:
                try:
                    if manifest.type == "data":
                        _copy_live_schema(server_tools, conninfo, scratch, manifest, no_owner)
                    restore_into(
                        server_tools, conninfo, scratch, local, manifest, no_owner=no_owner
                    )
                except OperationFailed as exc:
                    # The backup cannot be restored here: it fails verification (exit 4).
                    raise BackupError(
                        f"restore test of {manifest.file_name} failed: {exc.message}"
                    ) from None
                comparison = compare_with_manifest(conninfo, scratch, manifest)
            finally:
                drop_database(admin, scratch)
        finally:
            admin.close()
        details.update(comparison)
    if comparison["mismatches"]:
        raise BackupError(
            f"restore test of {manifest.file_name} does not match its manifest: "
            + "; ".join(comparison["mismatches"][:5])
        )
    return comparison


def _copy_live_schema(
    tools: pg.ClientTools, conninfo: ConnInfo, scratch: str, manifest: Manifest, no_owner: bool
) -> None:
    """A data-only backup is restored into a copy of the live database's schema."""
    with tempfile.TemporaryDirectory(prefix="db-rollback-schema-") as temp_dir:
        schema_file = Path(temp_dir) / "schema.dump"
        argv = [
            tools.pg_dump,
            "--no-password",
            "--schema-only",
            "--format=custom",
            f"--file={schema_file}",
        ]
        with pg.child_environment(conninfo) as env:
            result = subprocess.run(argv, env=env, capture_output=True, check=False, umask=0o077)
        if result.returncode != 0:
            lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
            reason = redactor.scrub(lines[0]) if lines else f"exit {result.returncode}"
            raise OperationFailed(f"cannot copy the schema of {conninfo.dbname}: {reason}")
        schema_manifest = dataclasses.replace(manifest, format="custom", type="schema")
        restore_into(tools, conninfo, scratch, schema_file, schema_manifest, no_owner=no_owner)


def _exists(conn: Any, dbname: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        return cur.fetchone() is not None


def compare_with_manifest(conninfo: ConnInfo, dbname: str, manifest: Manifest) -> dict[str, Any]:
    """Row counts and Alembic revision of ``dbname`` against ``manifest``."""
    conn = pg.connect(conninfo, dbname)
    try:
        counts = pg.table_row_counts(conn)
        revisions = pg.alembic_revisions(conn)
    finally:
        conn.close()
    mismatches: list[str] = []
    if manifest.has_data:
        for table, expected in sorted(manifest.row_counts.items()):
            actual = counts.get(table)
            if actual is None:
                mismatches.append(f"table {table} missing")
            elif actual != expected:
                mismatches.append(f"{table}: {actual} rows, manifest {expected}")
    if manifest.type != "data" and revisions != manifest.alembic_revisions:
        mismatches.append(
            f"alembic revision {','.join(revisions) or 'none'}, manifest "
            f"{','.join(manifest.alembic_revisions) or 'none'}"
        )
    return {
        "database": dbname,
        "tables": len(counts),
        "rows": sum(counts.values()),
        "alembic_revisions": revisions,
        "mismatches": mismatches,
    }
