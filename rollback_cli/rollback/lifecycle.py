"""The lifecycle every rollback follows, whatever it changes.

read-only checks (connection, privileges, lock free, versions) → :meth:`Procedure.prepare`
(e.g. a verified backup) → the plan (all a dry run does) → confirmation in protected
environments → lock → safety backup → :meth:`Procedure.apply` → validation → (recovered)
→ the deferred safety backup → lock released. Nothing about the live database changes
before ``apply``.

A procedure whose change keeps the pre-rollback database whole (a swap keeps it under
another name) defers its safety backup: :meth:`Procedure.deferred_safety_source` names that
database, and the lifecycle dumps it once the live database is swapped and validated,
still under the lock. The result reports the time to recovery (start → changed and
validated) apart from the total time.

Data, schema, full and undo rollbacks are procedures plugged into :func:`run_rollback`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli.backups.create import (
    BackupRequest,
    BackupResult,
    check_staging_writable,
    create_backup,
)
from rollback_cli.backups.dump import DumpCancel
from rollback_cli.checks import Check
from rollback_cli.errors import (
    Interrupted,
    ManualAttention,
    Refused,
    RollbackError,
    UsageError,
)
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.catalog import alembic_revisions, owns_database, role_privileges
from rollback_cli.postgres.checks import missing_client_tools
from rollback_cli.postgres.clients import ClientTools, find_client
from rollback_cli.postgres.connection import (
    connect,
    end_run_sessions,
    lock_timeout,
    server_major,
)
from rollback_cli.postgres.lock import lock_holder, rollback_lock
from rollback_cli.rollback.artifacts import repair
from rollback_cli.rollback.guard import confirm_protected
from rollback_cli.rollback.migrations import Timeouts
from rollback_cli.rollback.validate import validate_database
from rollback_cli.storage import open_storage, staging_dir_of

if TYPE_CHECKING:
    from rollback_cli.backups.manifest import Manifest
    from rollback_cli.settings import ConnInfo, RunOptions, StorageConfig, Target

STRATEGIES = ("swap", "in-place")
#: when a swap rollback takes its safety backup: ``after-swap`` dumps the kept database
#: once the restored copy is live (the shortest time to recovery); ``during-restore`` dumps
#: the live database beside the restore (the shortest total, on cores the restore leaves
#: idle); ``auto`` picks per machine (:func:`safety_timing`)
SAFETY_TIMINGS = ("auto", "after-swap", "during-restore")
#: ``auto`` dumps during the restore from this many cores on (a server on this machine):
#: measured at 755 MB on 2 cores, a dump beside ``pg_restore -j2`` cut the total by
#: 12-20% but lengthened the time to recovery by 17-25%, and time to recovery comes first
DURING_RESTORE_MIN_CORES = 4


@dataclass(frozen=True)
class RollbackOptions:
    strategy: str = "swap"
    #: pg_restore --jobs of a swap; None: auto (one per core, at most one per table
    #: holding rows and 8), always within the server's free connection slots
    jobs: int | None = None
    allow_cross_environment: bool = False
    allow_other_database: bool = False
    no_safety_backup: bool = False
    no_rehearsal: bool = False
    #: rehearse on a copy of the live database's data too, not only its schema
    rehearse_with_data: bool = False
    accept_data_loss: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    checks_file: Path | None = None
    #: one of SAFETY_TIMINGS (swap strategy only)
    safety_timing: str = "auto"


def safety_timing(options: RollbackOptions, conninfo: ConnInfo, cores: int) -> str:
    """When a swap rollback takes its safety backup: as asked, or for ``auto``
    during the restore only where the server shares this machine and it has
    :data:`DURING_RESTORE_MIN_CORES` cores (a remote server's cores are unknown: the time
    to recovery is kept first)."""
    if options.safety_timing != "auto":
        return options.safety_timing
    if conninfo.same_machine and cores >= DURING_RESTORE_MIN_CORES:
        return "during-restore"
    return "after-swap"


@dataclass
class RollbackResult:
    kind: str
    database: str
    plan: list[dict[str, str]] = field(default_factory=list)
    revision_before: str | None = None
    revision_after: str | None = None
    safety_backup: BackupResult | None = None
    backup_used: str | None = None
    kept_database: str | None = None
    unavailable_ms: float | None = None
    #: start of the command → the live database changed and validated
    time_to_recovery_ms: float | None = None
    #: start of the command → done, safety backup stored
    total_ms: float | None = None
    #: how long the safety backup took (after recovery when it was deferred)
    safety_backup_ms: float | None = None
    #: the database the safety backup was dumped from, when not the live one
    safety_backup_source: str | None = None
    reverted: list[dict[str, Any]] = field(default_factory=list)
    rehearsal: dict[str, Any] | None = None
    validation: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def plan_step(self, name: str, detail: str) -> None:
        self.plan.append({"step": name, "detail": detail})

    def to_document(self) -> dict[str, Any]:
        safety = self.safety_backup
        backup_file = None
        if safety is not None:
            backup_file = str(safety.local_path) if safety.local_path else safety.key
        return {
            "database": self.database,
            "plan": self.plan,
            "revision_before": self.revision_before,
            "revision_after": self.revision_after,
            "backup_file": backup_file,
            "backup_sha256": safety.manifest.sha256 if safety else None,
            "backup_uri": safety.uri if safety else None,
            "backup_used": self.backup_used,
            "kept_database": self.kept_database,
            "unavailable_ms": _ms(self.unavailable_ms),
            "time_to_recovery_ms": _ms(self.time_to_recovery_ms),
            "total_ms": _ms(self.total_ms),
            "safety_backup_ms": _ms(self.safety_backup_ms),
            "safety_backup_source": self.safety_backup_source,
            "reverted": self.reverted,
            "rehearsal": self.rehearsal,
            "validation": [c.to_dict() for c in self.validation],
            "warnings": self.warnings,
        }


def _ms(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


@dataclass
class Inspection:
    """What the read-only checks found out about the target."""

    conninfo: ConnInfo
    tools: ClientTools
    privileges: dict[str, bool]
    owner: bool
    revisions: list[str]
    major: int

    @property
    def dbname(self) -> str:
        return self.conninfo.dbname


def inspect_target(target: Target) -> Inspection:
    """Connection, server version, client tools, privileges, revisions; refuse while another
    rollback of the database holds the lock."""
    with step("preflight"):
        conn = connect(target.conninfo)
        try:
            major = server_major(conn)
            tools = find_client(major, target.pg_bin_dir)
            privileges = role_privileges(conn)
            owner = owns_database(conn, target.dbname)
            revisions = alembic_revisions(conn)
            holder = lock_holder(conn, target.dbname)
        finally:
            conn.close()
    if holder is not None:
        raise Refused(f"another rollback of {target.dbname} is running ({holder})")
    missing = missing_client_tools(tools)
    if missing:
        # Found now, not after the safety backup when the restore needs them.
        raise Refused(
            f"{', '.join(missing)} missing or not executable in {tools.bin_dir}",
            hint=f"install postgresql-client-{tools.major} or point --pg-bin-dir at a "
            "directory holding pg_dump, pg_restore and psql",
        )
    return Inspection(target.conninfo, tools, privileges, owner, revisions, major)


def current_revisions(conninfo: ConnInfo) -> list[str]:
    conn = connect(conninfo)
    try:
        return alembic_revisions(conn)
    finally:
        conn.close()


@dataclass
class RollbackContext:
    """Everything a procedure needs: the target and how the run was asked for."""

    target: Target
    storage: StorageConfig
    run: RunOptions
    options: RollbackOptions
    inspection: Inspection
    #: ``time.monotonic()`` when the command started: time to recovery counts from here
    started: float = field(default_factory=time.monotonic)


class Procedure:
    """One kind of rollback. Subclasses fill in the plan and the change itself."""

    kind: str = ""
    #: the action named in the production confirmation
    action: str = ""
    #: whether the lifecycle takes a safety backup before :meth:`apply`
    takes_safety_backup: bool = True

    def deferred_safety_source(self, result: RollbackResult) -> str | None:
        """The database that, after :meth:`apply`, still holds the whole pre-rollback state
        (the one a swap kept), or None. When named, the lifecycle dumps it as the safety
        backup of the live database after validation, off the time to recovery."""
        return None

    def __init__(self, ctx: RollbackContext) -> None:
        self.ctx = ctx

    @contextmanager
    def prepare(self) -> Iterator[None]:
        """Resources the plan and the change share (a verified backup, a connection)."""
        yield

    def plan(self, result: RollbackResult) -> None:
        """Read-only checks and the plan's steps; raise to refuse."""
        raise NotImplementedError

    def apply(self, result: RollbackResult) -> None:
        """The change, under the lock and after the safety backup."""
        raise NotImplementedError

    def validation(self) -> tuple[list[str] | None, Manifest | None]:
        """The revisions expected afterwards and the manifest whose row counts must match."""
        return None, None

    def revision_after(self, result: RollbackResult) -> str | None:
        return ",".join(current_revisions(self.ctx.target.conninfo)) or None


