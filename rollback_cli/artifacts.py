"""Leftovers of rollbacks: kept pre-rollback databases, stray scratch databases, temp files."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import ConfigError, Refused
from rollback_cli.log import get_logger
from rollback_cli.storage.local import LocalStorage

if TYPE_CHECKING:
    from rollback_cli.settings import Settings
    from rollback_cli.storage import Storage

# A temp file this old belongs to a run that was interrupted, not to one in progress.
STALE_TEMP_SECONDS = 3600.0

PRE_MARK = "_pre_"
SCRATCH_MARK = "_rb_"
VERIFY_MARK = "_verify_"
STAMP_FORMAT = "%Y%m%d%H%M%S"
_STAMP = re.compile(r"(\d{14})$")


def stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(timezone.utc)).strftime(STAMP_FORMAT)


def derived_name(dbname: str, mark: str, when: datetime | None = None) -> str:
    """``{db}{mark}{ts}``, shortened to fit PostgreSQL's 63-byte identifiers."""
    suffix = f"{mark}{stamp(when)}"
    base = dbname.encode("utf-8")[: 63 - len(suffix)].decode("utf-8", "ignore")
    return base + suffix


def free_derived_name(conn: Any, dbname: str, mark: str) -> str:
    """A derived name no database has yet (names carry seconds: wait for the next one)."""
    for _ in range(5):
        name = derived_name(dbname, mark)
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                return name
        time.sleep(1.0)
    raise Refused(f"cannot find a free name for {name}")


def stamp_of(name: str) -> datetime | None:
    match = _STAMP.search(name)
    if not match:
        return None
    return datetime.strptime(match.group(1), STAMP_FORMAT).replace(tzinfo=timezone.utc)


def _databases_with(conn: Any, dbname: str, mark: str) -> list[str]:
    prefix = derived_name(dbname, mark)[:-14]
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))
        names = [str(r[0]) for r in cur.fetchall() if stamp_of(str(r[0])) is not None]
    return sorted(names, key=lambda n: stamp_of(n) or datetime.min, reverse=True)


def kept_databases(conn: Any, dbname: str) -> list[str]:
    """Pre-rollback copies of ``dbname``, newest first."""
    return _databases_with(conn, dbname, PRE_MARK)


def kept_databases_if_reachable(settings: Settings) -> list[dict[str, str | None]]:
    """The pre-rollback databases `rollback undo` can swap back, newest first, when a
    database is configured and reachable; [] otherwise (listing backups needs no server)."""
    from rollback_cli.restore import maintenance_connection

    try:
        conninfo = settings.conninfo()
        admin = maintenance_connection(conninfo)
    except ConfigError as exc:
        get_logger().info("pre-rollback databases not listed", reason=exc.one_line())
        return []
    try:
        names = kept_databases(admin, conninfo.dbname)
    finally:
        admin.close()
    return [
        {"name": name, "created_at": (stamp_of(name) or datetime.min).isoformat()} for name in names
    ]


def scratch_databases(conn: Any, dbname: str) -> list[str]:
    return _databases_with(conn, dbname, SCRATCH_MARK) + _databases_with(conn, dbname, VERIFY_MARK)


@dataclass
class CleanupReport:
    databases: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def cleanup_artifacts(
    settings: Settings,
    *,
    keep_days: float,
    storage: Storage,
    dry_run: bool,
    temp_age_seconds: float = STALE_TEMP_SECONDS,
) -> CleanupReport:
    """Drop kept pre-rollback databases past retention, stray scratch databases (when no
    rollback is running), Alembic batch temp tables, and temp files of interrupted runs."""
    from rollback_cli import pg
    from rollback_cli.lock import lock_holder
    from rollback_cli.restore import drop_database, maintenance_connection

    logger = get_logger()
    report = CleanupReport()
    conninfo = settings.conninfo()
    dbname = conninfo.dbname
    cutoff = datetime.now(timezone.utc).timestamp() - keep_days * 86400
    verb = "would drop" if dry_run else "dropped"
    admin = maintenance_connection(conninfo)
    try:
        holder = lock_holder(admin, dbname)
        if holder is not None:
            raise Refused(
                f"a rollback of {dbname} is running ({holder}); its scratch databases are in use"
            )
        for name in kept_databases(admin, dbname):
            when = stamp_of(name)
            if when is not None and when.timestamp() < cutoff:
                report.databases.append(name)
            else:
                report.kept.append(name)
        report.databases += scratch_databases(admin, dbname)
        for name in report.databases:
            if not dry_run:
                drop_database(admin, name)
            logger.info(f"{verb} database", database=name)
    finally:
        admin.close()
    conn = pg.connect(conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT schemaname, tablename FROM pg_tables "
                "WHERE starts_with(tablename, '_alembic_tmp_')"
            )
            tables = [(str(s), str(t)) for s, t in cur.fetchall()]
            for schema_name, table in tables:
                qualified = f"{pg.quote_ident(schema_name)}.{pg.quote_ident(table)}"
                if not dry_run:
                    cur.execute(f"DROP TABLE IF EXISTS {qualified}")
                report.tables.append(f"{schema_name}.{table}")
                logger.info(f"{verb} table", table=f"{schema_name}.{table}")
    finally:
        conn.close()
    report.files = storage.cleanup_incomplete(temp_age_seconds, dry_run=dry_run)
    if storage.local_path("") != settings.backup_dir.resolve():
        # A remote storage (or another directory) stages its uploads in the backup dir.
        staging = LocalStorage(settings.backup_dir)
        report.files += staging.cleanup_incomplete(temp_age_seconds, dry_run=dry_run)
    for name in report.files:
        logger.info("removed temp file" if not dry_run else "would remove temp file", file=name)
    return report
