"""The restore drill: restore a backup into a scratch database, check it, drop it, report.

A backup is trusted only once it has been restored. The drill picks the newest backup of the
target database (or the one named), refuses it when it is older than the allowed age,
verifies it (:func:`~rollback_cli.backups.verify.prepared_backup`: manifest, size,
signature, sha256, readability), restores it into a registered scratch database made like
the live one (:func:`~rollback_cli.backups.scratch.restored_copy`), compares it with the
manifest, runs the operator's SQL checks read-only against it, and drops it. The live
database is only read (its properties, settings and, for a data-only backup, its schema).

Every way the drill can fail is a :class:`~rollback_cli.errors.BackupError` (exit 4): no
backup, a stale one, a corrupt one, one that does not restore, one whose restored copy does
not match its manifest or fails a check.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rollback_cli.backups.catalog import BackupEntry, list_backups, locate, read_manifest
from rollback_cli.backups.manifest import Manifest, backup_key_for_manifest, is_manifest_key
from rollback_cli.backups.scratch import RestoreFailed, restored_copy
from rollback_cli.backups.verify import VerifiedBackup, prepared_backup
from rollback_cli.checks import WARNING, Check, failures, summary
from rollback_cli.errors import BackupError, UsageError
from rollback_cli.log import get_logger, step
from rollback_cli.postgres import registry
from rollback_cli.postgres.checks import CHECK_TIMEOUT_MS, run_read_only_check
from rollback_cli.postgres.connection import connect, maintenance_connection
from rollback_cli.storage import open_storage

if TYPE_CHECKING:
    from rollback_cli.settings import StorageConfig, Target
    from rollback_cli.storage import Storage

#: seconds in one unit of a ``--max-age`` value, largest first
AGE_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_AGE = re.compile(r"([1-9][0-9]{0,8})([smhdw])")
BACKUP_TYPES = ("full", "schema", "data")


def parse_max_age(text: str) -> int:
    """``--max-age``: a whole positive number and one unit, ``s``, ``m``, ``h``, ``d`` or
    ``w`` (``90m``, ``26h``, ``2d``), in seconds. Anything else is a UsageError (exit 2):
    no bare numbers, no fractions, no spaces, no zero, no mixed units."""
    match = _AGE.fullmatch(text)
    if match is None:
        raise UsageError(
            f"cannot read age {text!r}: expected a whole number and a unit s, m, h, d or w "
            "(for example 26h, 2d or 90m)"
        )
    return int(match.group(1)) * AGE_UNITS[match.group(2)]


def max_age_text(seconds: int) -> str:
    """``seconds`` in the largest unit that divides it: what :func:`parse_max_age` reads
    back to the same number (``93600`` is ``26h``, ``172800`` is ``2d``)."""
    for unit, size in AGE_UNITS.items():
        if seconds > 0 and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_age(seconds: float) -> str:
    """An age for people, in its two largest units: ``45s``, ``1h 30m``, ``3d 2h``."""
    remaining = max(0, int(seconds))
    if remaining < 60:
        return f"{remaining}s"
    parts: list[str] = []
    for unit in ("d", "h", "m"):
        size = AGE_UNITS[unit]
        if remaining >= size:
            parts.append(f"{remaining // size}{unit}")
            remaining %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


@dataclass(frozen=True)
class DrillRequest:
    """What to drill and how: ``backup_ref`` names a backup (a path, a name in the storage
    or a storage URI); without it the newest backup of the target database of
    ``backup_type`` is drilled."""

    backup_ref: str | None = None
    backup_type: str = "full"
    #: fail (exit 4) when the drilled backup is older than this many seconds
    max_age_seconds: int | None = None
    #: (name, SQL) of the operator's checks, each returning one boolean
    checks: Sequence[tuple[str, str]] = ()
    check_timeout_ms: int = CHECK_TIMEOUT_MS
    #: choose, age-check and verify the backup, then stop: no scratch database is made
    dry_run: bool = False


@dataclass
class Restored:
    """What the restore of a drill found: the scratch database (dropped since), how long
    restoring it and comparing it with the manifest took, and what it held."""

    scratch_database: str
    restore_seconds: float
    tables: int
    rows: int
    alembic_revisions: list[str]


@dataclass
class DrillReport:
    """One drill: which backup, how old, how long its restore took, what the restored copy
    held and the verdict of every check (all passed, or the drill raised). A dry run has
    no ``restored`` and lists its ``plan`` instead."""

    key: str
    uri: str
    manifest: Manifest
    selected: str  # "newest" or "named"
    age_seconds: float
    max_age_seconds: int | None
    restored: Restored | None = None
    total_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    plan: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        manifest, restored = self.manifest, self.restored
        return {
            "backup": self.key,
            "uri": self.uri,
            "selected": self.selected,
            "database": manifest.database,
            "host": manifest.host,
            "type": manifest.type,
            "format": manifest.format,
            "size": manifest.size,
            "created_at": manifest.created_at,
            "age_seconds": round(self.age_seconds),
            "age": format_age(self.age_seconds),
            "max_age_seconds": self.max_age_seconds,
            "max_age": max_age_text(self.max_age_seconds) if self.max_age_seconds else None,
            "scratch_database": restored.scratch_database if restored else None,
            "scratch_dropped": restored is not None,
            "restore_seconds": round(restored.restore_seconds, 3) if restored else None,
            "total_seconds": round(self.total_seconds, 3),
            "tables": restored.tables if restored else None,
            "rows": restored.rows if restored else None,
            "alembic_revisions": restored.alembic_revisions if restored else None,
        }


def run_drill(
    target: Target,
    config: StorageConfig,
    request: DrillRequest,
    *,
    now: datetime | None = None,
) -> DrillReport:
    """Drill the backup ``request`` asks for on ``target``'s server; raises BackupError
    (exit 4) when there is none, it is stale or corrupt, does not restore, or fails a
    check. The scratch database is dropped whatever happens."""
    if request.backup_type not in BACKUP_TYPES:
        raise UsageError(f"backup type must be one of {', '.join(BACKUP_TYPES)}")
    started = time.monotonic()
    storage, key, selected, skipped = _choose(target, config, request)
    try:
        with step("drill", backup=key, selected=selected):
            manifest = read_manifest(storage, key)
            age = ((now or datetime.now(timezone.utc)) - manifest.created).total_seconds()
            _check_age(key, age, request.max_age_seconds, selected)
            with prepared_backup(
                storage, key, pg_bin_dir=target.pg_bin_dir, signing=config.signing
            ) as backup:
                report = DrillReport(
                    key, backup.uri, manifest, selected, age, request.max_age_seconds
                )
                if request.dry_run:
                    report.checks = [*skipped, *backup.checks]
                    report.plan = _plan(target, key, request)
                else:
                    report.restored, checks = _restore_and_check(
                        target, backup, request, signed=bool(config.signing)
                    )
                    report.checks = [*skipped, *checks]
    finally:
        storage.close()
    report.total_seconds = time.monotonic() - started
    get_logger().info("drill planned" if request.dry_run else "drill passed", **report.to_dict())
    return report


def _plan(target: Target, key: str, request: DrillRequest) -> list[dict[str, str]]:
    steps = [
        {
            "step": "restore",
            "detail": f"restore {key} into a scratch database on the server of "
            f"{target.dbname}, compare row counts and revision with the manifest",
        }
    ]
    steps += [
        {"step": f"check {name}", "detail": "read-only, on the scratch database"}
        for name, _ in request.checks
    ]
    steps.append({"step": "drop", "detail": "drop the scratch database"})
    return steps


# --- choosing the backup -------------------------------------------------------------------


def _choose(
    target: Target, config: StorageConfig, request: DrillRequest
) -> tuple[Storage, str, str, list[Check]]:
    """(storage, key, "named"|"newest", warnings) of the backup to drill."""
    if request.backup_ref is not None:
        storage, key = locate(config, target.environment, request.backup_ref)
        if is_manifest_key(key) and storage.stat(backup_key_for_manifest(key)) is not None:
            key = backup_key_for_manifest(key)  # the manifest's path was given: its backup
        return storage, key, "named", []
    storage = open_storage(config, target.environment)
    try:
        entry, skipped = newest_backup(
            list_backups(storage), storage.location, target, request.backup_type
        )
    except BaseException:
        storage.close()
        raise
    if entry is None:
        where = storage.uri()
        storage.close()
        raise BackupError(
            f"no {request.backup_type} backup of database {target.dbname} "
            f"(environment {target.environment}) in {where}: nothing to drill",
            hint=f"{len(skipped)} backup(s) of the environment have no readable manifest"
            if skipped
            else None,
        )
    warnings = []
    if skipped:
        warnings.append(
            Check(
                "unreadable newer backups",
                WARNING,
                f"{len(skipped)} newer backup(s) of this environment have no readable "
                f"manifest and could not be drilled: {', '.join(skipped[:5])}",
            )
        )
    return storage, entry.key, "newest", warnings


def newest_backup(
    entries: list[BackupEntry], location: str, target: Target, backup_type: str
) -> tuple[BackupEntry | None, list[str]]:
    """The newest backup of ``target``'s database and ``backup_type`` among ``entries``
    (newest first) in ``location``, and the names of entries of the environment whose
    database cannot be told (no readable manifest) that are newer than it (all of them
    when there is none).

    A backup is the target's when its manifest names the target's environment and database
    name. Backups of a database of that name on several servers are told apart by the
    manifest's ``host``, as the catalog does: the target's own host when it has backups,
    else the only host there is; with several other hosts the drill cannot tell which is
    meant and a backup must be named. The newest one is drilled even when its listing
    already shows a problem (missing file, wrong size): a drill that quietly fell back to an
    older backup would hide the very failure it exists to find.
    """
    own_prefix = f"backup_{target.environment}_"
    ours: list[BackupEntry] = []
    unknown: list[BackupEntry] = []
    for entry in entries:
        if entry.location != location:
            continue  # a remote storage's local staging copies are not what a rollback uses
        manifest = entry.manifest
        if manifest is None:
            if entry.key.startswith(own_prefix):
                unknown.append(entry)
            continue
        if (
            manifest.environment == target.environment
            and manifest.database == target.dbname
            and manifest.type == backup_type
        ):
            ours.append(entry)
    hosts = {_host(e.manifest) for e in ours} - {""}
    own_host = target.conninfo.display_host
    if own_host in hosts:
        ours = [e for e in ours if _host(e.manifest) in (own_host, "")]
    elif len(hosts) > 1:
        raise UsageError(
            f"backups of database {target.dbname} from several servers are stored here "
            f"({', '.join(sorted(hosts))}) and none from {own_host}: name the backup to drill"
        )
    if not ours:
        return None, [e.key for e in unknown]
    newest = ours[0]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    newer_unknown = [e.key for e in unknown if (e.created or oldest) >= (newest.created or oldest)]
    return newest, newer_unknown


def _host(manifest: Manifest | None) -> str:
    host = manifest.host if manifest is not None else ""
    return host if isinstance(host, str) else ""


def _check_age(key: str, age: float, max_age: int | None, selected: str) -> None:
    if max_age is None or age <= max_age:
        return
    which = "the newest backup, " if selected == "newest" else ""
    raise BackupError(
        f"backup {key} ({which}made {format_age(age)} ago) is older than --max-age "
        f"{max_age_text(max_age)}",
        hint="are backups still being made and stored here?" if which else None,
    )


# --- restoring and checking ----------------------------------------------------------------


def _restore_and_check(
    target: Target, backup: VerifiedBackup, request: DrillRequest, *, signed: bool
) -> tuple[Restored, list[Check]]:
    manifest = backup.manifest
    logger = get_logger()
    admin = maintenance_connection(target.conninfo)
    try:
        restore_started = time.monotonic()
        try:
            with restored_copy(
                admin,
                target,
                backup.tools,
                backup.local,
                manifest,
                registry.VERIFY,
                purpose="the restore drill",
            ) as copy:
                restore_seconds = time.monotonic() - restore_started
                comparison = copy.comparison
                checks = [*backup.checks, _manifest_check(comparison)]
                checks += _operator_checks(target, copy.name, request)
                if not copy.no_owner and not signed:
                    checks.append(_superuser_warning())
        except RestoreFailed as exc:
            raise BackupError(f"restore drill of {backup.key} failed: {exc.message}") from None
    finally:
        admin.close()
    for check in checks:
        logger.info("drill check", check=check.name, ok=check.ok, detail=check.detail)
    if failures(checks):
        raise BackupError(f"restore drill of {backup.key} failed: {summary(checks)}")
    restored = Restored(
        scratch_database=copy.name,
        restore_seconds=restore_seconds,
        tables=int(comparison["tables"]),
        rows=int(comparison["rows"]),
        alembic_revisions=list(comparison["alembic_revisions"]),
    )
    return restored, checks


def _manifest_check(comparison: dict[str, Any]) -> Check:
    mismatches: list[str] = comparison["mismatches"]
    if mismatches:
        return Check.of("manifest comparison", False, "; ".join(mismatches[:5]))
    return Check.of(
        "manifest comparison",
        True,
        f"{comparison['tables']} tables, {comparison['rows']} rows and the revision match "
        "the manifest",
    )


def _operator_checks(target: Target, scratch: str, request: DrillRequest) -> list[Check]:
    """The checks file's queries, each read-only in its own transaction, on the copy."""
    if not request.checks:
        return []
    results: list[Check] = []
    with step("drill-checks", scratch_database=scratch, checks=len(request.checks)):
        conn = connect(target.conninfo, scratch)
        try:
            for name, sql in request.checks:
                ok, detail = run_read_only_check(conn, sql, timeout_ms=request.check_timeout_ms)
                results.append(Check.of(name, ok, detail))
        finally:
            conn.close()
    return results


def _superuser_warning() -> Check:
    return Check(
        "restore-role",
        WARNING,
        "the backup's SQL ran with superuser rights and no signing key is configured: "
        "anyone who can write the storage could run SQL as a superuser here (configure "
        "DB_ROLLBACK_SIGNING_KEY, or --restore-url with the database owner)",
    )


__all__ = [
    "DrillReport",
    "DrillRequest",
    "Restored",
    "format_age",
    "max_age_text",
    "newest_backup",
    "parse_max_age",
    "run_drill",
]