def rollback_context(
    target: Target, storage: StorageConfig, run: RunOptions, options: RollbackOptions
) -> RollbackContext:
    """Check the options, repair what a killed run left half-way, inspect the target."""
    started = time.monotonic()
    if options.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {options.strategy!r}: use swap or in-place")
    if options.safety_timing not in SAFETY_TIMINGS:
        raise UsageError(
            f"unknown safety backup timing {options.safety_timing!r}: use "
            + ", ".join(SAFETY_TIMINGS)
        )
    if options.strategy == "in-place" and options.safety_timing != "auto":
        raise UsageError(
            "--safety-backup-timing is for the swap strategy: in place, the safety backup "
            "is always taken first, once writers are stopped"
        )
    if options.no_safety_backup and target.is_protected:
        raise Refused(
            f"--no-safety-backup is not allowed in protected environment {target.environment!r}"
        )
    if not run.dry_run:
        repair(target)
    return RollbackContext(target, storage, run, options, inspect_target(target), started)


def run_rollback(procedure: Procedure) -> RollbackResult:
    """Run ``procedure`` through the lifecycle; see the module's docstring. On any failure
    or interrupt, the server sessions this run's client tools left are ended."""
    try:
        with lock_timeout(procedure.ctx.options.timeouts.lock_timeout_ms):
            return _run(procedure)
    except BaseException:
        with suppress(Exception):
            ended = end_run_sessions(procedure.ctx.target.conninfo)
            if ended:
                get_logger().warning("ended sessions this run left on the server", count=ended)
        raise


