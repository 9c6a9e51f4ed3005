"""The Python face of db-rollback: one function per command.

Each function takes explicit, typed inputs (a :class:`~rollback_cli.settings.Target`, a
:class:`~rollback_cli.settings.StorageConfig`, :class:`~rollback_cli.settings.RunOptions`),
enforces every guard itself (production confirmation, cross-environment refusal, locks)
and returns a typed result whose ``to_document()`` is the JSON document ``--json`` prints.
Failures raise :class:`~rollback_cli.errors.RollbackError` subclasses whose ``exit_code``
is the one the command line documents. Logging is silent until
:func:`rollback_cli.log.configure` is called.

Example::

    from rollback_cli import api
    from rollback_cli.settings import RunOptions, StorageConfig, Target

    target = Target.resolve("postgresql://app@localhost/shop", environment="staging")
    storage = StorageConfig(backup_dir=Path("backups"))
    created = api.backup_create(target, storage)
    api.rollback_data(target, storage, created.backup.key)
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli import API
from rollback_cli.errors import UsageError
from rollback_cli.settings import RunOptions, StorageConfig, Target

# Each function imports the pipeline it runs when it runs: a command loads only what it
# uses, so the command line starts fast.
if TYPE_CHECKING:
    from rollback_cli.backups.catalog import BackupEntry
    from rollback_cli.backups.create import BackupRequest, BackupResult
    from rollback_cli.backups.drill import DrillReport
    from rollback_cli.backups.dump import ProgressCallback
    from rollback_cli.backups.verify import VerifyResult
    from rollback_cli.checks import Check
    from rollback_cli.rollback.artifacts import CleanupReport
    from rollback_cli.rollback.lifecycle import RollbackOptions, RollbackResult
    from rollback_cli.rollback.migrations import Timeouts as Timeouts

__all__ = list(API)  # the package lists the API once, for both import paths

NO_RUN = RunOptions()

#: types of the API that live in the pipelines' modules, loaded on first use
_LAZY_TYPES = {
    "BackupRequest": "rollback_cli.backups.create",
    "RollbackOptions": "rollback_cli.rollback.lifecycle",
    "RollbackResult": "rollback_cli.rollback.lifecycle",
    "Timeouts": "rollback_cli.rollback.migrations",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_TYPES:
        return getattr(importlib.import_module(_LAZY_TYPES[name]), name)
    raise AttributeError(f"module 'rollback_cli.api' has no attribute {name!r}")


# --- backups ------------------------------------------------------------------------------


@dataclass
class BackupCreated:
    """A backup that was stored, or (dry run) the plan of one."""

    backup: BackupResult | None = None
    plan: list[dict[str, str]] | None = None

    def to_document(self) -> dict[str, Any]:
        if self.backup is None:
            return {"plan": self.plan}
        created, manifest = self.backup, self.backup.manifest
        return {
            "backup_file": str(created.local_path) if created.local_path else created.key,
            "backup_key": created.key,
            "backup_sha256": manifest.sha256,
            "backup_uri": created.uri,
            "backup_size": manifest.size,
            "revision_before": manifest.alembic_revision,
            "revision_after": manifest.alembic_revision,
            "row_counts": manifest.row_counts,
        }


def backup_create(
    target: Target,
    storage: StorageConfig,
    request: BackupRequest | None = None,
    *,
    run: RunOptions = NO_RUN,
    progress: ProgressCallback | None = None,
) -> BackupCreated:
    """Dump ``target`` with a snapshot-consistent manifest into ``storage``.

    ``request.lock_timeout_ms`` (default 5000; 0 waits forever) bounds every wait for a table
    lock another session holds; reaching it raises OperationFailed (exit 5), nothing written.
    """
    from rollback_cli.backups.create import BackupRequest, create_backup, plan_backup
    from rollback_cli.storage import open_storage

    request = request or BackupRequest()
    store = open_storage(storage, target.environment)
    try:
        if run.dry_run:
            return BackupCreated(plan=plan_backup(target, store, request))
        return BackupCreated(
            backup=create_backup(
                target,
                store,
                request,
                keep_local=storage.keep_local,
                progress=progress,
                signing=storage.signing,
            )
        )
    finally:
        store.close()


@dataclass
class BackupListing:
    backups: list[BackupEntry]
    kept_databases: list[dict[str, str | None]]
    listed_at: float = field(default_factory=time.time)

    def to_document(self) -> dict[str, Any]:
        rows = []
        for entry in self.backups:
            row = entry.to_dict()
            created = entry.created
            row["age_seconds"] = (
                max(0, round(self.listed_at - created.timestamp())) if created else None
            )
            rows.append(row)
        return {"outcome": "success", "backups": rows, "kept_databases": self.kept_databases}


def backup_list(
    storage: StorageConfig, environment: str, target: Target | None = None
) -> BackupListing:
    """Backups in ``storage`` (and its staging directory), newest first; with a reachable
    ``target``, also the pre-rollback databases ``rollback undo`` can swap back."""
    from rollback_cli.backups.catalog import list_backups
    from rollback_cli.rollback.artifacts import kept_databases_if_reachable
    from rollback_cli.storage import open_storage

    store = open_storage(storage, environment)
    try:
        entries = list_backups(store)
    finally:
        store.close()
    return BackupListing(entries, kept_databases_if_reachable(target))


@dataclass
class BackupVerified:
    result: VerifyResult
    restore_test_planned: bool = False
    dry_run: bool = False

    def to_document(self) -> dict[str, Any]:
        result = self.result
        plan = None
        if self.restore_test_planned:
            plan = [
                {
                    "step": "restore-test",
                    "detail": f"restore {result.key} into a scratch database, compare row "
                    "counts and revision with the manifest, drop it",
                }
            ]
        return {
            "outcome": "dry_run" if self.dry_run else "success",
            "backup_file": result.key,
            "backup_sha256": result.manifest.sha256,
            "backup_uri": result.uri,
            "revision_after": result.manifest.alembic_revision,
            "checks": [c.to_dict() for c in result.checks],
            "restore_test": result.restore_test,
            "plan": plan,
        }


def backup_verify(
    storage: StorageConfig,
    environment: str,
    ref: str,
    *,
    target: Target | None = None,
    pg_bin_dir: Path | None = None,
    restore_test: bool = False,
    run: RunOptions = NO_RUN,
) -> BackupVerified:
    """Check a backup's manifest, size, sha256 and readability; ``restore_test`` also
    restores it into a scratch database on ``target``'s server (a dry run only plans that,
    since it creates a database)."""
    from rollback_cli.backups.verify import verify_backup

    if restore_test and target is None and not run.dry_run:
        raise UsageError("a restore test needs a database server: pass a target")
    result = verify_backup(
        storage,
        environment,
        ref,
        pg_bin_dir=target.pg_bin_dir if target else pg_bin_dir,
        target=target if restore_test and not run.dry_run else None,
    )
    return BackupVerified(result, restore_test and run.dry_run, run.dry_run)


@dataclass
class BackupsCleaned:
    removed: list[BackupEntry]
    kept: list[BackupEntry]
    #: kept only because each is the newest valid full backup of its database in its
    #: location, which cleanup never removes (also listed in ``kept``; a log event says why)
    protected: list[BackupEntry] = field(default_factory=list)

    def to_document(self) -> dict[str, Any]:
        return {"removed": [e.key for e in self.removed], "kept": [e.key for e in self.kept]}


def backup_cleanup(
    storage: StorageConfig,
    environment: str,
    *,
    older_than_seconds: float,
    keep_last: int = 1,
    run: RunOptions = NO_RUN,
) -> BackupsCleaned:
    """Apply retention to ``environment``'s backups; a dry run removes nothing.

    ``keep_last`` counts per location, database and backup type (full, schema, data); the
    newest valid full backup of each database in each location is never removed."""
    from rollback_cli.backups.catalog import cleanup_backups
    from rollback_cli.storage import open_storage

    store = open_storage(storage, environment)
    try:
        result = cleanup_backups(
            store,
            environment=environment,
            older_than_seconds=older_than_seconds,
            keep_last=keep_last,
            dry_run=run.dry_run,
        )
    finally:
        store.close()
    return BackupsCleaned(result.removed, result.kept, result.protected)


@dataclass
class DrillResult:
    """A restore drill that passed: the backup, its age, the restore time, what the
    restored copy held and every check's verdict."""

    report: DrillReport

    def to_document(self) -> dict[str, Any]:
        report, manifest = self.report, self.report.manifest
        return {
            "outcome": "dry_run" if report.plan is not None else "success",
            "backup_file": report.key,
            "backup_sha256": manifest.sha256,
            "backup_uri": report.uri,
            "revision_after": manifest.alembic_revision,
            "drill": report.to_dict(),
            "checks": [c.to_dict() for c in report.checks],
            "plan": report.plan,
        }


