"""Data rollbacks: restore a verified backup by swapping a scratch copy in, or in place."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

from rollback_cli.backups.catalog import locate
from rollback_cli.backups.dump import DumpCancel, auto_jobs, machine_cores
from rollback_cli.backups.manifest import Manifest
from rollback_cli.backups.scratch import (
    compare_on,
    restore_roles,
    restored_copy,
    restores_as_superuser,
)
from rollback_cli.backups.verify import VerifiedBackup, prepared_backup
from rollback_cli.checks import Check
from rollback_cli.errors import (
    BackupError,
    ManualAttention,
    OperationFailed,
    Refused,
    RollbackError,
)
from rollback_cli.log import get_logger, set_progress_sink, step
from rollback_cli.postgres import registry
from rollback_cli.postgres.catalog import (
    DatabaseLevelState,
    count_assertions,
    database_oid,
    database_properties,
    read_database_state,
)
from rollback_cli.postgres.clients import newer_client
from rollback_cli.postgres.connection import current_run_id, maintenance_connection
from rollback_cli.postgres.ddl import set_comment
from rollback_cli.postgres.inplace import WritersStopped
from rollback_cli.postgres.names import PRE_MARK, SCRATCH_MARK, derived_name, free_derived_name
from rollback_cli.postgres.swap import Swap, check_swap_allowed, swap_databases
from rollback_cli.rollback.lifecycle import (
    Procedure,
    RollbackContext,
    RollbackResult,
    check_safety_storage,
    plan_safety_backup,
    plan_validation,
    safety_timing,
    take_safety_backup,
)

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection


SUPERUSER_UNSIGNED = (
    "the backup's SQL runs with superuser rights and no signing key is configured: anyone "
    "who can write the backup storage can run SQL as a superuser here (configure "
    "DB_ROLLBACK_SIGNING_KEY, or connect as the database owner)"
)


class DataRollback(Procedure):
    kind = "data"
    action = "data rollback"

    # Never before apply(): in place, the safety backup is taken once writers are stopped
    # (restore_in_place); a swap keeps the old database whole and dumps it afterwards.
    takes_safety_backup = False

    def deferred_safety_source(self, result: RollbackResult) -> str | None:
        # The swap kept the pre-rollback database whole: the first safety copy, dumped
        # once the restored copy is live and validated (off the time to recovery).
        if self.ctx.options.strategy != "swap":
            return None
        return result.kept_database

    def __init__(self, ctx: RollbackContext, backup_ref: str) -> None:
        super().__init__(ctx)
        self.backup_ref = backup_ref
        self._backup: VerifiedBackup | None = None
        #: when a swap takes its safety backup, and its pg_restore --jobs (by plan())
        self.safety_timing = "after-swap"
        self.jobs = 1

    @property
    def backup(self) -> VerifiedBackup:
        assert self._backup is not None, "used outside prepare()"
        return self._backup

    @contextmanager
    def prepare(self) -> Iterator[None]:
        with verified_backup(self.ctx, self.backup_ref) as backup:
            self._backup = backup
            try:
                yield
            finally:
                self._backup = None

    def plan(self, result: RollbackResult, *, validate: bool = True) -> None:
        ctx, backup = self.ctx, self.backup
        check_privileges(ctx)
        db = ctx.inspection.dbname
        manifest = backup.manifest
        result.backup_used = backup.uri
        result.plan_step(
            "verify",
            f"{backup.key}: manifest, size, sha256 and archive checked "
            f"({manifest.type}/{manifest.format}, revision "
            f"{manifest.alembic_revision or 'none'}, taken {manifest.created_at})",
        )
        result.plan_step("lock", f"advisory lock for {db} in the maintenance database (free)")
        swap = ctx.options.strategy == "swap"
        if not swap:
            plan_safety_backup(ctx, result, f"full backup of {db}")
        superuser = restore_role_is_superuser(ctx)
        owner_note = "" if superuser else " (--no-owner: the restoring role is not superuser)"
        if ctx.target.restore_conninfo is not None:
            result.plan_step(
                "restore-role",
                f"restores connect as {ctx.target.restore_as.user or 'the restore URL role'}"
                + (" (a superuser!)" if superuser else " (not a superuser)"),
            )
        if superuser and not ctx.storage.signing:
            warning = SUPERUSER_UNSIGNED
            result.warnings.append(warning)
            result.plan_step("warning", warning)
        if swap:
            self.safety_timing = safety_timing(ctx.options, ctx.target.conninfo, machine_cores())
            holding_rows = sum(1 for rows in manifest.row_counts.values() if rows)
            self.jobs = ctx.options.jobs or auto_jobs(holding_rows)
        if swap and self.safety_timing == "during-restore":
            check_safety_storage(ctx)
            plan_safety_backup(
                ctx,
                result,
                f"during the restore: full backup of {db} (its state when the rollback "
                "starts; the kept database holds later writes too), stored before the swap",
            )
        if ctx.options.strategy == "swap":
            scratch = derived_name(db, SCRATCH_MARK)
            tool = "psql" if manifest.format == "plain" else "pg_restore"
            result.plan_step(
                "restore",
                f"CREATE DATABASE {scratch} like {db}; restore with "
                f"{tool} -j {self.jobs}{owner_note}",
            )
            result.plan_step(
                "validate-scratch",
                f"row counts of {len(manifest.row_counts)} tables "
                "and Alembic revision against the manifest",
            )
            checked = check_swap(ctx)
            kept = derived_name(db, PRE_MARK)
            result.plan_step(
                "swap",
                Swap(db, scratch, kept).describe()
                + f" ({checked} statements checked in a rolled-back transaction)",
            )
        else:
            result.plan_step(
                "stop-writers",
                f"one psql session locks every table of {db} IN EXCLUSIVE MODE (readers go "
                f"on, writers wait; lock_timeout {ctx.options.timeouts.lock_timeout_ms}ms); "
                "the safety backup is taken then, so it holds every committed write",
            )
            result.plan_step(
                "restore",
                f"refuse new connections, end the other sessions of {db}, drop its user "
                "schemas and restore the backup in that same transaction; commit only if all "
                "of it succeeds; allow connections" + owner_note,
            )
        if validate:
            plan_validation(ctx, result, "manifest row counts")
        if swap and self.safety_timing == "after-swap":
            # After validation, under the lock: the kept database is the first safety copy.
            check_safety_storage(ctx)
            plan_safety_backup(
                ctx,
                result,
                f"after the swap and validation: full backup of the kept {kept} as a backup "
                f"of {db} (it holds the previous state whole until then)",
            )

    def apply(self, result: RollbackResult) -> None:
        if self.ctx.options.strategy == "in-place":
            restore_in_place(self.ctx, self.backup, result)
        else:
            swap_in_restored_copy(
                self.ctx,
                self.backup,
                result,
                self.before_swap,
                safety_during_restore=self.safety_timing == "during-restore",
                jobs=self.jobs,
            )

    def before_swap(self, copy: str, result: RollbackResult) -> None:
        """A last change to the restored copy ``copy``, checked, before it is swapped in
        (a full rollback downgrades it there)."""

    def validation(self) -> tuple[list[str] | None, Manifest | None]:
        # Row counts were compared where no application could write meanwhile: on the
        # restored copy before the swap, or in place before connections were allowed.
        return self.backup.manifest.alembic_revisions, None

    def revision_after(self, result: RollbackResult) -> str | None:
        return self.backup.manifest.alembic_revision


@contextmanager
def verified_backup(ctx: RollbackContext, ref: str) -> Iterator[VerifiedBackup]:
    """Locate, fetch and verify the backup; refuse what must not be restored here."""
    environment = ctx.target.environment

    def admit(manifest: Manifest) -> None:
        key = manifest.file_name
        if manifest.environment != environment and not ctx.options.allow_cross_environment:
            raise Refused(
                f"backup {key} was taken in {manifest.environment!r}, not {environment!r}",
                hint="pass --allow-cross-environment if this is intended",
            )
        if manifest.database != ctx.target.dbname and not ctx.options.allow_other_database:
            raise Refused(
                f"backup {key} is of database {manifest.database!r}, not {ctx.target.dbname!r}",
                hint="pass --allow-other-database if this is intended",
            )
        if manifest.type != "full":
            raise Refused(
                f"backup {key} is a {manifest.type}-only backup; a data rollback "
                "needs a full backup"
            )

    storage, key = locate(ctx.storage, environment, ref)
    try:
        with ExitStack() as stack:
            with step("verify-backup", backup=key):
                backup = stack.enter_context(
                    prepared_backup(
                        storage,
                        key,
                        pg_bin_dir=ctx.target.pg_bin_dir,
                        admit=admit,
                        signing=ctx.storage.signing,
                    )
                )
            yield backup
    finally:
        storage.close()


def restore_role_is_superuser(ctx: RollbackContext) -> bool:
    return restores_as_superuser(ctx.target, ctx.inspection.privileges["superuser"])


def check_swap(ctx: RollbackContext) -> int:
    """Everything the swap will carry over, checked now: nothing is changed."""
    admin = maintenance_connection(ctx.target.conninfo)
    try:
        return check_swap_allowed(
            admin, ctx.inspection.dbname, read_database_state(admin, ctx.inspection.dbname)
        )
    finally:
        admin.close()


def check_privileges(ctx: RollbackContext) -> None:
    """Refuse a strategy the role cannot carry out, before anything is planned."""
    inspection = ctx.inspection
    privileges = inspection.privileges
    owner = inspection.owner or privileges["superuser"]
    if ctx.options.strategy == "swap":
        role = ctx.target.conninfo.user or "the role"
        db = inspection.dbname
        missing = [
            (name, fix)
            for name, ok, fix in (
                ("CREATEDB", privileges["createdb"], f'ALTER ROLE "{role}" CREATEDB'),
                (
                    "ownership of the database",
                    owner,
                    f'ALTER DATABASE "{db}" OWNER TO "{role}" (or GRANT the owning role to it)',
                ),
                (
                    "pg_signal_backend (to end the database's sessions)",
                    privileges["can_terminate"],
                    f'GRANT pg_signal_backend TO "{role}"',
                ),
            )
            if not ok
        ]
        if missing:
            # In place needs no CREATEDB, but ends sessions and needs ownership too.
            only_createdb = [name for name, _ in missing] == ["CREATEDB"]
            alternative = (
                "; or use --strategy in-place (no CREATEDB needed)" if only_createdb else ""
            )
            raise Refused(
                f"swap rollback needs {', '.join(name for name, _ in missing)}",
                hint="run " + "; ".join(fix for _, fix in missing) + alternative,
            )
    elif not owner:
        raise Refused(f"in-place rollback needs ownership of {inspection.dbname} or superuser")


def swap_in_restored_copy(
    ctx: RollbackContext,
    backup: VerifiedBackup,
    result: RollbackResult,
    before_swap: Callable[[str, RollbackResult], None] | None = None,
    *,
    safety_during_restore: bool = False,
    jobs: int = 1,
) -> None:
    """Restore into a scratch database, check it against the manifest, swap it in; with
    ``safety_during_restore`` the live database's safety backup is dumped meanwhile."""
    db = ctx.inspection.dbname
    admin = maintenance_connection(ctx.target.conninfo)
    try:
        state = read_database_state(admin, db)
        original_oid = database_oid(admin, db)
        scratch = free_derived_name(admin, db, SCRATCH_MARK)
        # The live database says which scratch copy this run makes before it exists: a
        # CREATE DATABASE that completes after a kill still leaves a provably ours copy.
        registry.write(
            admin, db, registry.busy_record(admin, db, current_run_id(), state.comment, scratch)
        )
        try:
            with ExitStack() as stack:
                beside = (
                    stack.enter_context(SafetyBesideRestore(ctx, result))
                    if safety_during_restore and not ctx.options.no_safety_backup
                    else None
                )
                _restore_and_swap(
                    ctx, backup, result, admin, state, scratch, before_swap, beside, jobs
                )
        finally:
            if database_oid(admin, db) == original_oid:  # not swapped: still the original
                set_comment(admin, db, state.comment)
    finally:
        admin.close()