def _run(procedure: Procedure) -> RollbackResult:
    ctx = procedure.ctx
    result = RollbackResult(
        procedure.kind,
        ctx.inspection.dbname,
        revision_before=",".join(ctx.inspection.revisions) or None,
    )
    with procedure.prepare():
        procedure.plan(result)
        if ctx.run.dry_run:
            return result
        confirm_protected(ctx.target, ctx.run, procedure.action)
        with rollback_lock(ctx.target.conninfo, ctx.target.dbname):
            if procedure.takes_safety_backup:
                take_safety_backup(ctx, result)
            try:
                procedure.apply(result)
                # Validated before the lock goes, so no other run starts on an unchecked
                # database.
                expected, manifest = procedure.validation()
                _finish_validation(ctx, result, expected, manifest)
            except ManualAttention as exc:
                source = procedure.deferred_safety_source(result)
                if source is None:
                    raise
                raise ManualAttention(
                    f"{exc.message}; {_safety_after_failure(ctx, result, source)}",
                    hint=exc.hint,
                ) from None
            result.time_to_recovery_ms = _elapsed_ms(ctx)
            get_logger().info(
                "recovered",
                database=ctx.inspection.dbname,
                time_to_recovery_ms=round(result.time_to_recovery_ms, 1),
            )
            source = procedure.deferred_safety_source(result)
            if source is not None and result.safety_backup is None:
                take_deferred_safety_backup(ctx, result, source)
        result.revision_after = procedure.revision_after(result)
    result.total_ms = _elapsed_ms(ctx)
    return result


def _elapsed_ms(ctx: RollbackContext) -> float:
    return (time.monotonic() - ctx.started) * 1000


def plan_safety_backup(ctx: RollbackContext, result: RollbackResult, what: str) -> None:
    result.plan_step(
        "safety-backup",
        "skipped (--no-safety-backup)"
        if ctx.options.no_safety_backup
        else f"{what} into {ctx.storage.display}",
    )


def check_safety_storage(ctx: RollbackContext) -> None:
    """For a safety backup taken after the change: its storage must be writable now, so a
    misconfigured one is refused while nothing has changed."""
    if not ctx.options.no_safety_backup:
        check_staging_writable(staging_dir_of(ctx.storage))


