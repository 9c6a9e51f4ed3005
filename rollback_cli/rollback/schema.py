"""Schema rollbacks: Alembic downgrades in-process, planned from the revisions they revert."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import ManualAttention, OperationFailed, Refused
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.catalog import VERSION_TABLE, version_table_scope
from rollback_cli.rollback import migrations
from rollback_cli.rollback.lifecycle import (
    Procedure,
    RollbackContext,
    RollbackResult,
    current_revisions,
    plan_safety_backup,
)
from rollback_cli.rollback.rehearsal import Drop, rehearse

if TYPE_CHECKING:
    from rollback_cli.backups.manifest import Manifest


@dataclass(frozen=True)
class Downgrade:
    """A resolved downgrade: the Alembic config, the full target revision, the URL."""

    config: Any
    target: str
    url: str
    #: the version table's revisions after the rehearsed downgrade (several with branches)
    after: tuple[str, ...] | None = None

    @property
    def expected_revisions(self) -> list[str]:
        if self.after is not None:
            return list(self.after)
        return [] if self.target == migrations.BASE else [self.target]

    @property
    def revision_after(self) -> str | None:
        return ",".join(self.expected_revisions) or None


class SchemaRollback(Procedure):
    kind = "schema"
    action = "schema rollback"

    def __init__(self, ctx: RollbackContext, to_revision: str) -> None:
        super().__init__(ctx)
        self.to_revision = to_revision
        self.downgrade: Downgrade | None = None
        self.revisions: list[str] = []

    @contextmanager
    def prepare(self) -> Iterator[None]:
        with version_table_scope():
            yield

    def plan(self, result: RollbackResult) -> None:
        db = self.ctx.inspection.dbname
        result.plan_step("lock", f"advisory lock for {db} (free)")
        plan_safety_backup(self.ctx, result, "full backup")
        project = probe_project(self.ctx, result)
        self.revisions = project.heads
        self.downgrade = plan_downgrade(
            self.ctx, result, self.to_revision, project.heads, project=project
        )
        self.downgrade = plan_rehearsal(self.ctx, result, self.downgrade, project.heads)
        result.plan_step("validate", f"alembic_version must equal {self.downgrade.target}")

    def apply(self, result: RollbackResult) -> None:
        assert self.downgrade is not None
        run_downgrade(self.ctx, self.downgrade, self.revisions, result)

    def validation(self) -> tuple[list[str] | None, Manifest | None]:
        assert self.downgrade is not None
        return self.downgrade.expected_revisions, None

    def revision_after(self, result: RollbackResult) -> str | None:
        assert self.downgrade is not None
        return self.downgrade.revision_after


def plan_rehearsal(
    ctx: RollbackContext,
    result: RollbackResult,
    downgrade: Downgrade,
    revisions: list[str],
    *,
    backup: tuple[Any, Any, str] | None = None,
) -> Downgrade:
    """Rehearse the downgrade on a copy (unless --no-rehearsal): the plan shows, for every
    reverted revision, the SQL that really ran, its time, its locks and what it drops;
    dropping live data in a protected environment needs --accept-data-loss. Returns the
    downgrade with the revisions Alembic left in the rehearsal's version table."""
    if ctx.options.no_rehearsal:
        warning = "no rehearsal (--no-rehearsal): the downgrade runs untried on the live database"
        result.warnings.append(warning)
        result.plan_step("rehearsal", "skipped (--no-rehearsal)")
        return downgrade
    found = rehearse(ctx, downgrade.target, revisions, backup=backup)
    result.rehearsal = found.to_document()
    locks = sorted({lock for s in found.statements for lock in s["locks"]})
    copy = {
        "schema": "a copy of the live schema",
        "data": "a copy of the live database (schema and data)",
        "backup": "the backup restored into a scratch database",
    }[found.copy]
    result.plan_step(
        "rehearsal",
        f"ran on {copy} in {found.duration_ms} ms: {len(found.statements)} statements"
        + (f"; locks {', '.join(locks)}" if locks else ""),
    )
    for reverted in result.reverted:
        seen = found.for_revision(reverted["revision"])
        reverted["offline_sql"] = reverted.get("sql", "")
        reverted.update(seen, sql=";\n".join(seen["executed_sql"]))
        result.plan_step("rehearsed", _rehearsed_line(reverted["revision"], seen))
        outside = [sql for sql in seen["executed_sql"] if _OUTSIDE_TRANSACTION.search(sql)]
        if outside:
            warning = (
                f"{reverted['revision']} runs statements outside a transaction "
                f"({' '.join(outside[0].split())[:80]}): not atomic; if it fails part-way the "
                "database is left between revisions"
            )
            result.warnings.append(warning)
            result.plan_step("warning", warning)
    refuse_empty_downgrades(result, downgrade)
    for drop in found.drops:
        result.plan_step("drops", drop.describe())
    changed = [c for c in found.catalog if c["kind"] != "column" or c["change"] != "dropped"]
    if changed:
        shown = "; ".join(f"{c['kind']} {c['name']} {c['change']}" for c in changed[:8])
        more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
        result.plan_step("catalog", shown + more)
    if backup is None:  # a full rollback keeps the live data in the kept database
        _guard_data_loss(ctx, result, found.data_at_risk)
    if found.heads_after is not None:
        return replace(downgrade, after=tuple(sorted(found.heads_after)))
    return downgrade