def _restore_and_swap(
    ctx: RollbackContext,
    backup: VerifiedBackup,
    result: RollbackResult,
    admin: PgConnection,
    state: DatabaseLevelState,
    scratch: str,
    before_swap: Callable[[str, RollbackResult], None] | None = None,
    beside: SafetyBesideRestore | None = None,
    jobs: int = 1,
) -> None:
    db = ctx.inspection.dbname
    with restored_copy(
        admin,
        ctx.target,
        backup.tools,
        backup.local,
        backup.manifest,
        registry.SCRATCH,
        jobs=jobs,
        state=state,
        name=scratch,
    ) as copy:
        if copy.no_owner:
            result.warnings.append("restored with --no-owner: the role is not superuser")
        mismatches = copy.comparison["mismatches"]
        if mismatches:
            # The backup's content is not what its manifest says: it fails verification.
            raise BackupError(
                "restored copy does not match the manifest: "
                + "; ".join(mismatches[:5])
                + "; live database unchanged"
            )
        result.validation.append(
            Check.of(
                "row counts",
                True,
                f"{copy.comparison['tables']} tables match the manifest "
                "(the restored copy, before the swap)",
            )
        )
        if before_swap is not None:
            before_swap(copy.name, result)
        if beside is not None:
            # The swap ends every session of the live database, the dump's too.
            beside.wait()
        swap = Swap(db, copy.name, free_derived_name(admin, db, PRE_MARK))
        with step("swap") as details:
            result.unavailable_ms = swap_databases(
                admin, swap, state, copy.record, current_run_id()
            )
            details.update(unavailable_ms=round(result.unavailable_ms, 1), kept_as=swap.kept_name)
        copy.keep()
    result.kept_database = swap.kept_name