def drill(
    target: Target,
    storage: StorageConfig,
    *,
    backup_ref: str | None = None,
    backup_type: str = "full",
    max_age_seconds: int | None = None,
    checks_file: Path | None = None,
    run: RunOptions = NO_RUN,
) -> DrillResult:
    """Restore the newest backup of ``target``'s database (of ``backup_type``), or the one
    ``backup_ref`` names, into a scratch database on its server; compare it with the
    manifest, run ``checks_file``'s queries read-only against it, drop it.

    Raises BackupError (exit 4) when there is no such backup, it is older than
    ``max_age_seconds``, fails verification or its restore, or the restored copy fails a
    check. The live database is only read. A bad checks file is a UsageError (exit 2),
    raised before anything else happens. A dry run picks, age-checks and verifies the
    backup and returns the plan; it makes no scratch database."""
    from rollback_cli.backups.drill import DrillRequest, run_drill
    from rollback_cli.rollback.validate import read_checks_file

    checks = read_checks_file(checks_file) if checks_file is not None else []
    request = DrillRequest(
        backup_ref=backup_ref,
        backup_type=backup_type,
        max_age_seconds=max_age_seconds,
        checks=checks,
        dry_run=run.dry_run,
    )
    return DrillResult(run_drill(target, storage, request))