def plan_validation(ctx: RollbackContext, result: RollbackResult, what: str) -> None:
    checks_file = ctx.options.checks_file
    result.plan_step(
        "validate",
        f"connectivity, revision, {what}" + (f", checks in {checks_file}" if checks_file else ""),
    )


def take_safety_backup(
    ctx: RollbackContext,
    result: RollbackResult,
    *,
    source: str | None = None,
    cancel: DumpCancel | None = None,
) -> None:
    """The safety backup of the live database: a dump of it, or of ``source``, the database
    that holds its pre-rollback state (recorded as a backup of the live database, with
    ``source`` in the manifest). ``cancel`` stops it from another thread."""
    if ctx.options.no_safety_backup:
        result.warnings.append("safety backup skipped (--no-safety-backup)")
        get_logger().warning("safety backup skipped on request")
        return
    label = f"safety backup before {result.kind} rollback"
    if source is not None:
        label += f" (dumped from the kept database {source})"
    started = time.monotonic()
    with step("safety-backup", source=source or ctx.inspection.dbname):
        storage = open_storage(ctx.storage, ctx.target.environment)
        try:
            result.safety_backup = create_backup(
                ctx.target,
                storage,
                BackupRequest(
                    label=label,
                    kind="safety",
                    lock_timeout_ms=ctx.options.timeouts.lock_timeout_ms,
                    source_database=source,
                ),
                keep_local=ctx.storage.keep_local,
                signing=ctx.storage.signing,
                cancel=cancel,
            )
        finally:
            storage.close()
    result.safety_backup_ms = (time.monotonic() - started) * 1000
    result.safety_backup_source = source


def take_deferred_safety_backup(ctx: RollbackContext, result: RollbackResult, kept: str) -> None:
    """After the swap: dump ``kept`` (the pre-rollback database, whole). The live database is
    already rolled back and validated, so a failure here loses nothing: ``kept`` still holds
    the previous state, and the message says so (exit 6)."""
    try:
        take_safety_backup(ctx, result, source=kept)
    except RollbackError as exc:
        raise ManualAttention(
            f"{ctx.inspection.dbname} is rolled back and validated, but the safety backup "
            f"failed: {exc.one_line()}; {_kept_note(kept)}"
        ) from None
    except OSError as exc:
        raise ManualAttention(
            f"{ctx.inspection.dbname} is rolled back and validated, but the safety backup "
            f"failed: {exc.strerror or exc}; {_kept_note(kept)}"
        ) from None
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during the safety backup, after {ctx.inspection.dbname} was rolled "
            f"back and validated; {_kept_note(kept)}"
        ) from None


def _kept_note(kept: str) -> str:
    return (
        f"the previous state is intact in the kept database {kept} (`rollback undo` swaps it "
        "back; cleanup-artifacts removes it only past retention): fix the storage, then "
        f"take a backup of it (pg_dump -Fc -d {kept})"
    )


def _safety_after_failure(ctx: RollbackContext, result: RollbackResult, kept: str) -> str:
    """The deferred safety backup after a failure past the swap, best effort: what became
    of it, for the failure's message."""
    if ctx.options.no_safety_backup:
        return f"the previous state is in the kept database {kept}"
    if result.safety_backup is None:
        try:
            take_safety_backup(ctx, result, source=kept)
        except (RollbackError, OSError) as exc:
            reason = exc.one_line() if isinstance(exc, RollbackError) else str(exc)
            get_logger().error("deferred safety backup failed", error=reason, kept_database=kept)
            return f"the safety backup failed too ({reason}); {_kept_note(kept)}"
    assert result.safety_backup is not None
    return (
        f"the previous state is in the kept database {kept} and in the safety backup "
        f"{result.safety_backup.uri}"
    )


def _finish_validation(
    ctx: RollbackContext,
    result: RollbackResult,
    expected: list[str] | None,
    manifest: Manifest | None,
) -> None:
    try:
        report = validate_database(
            ctx.target.conninfo,
            expected_revisions=expected,
            manifest=manifest,
            checks_file=ctx.options.checks_file,
        )
    except RollbackError as exc:
        raise ManualAttention(
            f"the rollback finished but validation could not run: {exc.one_line()}"
        ) from None
    result.validation = [*result.validation, *report.checks]
    if report.failures:
        undo = (
            f"; `rollback undo` swaps {result.kept_database} back" if result.kept_database else ""
        )
        raise ManualAttention(
            f"the rollback finished but validation failed: {report.summary()}{undo}"
        )