class SafetyBesideRestore:
    """The live database's safety backup, dumped in a thread of its own while the backup
    is restored into the scratch copy (``--safety-backup-timing during-restore``): it holds
    the state at the start of the rollback, and the kept database holds any later write too.

    :meth:`wait` returns once it is stored, and must before the swap (which ends every
    session of the live database); its failure is raised there, nothing swapped. Leaving
    the block otherwise (a failure, an interrupt) cancels the dump and waits for its thread
    a bounded time."""

    #: how long a cancelled dump's thread gets to remove what it wrote
    STOP_SECONDS = 5.0

    def __init__(self, ctx: RollbackContext, result: RollbackResult) -> None:
        self.ctx, self.result = ctx, result
        self.cancel = DumpCancel()
        self.error: BaseException | None = None
        self._context = contextvars.copy_context()
        self._thread = threading.Thread(target=self._run, name="safety-backup", daemon=True)

    def _run(self) -> None:
        def dump() -> None:
            set_progress_sink(None)  # the restore has the terminal
            take_safety_backup(self.ctx, self.result, cancel=self.cancel)

        try:
            self._context.run(dump)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> SafetyBesideRestore:
        self._thread.start()
        return self

    def wait(self) -> None:
        if self._thread.is_alive():
            get_logger().info("waiting for the safety backup", database=self.ctx.inspection.dbname)
        self._thread.join()
        error = self.error
        if error is None:
            return
        db = self.ctx.inspection.dbname
        if isinstance(error, RollbackError):
            raise OperationFailed(
                f"the safety backup of {db} failed before the swap: {error.one_line()}; "
                f"{db} is unchanged",
                hint=error.hint,
            ) from None
        raise error

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            self.cancel.cancel()
            self._thread.join(self.STOP_SECONDS)
        stored = self.result.safety_backup
        if exc is not None and stored is not None and not self._thread.is_alive():
            # Stored before the failure: a whole backup of the unchanged database, kept.
            get_logger().warning("safety backup kept", backup=stored.key, uri=stored.uri)