# Statements PostgreSQL refuses inside a transaction block (Alembic's autocommit_block).
_OUTSIDE_TRANSACTION = re.compile(
    r"\b(INDEX\s+CONCURRENTLY|CONCURRENTLY\b|VACUUM\b|ALTER\s+TYPE\s+.*\bADD\s+VALUE\b)",
    re.IGNORECASE | re.DOTALL,
)


# Statements that change nothing (Alembic reads the catalog and its version table too).
_READS = re.compile(r"^\s*(SELECT|SHOW|SET|WITH\s+\w+\s+AS\s*\(\s*SELECT)\b", re.IGNORECASE)


def refuse_empty_downgrades(result: RollbackResult, downgrade: Downgrade) -> None:
    """A revision whose downgrade ran nothing in the rehearsal while its upgrade changes
    the schema is irreversible: rolling it back would leave the upgrade's changes."""
    for reverted in result.reverted:
        if any(not _READS.match(sql) for sql in reverted["executed_sql"]):
            reverted["empty"] = False
            continue
        step = migrations.RevisionStep(
            reverted["revision"], reverted["down_revision"], reverted["message"]
        )
        changes = migrations.upgrade_changes(downgrade.config, step, downgrade.url)
        reverted["empty"] = True
        if changes is None:
            warning = (
                f"{step.revision}'s downgrade ran no statement (its upgrade cannot be shown "
                "offline: check that it changes nothing)"
            )
            result.warnings.append(warning)
            result.plan_step("warning", warning)
        elif changes:
            reverted["irreversible"] = "its downgrade runs nothing while its upgrade does"
            raise Refused(
                f"downgrade cannot run: {step.revision} is irreversible (its downgrade runs "
                "no statement while its upgrade changes the database; rolling it back would "
                "leave those changes); nothing was changed",
                hint="roll back to a later revision, or use `rollback full` with a backup "
                "taken before it",
            )


def _rehearsed_line(revision: str, seen: dict[str, Any]) -> str:
    statements = seen["executed_sql"]
    shown = "; ".join(" ".join(sql.split())[:90] for sql in statements[:3])
    more = f" (+{len(statements) - 3} more)" if len(statements) > 3 else ""
    locks = f" [{', '.join(seen['locks'])}]" if seen["locks"] else ""
    body = f"{shown}{more}" if statements else "no statements"
    return f"{revision}: {len(statements)} statements, {seen['duration_ms']} ms{locks}: {body}"


def _guard_data_loss(ctx: RollbackContext, result: RollbackResult, at_risk: list[Drop]) -> None:
    if not at_risk:
        return
    lost = "; ".join(d.describe() for d in at_risk)
    warning = f"the downgrade destroys live data: {lost}"
    result.warnings.append(warning)
    if ctx.target.is_protected and not ctx.options.accept_data_loss:
        raise Refused(
            f"{warning}; nothing was changed",
            hint="pass --accept-data-loss to proceed, or use `rollback full` with a backup, "
            "which keeps the data",
        )