# --- preflight and validation -------------------------------------------------------------


@dataclass
class StatusResult:
    checks: list[Check]
    current_revision: str | None
    head_revision: str | None

    def to_document(self) -> dict[str, Any]:
        return {
            "outcome": "success",
            "checks": [c.to_dict() for c in self.checks],
            "revision_before": self.current_revision,
            "revision_after": self.current_revision,
            "head_revision": self.head_revision,
        }


def status(target: Target, *, require_alembic_config: bool = False) -> StatusResult:
    """Preflight: connection, versions, the client tools (pg_dump, pg_restore and psql in
    one directory), privileges, revisions, locks, sessions. Raises ConfigError (exit 3) or
    Refused (exit 7) when a rollback could not run; the error's ``report`` holds every
    check. ``require_alembic_config``: a missing ``target.alembic_config`` fails."""
    from rollback_cli.rollback.status import preflight

    report = preflight(target, require_alembic_config=require_alembic_config)
    return StatusResult(report.checks, report.current_revision, report.head_revision)


@dataclass
class ValidationResult:
    """The checks that ran; in a dry run the checks file's queries are listed as planned
    (status ``info``, ``planned: true``) and none of them ran."""

    checks: list[Check]
    dry_run: bool = False

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "outcome": "dry_run" if self.dry_run else "success",
            "validation": [c.to_dict() for c in self.checks],
        }
        if self.dry_run:
            document["plan"] = [
                {"step": f"check {c.name}", "detail": c.detail}
                for c in self.checks
                if c.extra.get("planned")
            ]
        return document


def validate(
    target: Target,
    storage: StorageConfig,
    *,
    backup_ref: str | None = None,
    expected_revision: str | None = None,
    checks_file: Path | None = None,
    run: RunOptions = NO_RUN,
) -> ValidationResult:
    """Connectivity, revision, the manifest's row counts, SQL checks; OperationFailed
    (exit 5) when any fails. The SQL checks run read-only, each in its own transaction
    under a statement timeout; a dry run reads and parses them but does not run them.
    A table the role may not read is a ConfigError (exit 3)."""
    from rollback_cli.rollback.validate import validate as _validate

    return ValidationResult(
        _validate(
            target,
            storage,
            backup_ref=backup_ref,
            expected_revision=expected_revision,
            checks_file=checks_file,
            dry_run=run.dry_run,
        ),
        dry_run=run.dry_run,
    )


