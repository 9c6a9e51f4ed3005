"""Leftovers of rollbacks: kept pre-rollback databases, stray scratch databases, temp files."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rollback_cli.errors import ConfigError, Refused
from rollback_cli.files import TEMP_PREFIX
from rollback_cli.log import get_logger
from rollback_cli.postgres import registry
from rollback_cli.postgres.catalog import alembic_temp_tables, database_oid
from rollback_cli.postgres.connection import connect, maintenance_connection
from rollback_cli.postgres.ddl import drop_database, drop_table
from rollback_cli.postgres.lock import lock_holder
from rollback_cli.postgres.swap import repair_interrupted_swaps
from rollback_cli.rollback.guard import confirm_protected
from rollback_cli.storage import LocalStorage, open_storage

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import RunOptions, StorageConfig, Target
    from rollback_cli.storage import Storage

# A temp file this old belongs to a run that was interrupted, not to one in progress.
STALE_TEMP_SECONDS = 3600.0

__all__ = ["TEMP_PREFIX", "CleanupReport", "cleanup_artifacts", "kept_databases"]


def kept_databases(conn: PgConnection, dbname: str) -> list[registry.Artifact]:
    """Databases our rollbacks of ``dbname`` kept (by their record), newest first."""
    return registry.artifacts_of(conn, dbname, registry.KEPT)


def undo_candidate(conn: PgConnection, dbname: str) -> registry.Artifact | None:
    """The database kept by the most recent rollback of ``dbname``: the one whose record
    says it was replaced by the database now live under that name."""
    live_oid = database_oid(conn, dbname)
    for artifact in kept_databases(conn, dbname):
        if live_oid is not None and artifact.record.replaced_by == live_oid:
            return artifact
    return None


def kept_databases_if_reachable(target: Target | None) -> list[dict[str, str | None]]:
    """The pre-rollback databases `rollback undo` can swap back, newest first, when a
    database is configured and reachable; [] otherwise (listing backups needs no server)."""
    if target is None:
        return []
    try:
        admin = maintenance_connection(target.conninfo)
    except ConfigError as exc:
        get_logger().info("pre-rollback databases not listed", reason=exc.one_line())
        return []
    try:
        kept = kept_databases(admin, target.dbname)
    finally:
        admin.close()
    return [{"name": a.name, "created_at": a.record.created_at} for a in kept]


def repair(target: Target) -> list[str]:
    """Finish or undo the swaps of ``target`` that a dead run left half-way, through the
    maintenance database (the target itself may refuse connections)."""
    admin = maintenance_connection(target.conninfo)
    try:
        actions = repair_interrupted_swaps(admin, target.dbname)
    finally:
        admin.close()
    for action in actions:
        get_logger().warning("repaired", action=action)
    return actions


def stray_copies(conn: PgConnection, dbname: str) -> list[str]:
    """Scratch and verify databases of ``dbname`` whose run has ended."""
    return [
        a.name
        for a in registry.artifacts_of(
            conn, dbname, registry.SCRATCH, registry.VERIFY, registry.REHEARSAL
        )
        if not registry.run_is_alive(conn, a.record)
    ]


@dataclass
class CleanupReport:
    databases: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def cleanup_artifacts(
    target: Target,
    storage_config: StorageConfig,
    run: RunOptions,
    *,
    keep_days: float,
    temp_age_seconds: float = STALE_TEMP_SECONDS,
) -> CleanupReport:
    """Drop kept pre-rollback databases past retention, stray scratch databases (when no
    rollback is running), Alembic batch temp tables, and temp files of interrupted runs.

    Protected environments need confirmation (see :func:`confirm_protected`) unless this
    is a dry run, which removes nothing and reports what would go."""
    if not run.dry_run:
        confirm_protected(target, run, "cleanup-artifacts")
    storage = open_storage(storage_config, target.environment)
    try:
        report = CleanupReport()
        _cleanup_databases(target, keep_days, run.dry_run, report)
        report.tables = _cleanup_temp_tables(target, run.dry_run)
        report.files = _cleanup_files(storage, storage_config, temp_age_seconds, run.dry_run)
    finally:
        storage.close()
    return report


def _cleanup_databases(
    target: Target, keep_days: float, dry_run: bool, report: CleanupReport
) -> None:
    logger = get_logger()
    dbname = target.dbname
    cutoff = datetime.now(timezone.utc).timestamp() - keep_days * 86400
    admin = maintenance_connection(target.conninfo)
    try:
        holder = lock_holder(admin, dbname)
        if holder is not None:
            raise Refused(
                f"a rollback of {dbname} is running ({holder}); its scratch databases are in use"
            )
        if not dry_run:
            report.repaired = repair_interrupted_swaps(admin, dbname)
        for artifact in kept_databases(admin, dbname):
            if datetime.fromisoformat(artifact.record.created_at).timestamp() < cutoff:
                report.databases.append(artifact.name)
            else:
                report.kept.append(artifact.name)
        report.databases += stray_copies(admin, dbname)
        for name in report.databases:
            if not dry_run:
                drop_database(admin, name)
            logger.info("would drop database" if dry_run else "dropped database", database=name)
    finally:
        admin.close()


def _cleanup_temp_tables(target: Target, dry_run: bool) -> list[str]:
    conn = connect(target.conninfo)
    removed = []
    try:
        for schema_name, table in alembic_temp_tables(conn):
            if not dry_run:
                drop_table(conn, schema_name, table)
            removed.append(f"{schema_name}.{table}")
            get_logger().info(
                "would drop table" if dry_run else "dropped table", table=f"{schema_name}.{table}"
            )
    finally:
        conn.close()
    return removed


def _cleanup_files(
    storage: Storage, config: StorageConfig, temp_age_seconds: float, dry_run: bool
) -> list[str]:
    files = storage.cleanup_incomplete(temp_age_seconds, dry_run=dry_run)
    if storage.local_path("") != config.backup_dir.resolve():
        # A remote storage (or another directory) stages its uploads in the backup dir.
        staging = LocalStorage(config.backup_dir)
        files += staging.cleanup_incomplete(temp_age_seconds, dry_run=dry_run)
    for name in files:
        get_logger().info("would remove temp file" if dry_run else "removed temp file", file=name)
    return files