def probe_project(ctx: RollbackContext, result: RollbackResult) -> migrations.Project:
    """The project as its env.py sets it up (read-only, on the live database): the
    scripts, its version table (kept for this run) and the revisions that table holds."""
    config, _ = load_downgrade_config(ctx)
    project = migrations.probe(config, ctx.target.conninfo, ctx.options.timeouts)
    VERSION_TABLE.set((project.version_schema, project.version_table))
    if project.version_table_name != "alembic_version":
        result.plan_step("version-table", f"{project.version_table_name} (set by env.py)")
    revisions = ",".join(project.heads) or None
    if revisions != result.revision_before:
        result.revision_before = revisions
    return project


def load_downgrade_config(ctx: RollbackContext) -> tuple[Any, str]:
    """The project's Alembic config with the URL (and timeouts) of the target."""
    url = migrations.alembic_url(ctx.target.conninfo)
    return migrations.target_config(ctx.target, url), url


def plan_downgrade(
    ctx: RollbackContext,
    result: RollbackResult,
    to_revision: str,
    from_revisions: list[str],
    *,
    resolved: str | None = None,
    project: migrations.Project | None = None,
    rehearsed: bool | None = None,
) -> Downgrade:
    """Resolve the target, render each reverted revision's SQL, flag drops, empty and
    irreversible downgrades; refuse an irreversible one."""
    if rehearsed is None:
        rehearsed = not ctx.options.no_rehearsal
    config, url = load_downgrade_config(ctx)
    script = project.script if project is not None else migrations.script_directory(config)
    if resolved is None:
        resolved = migrations.resolve_target(script, to_revision, from_revisions)
    steps = migrations.steps_to(script, from_revisions, resolved)
    migrations.render_downgrade_sql(config, steps, url)
    result.reverted = [s.to_dict() for s in steps]
    flags = []
    for s in steps:
        if s.drops:
            flags.append(f"{s.revision} drops {', '.join(s.drops)}")
        if s.empty and not rehearsed:  # else what really runs is known from the rehearsal
            flags.append(f"{s.revision} has an empty downgrade")
        if s.irreversible:
            flags.append(f"{s.revision} is irreversible: {s.irreversible}")
        if s.online_only:
            flags.append(
                f"{s.revision} is online only (cannot render offline: {s.online_only}); "
                "its SQL is known once it runs"
            )
    result.warnings += flags
    revs = ", ".join(f"{s.revision} ({s.message})" for s in steps) or "nothing (already there)"
    timeouts = ctx.options.timeouts
    result.plan_step(
        "downgrade",
        f"alembic downgrade {','.join(from_revisions)} → {resolved}: "
        f"reverts {revs}; lock_timeout={timeouts.lock_timeout_ms}ms, "
        f"statement_timeout={timeouts.statement_timeout_ms}ms",
    )
    for flag in flags:
        result.plan_step("warning", flag)
    irreversible = [s for s in steps if s.irreversible]
    if irreversible:
        raise Refused(
            f"downgrade cannot run: {irreversible[0].revision} is irreversible "
            f"({irreversible[0].irreversible})"
        )
    return Downgrade(config, resolved, url)


def run_downgrade(
    ctx: RollbackContext, downgrade: Downgrade, before: list[str], result: RollbackResult
) -> None:
    """Downgrade; say exactly where the database is when it fails part-way."""
    conninfo = ctx.target.conninfo
    with step("downgrade", to_revision=downgrade.target):
        try:
            owned = migrations.downgrade(
                downgrade.config,
                downgrade.target,
                downgrade.url,
                ctx.target.conninfo,
                ctx.options.timeouts,
            )
            get_logger().info(
                "downgrade ran",
                statements=len(owned.statements),
                sql=[s.sql[:200] for s in owned.statements[:50]],
            )
        except OperationFailed as exc:
            now = current_revisions(conninfo)
            if sorted(now) == sorted(before):
                raise OperationFailed(
                    f"{exc.message}; database unchanged at {','.join(now) or 'none'}"
                ) from None
            raise ManualAttention(
                f"{exc.message}; the database is now at revision {','.join(now) or 'none'} "
                f"(was {','.join(before)}, target {downgrade.target}); re-run the schema "
                "rollback or restore the safety backup"
                + (f" {result.safety_backup.uri}" if result.safety_backup else "")
            ) from None
    now = current_revisions(conninfo)
    if sorted(now) != downgrade.expected_revisions:
        raise ManualAttention(
            f"after the downgrade alembic_version is {','.join(now) or 'none'}, "
            f"expected {downgrade.target}"
        )