@dataclass
class ArtifactsCleaned:
    report: CleanupReport

    def to_document(self) -> dict[str, Any]:
        return {
            "databases": self.report.databases,
            "tables": self.report.tables,
            "files": self.report.files,
            "kept_databases": self.report.kept,
        }


def cleanup_artifacts(
    target: Target,
    storage: StorageConfig,
    *,
    keep_days: float = 7,
    temp_age_seconds: float | None = None,
    run: RunOptions = NO_RUN,
) -> ArtifactsCleaned:
    """Drop kept databases past ``keep_days``, stray scratch databases, Alembic temp tables
    and temp files (``temp_age_seconds``: older than that; default an hour); needs
    confirmation in protected environments."""
    from rollback_cli.rollback.artifacts import STALE_TEMP_SECONDS
    from rollback_cli.rollback.artifacts import cleanup_artifacts as _cleanup_artifacts

    if temp_age_seconds is None:
        temp_age_seconds = STALE_TEMP_SECONDS
    return ArtifactsCleaned(
        _cleanup_artifacts(
            target, storage, run, keep_days=keep_days, temp_age_seconds=temp_age_seconds
        )
    )


# --- rollbacks ----------------------------------------------------------------------------


def rollback_data(
    target: Target,
    storage: StorageConfig,
    backup_ref: str,
    options: RollbackOptions | None = None,
    *,
    run: RunOptions = NO_RUN,
) -> RollbackResult:
    """Restore a verified backup in place of the live database (swap or in-place)."""
    from rollback_cli.rollback.data import DataRollback
    from rollback_cli.rollback.lifecycle import RollbackOptions, rollback_context, run_rollback

    ctx = rollback_context(target, storage, run, options or RollbackOptions())
    return run_rollback(DataRollback(ctx, backup_ref))


def rollback_schema(
    target: Target,
    storage: StorageConfig,
    to_revision: str,
    options: RollbackOptions | None = None,
    *,
    run: RunOptions = NO_RUN,
) -> RollbackResult:
    """Downgrade with Alembic (in-process) to an ancestor of the current revision."""
    from rollback_cli.rollback.lifecycle import RollbackOptions, rollback_context, run_rollback
    from rollback_cli.rollback.schema import SchemaRollback

    ctx = rollback_context(target, storage, run, options or RollbackOptions())
    return run_rollback(SchemaRollback(ctx, to_revision))


def rollback_full(
    target: Target,
    storage: StorageConfig,
    to_revision: str,
    backup_ref: str | None = None,
    options: RollbackOptions | None = None,
    *,
    run: RunOptions = NO_RUN,
) -> RollbackResult:
    """The data rollback from ``backup_ref`` (when given), then the schema rollback."""
    from rollback_cli.rollback.full import FullRollback
    from rollback_cli.rollback.lifecycle import RollbackOptions, rollback_context, run_rollback
    from rollback_cli.rollback.schema import SchemaRollback

    ctx = rollback_context(target, storage, run, options or RollbackOptions())
    if backup_ref is None:
        result = run_rollback(SchemaRollback(ctx, to_revision))
        result.kind = "full"
        return result
    return run_rollback(FullRollback(ctx, backup_ref, to_revision))


def rollback_undo(
    target: Target,
    storage: StorageConfig,
    options: RollbackOptions | None = None,
    *,
    run: RunOptions = NO_RUN,
) -> RollbackResult:
    """Swap the database kept by the last data rollback back in."""
    from rollback_cli.rollback.lifecycle import RollbackOptions, rollback_context, run_rollback
    from rollback_cli.rollback.undo import UndoRollback

    ctx = rollback_context(target, storage, run, options or RollbackOptions())
    return run_rollback(UndoRollback(ctx))