def restore_in_place(ctx: RollbackContext, backup: VerifiedBackup, result: RollbackResult) -> None:
    """Writers stopped, the safety backup (it then holds every committed write), then one
    transaction that replaces everything; connections are refused only for that last part."""
    inspection = ctx.inspection
    db = inspection.dbname
    tools = newer_client(inspection.tools, backup.tools)
    admin = maintenance_connection(ctx.target.conninfo)
    try:
        roles = restore_roles(admin, ctx.target, database_properties(admin, db))
        superuser, role = roles.superuser, roles.acting_role
        comment = read_database_state(admin, db).comment
        with WritersStopped(
            tools,
            ctx.target.restore_as,
            admin,
            server_major=inspection.major,
            no_owner=not superuser,
            role=role,
            lock_timeout_ms=ctx.options.timeouts.lock_timeout_ms,
        ) as writers:
            take_safety_backup(ctx, result)
            registry.write(
                admin, db, registry.in_place_record(admin, db, current_run_id(), comment)
            )
            try:
                with step("restore-in-place"):
                    manifest = backup.manifest
                    writers.replace_with(
                        backup.local,
                        backup.manifest.format,
                        lambda conn: _check_in_place(conn, db, backup, result),
                        count_assertions(
                            admin,
                            manifest.row_counts,
                            manifest.alembic_revisions if manifest.type != "data" else None,
                        ),
                    )
            finally:
                set_comment(admin, db, comment)
    finally:
        admin.close()


def _check_in_place(
    conn: PgConnection, db: str, backup: VerifiedBackup, result: RollbackResult
) -> None:
    """The restored database against the manifest, before anyone else can connect."""
    comparison = compare_on(conn, db, backup.manifest)
    if comparison["mismatches"]:
        where = f" {result.safety_backup.uri}" if result.safety_backup else ""
        raise ManualAttention(
            f"{db} was restored in place but does not match the manifest: "
            + "; ".join(comparison["mismatches"][:5])
            + f"; the safety backup{where} holds the previous state"
        )
    result.validation.append(
        Check.of(
            "row counts",
            True,
            f"{comparison['tables']} tables match the manifest "
            "(in place, before connections were allowed)",
        )
    )
