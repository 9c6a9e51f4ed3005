"""Rollbacks: schema (Alembic), data (swap or in-place), full, and undo.

Order of every rollback: read-only checks (connection, backup verified, revision valid,
privileges, client versions, lock free) → the plan (all a dry run does) → confirmation in
protected environments → lock → safety backup → the change → validation → lock released.
Nothing about the live database changes before the swap (data) or the downgrade (schema).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli import pg
from rollback_cli.artifacts import (
    PRE_MARK,
    SCRATCH_MARK,
    derived_name,
    free_derived_name,
    kept_databases,
)
from rollback_cli.backup import BackupRequest, BackupResult, create_backup
from rollback_cli.catalog import fetched, locate, read_manifest
from rollback_cli.errors import (
    BackupError,
    ManualAttention,
    OperationFailed,
    Refused,
    RollbackError,
    UsageError,
)
from rollback_cli.guard import Prompt, confirm_protected
from rollback_cli.lock import lock_holder, rollback_lock
from rollback_cli.log import get_logger, step
from rollback_cli.restore import (
    create_database_like,
    database_properties,
    drop_database,
    maintenance_connection,
    restore_into,
    role_privileges,
)
from rollback_cli.schema import Timeouts
from rollback_cli.swap import read_database_state, swap_databases
from rollback_cli.validate import validate_database
from rollback_cli.verify import check_local, compare_with_manifest, manifest_client_major

if TYPE_CHECKING:
    from rollback_cli.manifest import Manifest
    from rollback_cli.settings import ConnInfo, Settings
    from rollback_cli.storage import Storage

STRATEGIES = ("swap", "in-place")


@dataclass(frozen=True)
class RollbackOptions:
    strategy: str = "swap"
    jobs: int = 2
    allow_cross_environment: bool = False
    no_safety_backup: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    checks_file: Path | None = None


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
    reverted: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def plan_step(self, name: str, detail: str) -> None:
        self.plan.append({"step": name, "detail": detail})


# --- shared pieces --------------------------------------------------------------------


@dataclass
class _Target:
    conninfo: ConnInfo
    tools: pg.ClientTools
    privileges: dict[str, bool]
    owner: bool
    revisions: list[str]
    major: int


def _inspect_target(settings: Settings) -> _Target:
    conninfo = settings.conninfo()
    with step("preflight"):
        conn = pg.connect(conninfo)
        try:
            major = pg.server_major(conn)
            tools = pg.find_client(major, settings.pg_bin_dir)
            privileges = role_privileges(conn)
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database "
                    "WHERE datname = current_database()"
                )
                row = cur.fetchone()
            revisions = pg.alembic_revisions(conn)
            holder = lock_holder(conn, conninfo.dbname)
        finally:
            conn.close()
    if holder is not None:
        raise Refused(f"another rollback of {conninfo.dbname} is running ({holder})")
    return _Target(conninfo, tools, privileges, bool(row and row[0]), revisions, major)


def _safety_backup(
    settings: Settings, options: RollbackOptions, target: _Target, result: RollbackResult
) -> None:
    if options.no_safety_backup:
        result.warnings.append("safety backup skipped (--no-safety-backup)")
        get_logger().warning("safety backup skipped on request")
        return
    with step("safety-backup"):
        result.safety_backup = create_backup(
            settings,
            BackupRequest(label=f"safety backup before {result.kind} rollback", kind="safety"),
            conninfo=target.conninfo,
        )


def _check_safety_option(settings: Settings, options: RollbackOptions) -> None:
    if options.no_safety_backup and settings.is_protected:
        raise Refused(
            f"--no-safety-backup is not allowed in protected environment {settings.environment!r}"
        )


@dataclass
class _Backup:
    storage: Storage
    key: str
    manifest: Manifest
    local: Path


@contextmanager
def _verified_backup(settings: Settings, ref: str, options: RollbackOptions) -> Iterator[_Backup]:
    """Locate, fetch and verify the backup; refuse what must not be restored here."""
    storage, key = locate(settings, ref)
    try:
        with step("verify-backup", backup=key):
            manifest = read_manifest(storage, key)
            stored = storage.stat(key)
            if stored is None:
                raise BackupError(f"backup {key} is missing (its manifest exists)")
            if stored.size != manifest.size:
                raise BackupError(
                    f"backup {key} is {stored.size} bytes, manifest says "
                    f"{manifest.size}: truncated or replaced"
                )
            if manifest.environment != settings.environment and not options.allow_cross_environment:
                raise Refused(
                    f"backup {key} was taken in {manifest.environment!r}, not "
                    f"{settings.environment!r}",
                    hint="pass --allow-cross-environment if this is intended",
                )
            if manifest.type != "full":
                raise Refused(
                    f"backup {key} is a {manifest.type}-only backup; a data rollback "
                    "needs a full backup"
                )
            tools = pg.find_client(
                manifest_client_major(manifest), settings.pg_bin_dir, purpose="archive's pg_dump"
            )
        with fetched(storage, key, manifest, settings.backup_dir) as local:
            with step("verify-checksum", backup=key):
                check_local(tools, local, manifest)
            yield _Backup(storage, key, manifest, local)
    finally:
        storage.close()


def _finish_validation(
    settings: Settings,
    target: _Target,
    result: RollbackResult,
    expected: list[str] | None,
    manifest: Manifest | None,
    options: RollbackOptions,
) -> None:
    try:
        report = validate_database(
            target.conninfo,
            expected_revisions=expected,
            manifest=manifest,
            checks_file=options.checks_file,
        )
    except RollbackError as exc:
        raise ManualAttention(
            f"the rollback finished but validation could not run: {exc.one_line()}"
        ) from None
    result.validation = report.checks
    if report.failures:
        undo = (
            f"; `rollback undo` swaps {result.kept_database} back" if result.kept_database else ""
        )
        raise ManualAttention(
            f"the rollback finished but validation failed: {report.summary()}{undo}"
        )


# --- data ------------------------------------------------------------------------------


def rollback_data(
    settings: Settings, backup_ref: str, options: RollbackOptions, prompt: Prompt | None = None
) -> RollbackResult:
    if options.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {options.strategy!r}: use swap or in-place")
    _check_safety_option(settings, options)
    target = _inspect_target(settings)
    result = RollbackResult(
        "data", target.conninfo.dbname, revision_before=",".join(target.revisions) or None
    )
    with _verified_backup(settings, backup_ref, options) as backup:
        _plan_data(settings, target, backup, options, result)
        if settings.dry_run:
            return result
        confirm_protected(settings, target.conninfo.dbname, "data rollback", prompt)
        with rollback_lock(target.conninfo, target.conninfo.dbname):
            _safety_backup(settings, options, target, result)
            _apply_data(target, backup, options, result)
            # Validated before the lock goes, so no other run starts on an unchecked database.
            _finish_validation(
                settings,
                target,
                result,
                backup.manifest.alembic_revisions,
                backup.manifest,
                options,
            )
    result.revision_after = backup.manifest.alembic_revision
    return result


def _plan_data(
    settings: Settings,
    target: _Target,
    backup: _Backup,
    options: RollbackOptions,
    result: RollbackResult,
    *,
    validate: bool = True,
) -> None:
    db = target.conninfo.dbname
    if options.strategy == "swap":
        missing = [
            name
            for name, ok in (
                ("CREATEDB", target.privileges["createdb"]),
                ("ownership of the database", target.owner or target.privileges["superuser"]),
                ("permission to terminate backends", target.privileges["can_terminate"]),
            )
            if not ok
        ]
        if missing:
            raise Refused(
                f"swap rollback needs {', '.join(missing)}",
                hint="use --strategy in-place for roles without CREATEDB",
            )
    elif not (target.owner or target.privileges["superuser"]):
        raise Refused(f"in-place rollback needs ownership of {db} or superuser")
    manifest = backup.manifest
    result.backup_used = backup.storage.uri(backup.key)
    result.plan_step(
        "verify",
        f"{backup.key}: manifest, size, sha256 and archive checked "
        f"({manifest.type}/{manifest.format}, revision "
        f"{manifest.alembic_revision or 'none'}, taken {manifest.created_at})",
    )
    result.plan_step("lock", f"advisory lock for {db} in the maintenance database (free)")
    result.plan_step(
        "safety-backup",
        "skipped (--no-safety-backup)"
        if options.no_safety_backup
        else f"full backup of {db} into {settings.storage or settings.backup_dir}",
    )
    owner_note = "" if target.privileges["superuser"] else " (--no-owner: role is not superuser)"
    if options.strategy == "swap":
        scratch = derived_name(db, SCRATCH_MARK)
        result.plan_step(
            "restore",
            f"CREATE DATABASE {scratch} like {db}; restore with "
            f"{'psql' if manifest.format == 'plain' else 'pg_restore'} "
            f"-j {options.jobs}{owner_note}",
        )
        result.plan_step(
            "validate-scratch",
            f"row counts of {len(manifest.row_counts)} tables "
            "and Alembic revision against the manifest",
        )
        result.plan_step(
            "swap",
            f"ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false; terminate "
            f"its sessions; RENAME {db} TO {derived_name(db, PRE_MARK)}; RENAME "
            f"{scratch} TO {db}; carry settings and grants; allow connections",
        )
    else:
        tool = (
            "psql --single-transaction"
            if manifest.format == "plain"
            else "pg_restore --clean --if-exists --single-transaction"
        )
        result.plan_step(
            "restore", f"{tool} into {db} (atomic; holds locks while it runs)" + owner_note
        )
    if validate:
        _plan_validate(options, result, "manifest row counts")


def _plan_validate(options: RollbackOptions, result: RollbackResult, what: str) -> None:
    result.plan_step(
        "validate",
        f"connectivity, revision, {what}"
        + (f", checks in {options.checks_file}" if options.checks_file else ""),
    )


def _apply_data(
    target: _Target, backup: _Backup, options: RollbackOptions, result: RollbackResult
) -> None:
    if options.strategy == "in-place":
        with step("restore-in-place"):
            _restore_in_place(target, backup)
        return
    db = target.conninfo.dbname
    admin = maintenance_connection(target.conninfo)
    scratch = free_derived_name(admin, db, SCRATCH_MARK)
    try:
        like = database_properties(admin, db)
        state = read_database_state(admin, db)
        with ExitStack() as cleanup:
            cleanup.callback(_drop_quietly, admin, scratch)
            with step("restore", scratch_database=scratch):
                create_database_like(admin, scratch, like, set_owner=target.privileges["superuser"])
                if not target.privileges["superuser"]:
                    result.warnings.append("restored with --no-owner: the role is not superuser")
                    get_logger().warning("restoring without ownership (role is not superuser)")
                restore_into(
                    target.tools,
                    target.conninfo,
                    scratch,
                    backup.local,
                    backup.manifest,
                    jobs=options.jobs,
                    no_owner=not target.privileges["superuser"],
                )
            with step("validate-scratch") as details:
                comparison = compare_with_manifest(target.conninfo, scratch, backup.manifest)
                details.update(tables=comparison["tables"], rows=comparison["rows"])
                if comparison["mismatches"]:
                    raise OperationFailed(
                        "restored copy does not match the manifest: "
                        + "; ".join(comparison["mismatches"][:5])
                        + "; live database unchanged"
                    )
            kept = free_derived_name(admin, db, PRE_MARK)
            with step("swap") as details:
                result.unavailable_ms = swap_databases(admin, db, scratch, kept, state)
                details.update(unavailable_ms=round(result.unavailable_ms, 1), kept_as=kept)
            cleanup.pop_all()
        result.kept_database = kept
    finally:
        admin.close()


def _drop_quietly(conn: Any, name: str) -> None:
    try:
        drop_database(conn, name)
        get_logger().info("scratch database dropped", database=name)
    except Exception as exc:
        get_logger().warning("could not drop scratch database", database=name, error=str(exc))


def _restore_in_place(target: _Target, backup: _Backup) -> None:
    import tempfile

    db = target.conninfo.dbname
    if backup.manifest.format != "plain":
        restore_into(
            target.tools,
            target.conninfo,
            db,
            backup.local,
            backup.manifest,
            clean=True,
            single_transaction=True,
            no_owner=not target.privileges["superuser"],
        )
        return
    # A plain script has no --clean: drop the user schemas first, in the same transaction.
    conn = pg.connect(target.conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                "AND nspname <> 'information_schema'"
            )
            schemas = [str(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()
    preamble = "".join(f"DROP SCHEMA IF EXISTS {pg.quote_ident(s)} CASCADE;\n" for s in schemas)
    # Recreate public as initdb makes it, so the restored schema matches the backup's.
    owner = "pg_database_owner" if target.major >= 14 else "CURRENT_USER"
    preamble += (
        f"CREATE SCHEMA public AUTHORIZATION {owner};\n"
        "GRANT USAGE ON SCHEMA public TO PUBLIC;\n"
        "COMMENT ON SCHEMA public IS 'standard public schema';\n"
    )
    if target.major < 15:
        preamble += "GRANT CREATE ON SCHEMA public TO PUBLIC;\n"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(preamble)
    combined = Path(handle.name)
    try:
        restore_into(
            target.tools,
            target.conninfo,
            db,
            backup.local,
            backup.manifest,
            single_transaction=True,
            preamble=combined,
        )
    finally:
        combined.unlink(missing_ok=True)


# --- schema ----------------------------------------------------------------------------


def _plan_schema(
    settings: Settings,
    target: _Target,
    to_revision: str,
    from_revisions: list[str],
    options: RollbackOptions,
    result: RollbackResult,
) -> tuple[Any, str, str]:
    from rollback_cli import schema

    url = schema.alembic_url(target.conninfo, options.timeouts)
    config = schema.load_config(settings, url)
    script = schema.script_directory(config)
    resolved = schema.resolve_target(script, to_revision, from_revisions)
    steps = schema.steps_to(script, from_revisions, resolved)
    schema.render_downgrade_sql(config, steps, url)
    result.reverted = [s.to_dict() for s in steps]
    flags = []
    for s in steps:
        if s.drops:
            flags.append(f"{s.revision} drops {', '.join(s.drops)}")
        if s.empty:
            flags.append(f"{s.revision} has an empty downgrade")
        if s.irreversible:
            flags.append(f"{s.revision} is irreversible: {s.irreversible}")
    result.warnings += flags
    revs = ", ".join(f"{s.revision} ({s.message})" for s in steps) or "nothing (already there)"
    result.plan_step(
        "downgrade",
        f"alembic downgrade {','.join(from_revisions)} → {resolved}: "
        f"reverts {revs}; lock_timeout={options.timeouts.lock_timeout_ms}ms, "
        f"statement_timeout={options.timeouts.statement_timeout_ms}ms",
    )
    for flag in flags:
        result.plan_step("warning", flag)
    irreversible = [s for s in steps if s.irreversible]
    if irreversible:
        raise Refused(
            f"downgrade cannot run: {irreversible[0].revision} is irreversible "
            f"({irreversible[0].irreversible})"
        )
    return config, resolved, url


def rollback_schema(
    settings: Settings, to_revision: str, options: RollbackOptions, prompt: Prompt | None = None
) -> RollbackResult:
    _check_safety_option(settings, options)
    target = _inspect_target(settings)
    result = RollbackResult(
        "schema", target.conninfo.dbname, revision_before=",".join(target.revisions) or None
    )
    result.plan_step("lock", f"advisory lock for {target.conninfo.dbname} (free)")
    result.plan_step(
        "safety-backup",
        "skipped (--no-safety-backup)"
        if options.no_safety_backup
        else f"full backup into {settings.storage or settings.backup_dir}",
    )
    config, resolved, url = _plan_schema(
        settings, target, to_revision, target.revisions, options, result
    )
    result.plan_step("validate", f"alembic_version must equal {resolved}")
    if settings.dry_run:
        return result
    confirm_protected(settings, target.conninfo.dbname, "schema rollback", prompt)
    with rollback_lock(target.conninfo, target.conninfo.dbname):
        _safety_backup(settings, options, target, result)
        _downgrade(target, config, resolved, url, target.revisions, result)
        _finish_validation(
            settings, target, result, [] if resolved == "base" else [resolved], None, options
        )
    result.revision_after = None if resolved == "base" else resolved
    return result


def _downgrade(
    target: _Target, config: Any, resolved: str, url: str, before: list[str], result: RollbackResult
) -> None:
    from rollback_cli import schema

    with step("downgrade", to_revision=resolved):
        try:
            schema.downgrade(config, resolved, url)
        except OperationFailed as exc:
            now = _current_revisions(target.conninfo)
            if sorted(now) == sorted(before):
                raise OperationFailed(
                    f"{exc.message}; database unchanged at {','.join(now) or 'none'}"
                ) from None
            raise ManualAttention(
                f"{exc.message}; the database is now at revision {','.join(now) or 'none'} "
                f"(was {','.join(before)}, target {resolved}); re-run the schema rollback or "
                "restore the safety backup"
                + (f" {result.safety_backup.uri}" if result.safety_backup else "")
            ) from None
    now = _current_revisions(target.conninfo)
    expected = [] if resolved == "base" else [resolved]
    if sorted(now) != expected:
        raise ManualAttention(
            f"after the downgrade alembic_version is {','.join(now) or 'none'}, expected {resolved}"
        )


def _current_revisions(conninfo: ConnInfo) -> list[str]:
    conn = pg.connect(conninfo)
    try:
        return pg.alembic_revisions(conn)
    finally:
        conn.close()


# --- full ------------------------------------------------------------------------------


def rollback_full(
    settings: Settings,
    to_revision: str,
    backup_ref: str | None,
    options: RollbackOptions,
    prompt: Prompt | None = None,
) -> RollbackResult:
    """One safety backup; the data rollback (when a backup is given), then the schema one."""
    if backup_ref is None:
        result = rollback_schema(settings, to_revision, options, prompt)
        result.kind = "full"
        return result
    _check_safety_option(settings, options)
    target = _inspect_target(settings)
    result = RollbackResult(
        "full", target.conninfo.dbname, revision_before=",".join(target.revisions) or None
    )
    with _verified_backup(settings, backup_ref, options) as backup:
        _plan_data(settings, target, backup, options, result, validate=False)
        from_revisions = backup.manifest.alembic_revisions
        schema_needed, config, resolved, url = _plan_full_schema(
            settings, target, to_revision, from_revisions, options, result
        )
        _plan_validate(
            options,
            result,
            "Alembic revision after the downgrade" if schema_needed else "manifest row counts",
        )
        if settings.dry_run:
            return result
        confirm_protected(settings, target.conninfo.dbname, "full rollback", prompt)
        with rollback_lock(target.conninfo, target.conninfo.dbname):
            _safety_backup(settings, options, target, result)
            _apply_data(target, backup, options, result)
            if schema_needed:
                try:
                    _downgrade(target, config, resolved, url, from_revisions, result)
                except RollbackError as exc:
                    raise ManualAttention(
                        f"data restored from {backup.key} (old database kept as "
                        f"{result.kept_database}) but the schema step failed: {exc.one_line()}"
                    ) from None
            expected = [] if resolved == "base" else [resolved]
            _finish_validation(
                settings,
                target,
                result,
                expected,
                None if schema_needed else backup.manifest,
                options,
            )
    result.revision_after = None if resolved == "base" else resolved
    return result


def _plan_full_schema(
    settings: Settings,
    target: _Target,
    to_revision: str,
    from_revisions: list[str],
    options: RollbackOptions,
    result: RollbackResult,
) -> tuple[bool, Any, str, str]:
    from rollback_cli import schema

    url = schema.alembic_url(target.conninfo, options.timeouts)
    config = schema.load_config(settings, url)
    script = schema.script_directory(config)
    if not from_revisions:
        raise Refused(
            "the backup records no Alembic revision; use `rollback data` and then `rollback schema`"
        )
    try:
        resolved = schema.resolve_target(script, to_revision, from_revisions)
    except Refused:
        # Not an ancestor of the backup's revision: newer (refuse) or unrelated (refuse).
        raise Refused(
            f"the backup's revision {','.join(from_revisions)} is older than or unrelated to "
            f"the target {to_revision}: restoring it cannot reach the target"
        ) from None
    if sorted(from_revisions) == [resolved]:
        result.plan_step("downgrade", f"skipped: the backup is already at {resolved}")
        return False, config, resolved, url
    _plan_schema(settings, target, resolved, from_revisions, options, result)
    return True, config, resolved, url


# --- undo ------------------------------------------------------------------------------


def rollback_undo(
    settings: Settings, options: RollbackOptions, prompt: Prompt | None = None
) -> RollbackResult:
    """Swap the newest kept pre-rollback database back in; the current one is kept in turn."""
    target = _inspect_target(settings)
    db = target.conninfo.dbname
    result = RollbackResult("undo", db, revision_before=",".join(target.revisions) or None)
    admin = maintenance_connection(target.conninfo)
    try:
        kept = kept_databases(admin, db)
        if not kept:
            raise Refused(
                f"no kept pre-rollback database of {db} to swap back "
                "(cleanup-artifacts may have removed it)"
            )
        previous = kept[0]
        new_kept = free_derived_name(admin, db, PRE_MARK)
        result.plan_step(
            "swap", f"RENAME {db} TO {new_kept}; RENAME {previous} TO {db} (undo again to reverse)"
        )
        if settings.dry_run:
            return result
        confirm_protected(settings, db, "rollback undo", prompt)
        with rollback_lock(target.conninfo, db):
            state = read_database_state(admin, db)
            with step("swap") as details:
                result.unavailable_ms = swap_databases(admin, db, previous, new_kept, state)
                details.update(unavailable_ms=round(result.unavailable_ms, 1))
            result.kept_database = new_kept
            _finish_validation(settings, target, result, None, None, options)
    finally:
        admin.close()
    result.revision_after = ",".join(_current_revisions(target.conninfo)) or None
    return result
