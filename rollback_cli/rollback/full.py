"""Full rollbacks: the data rollback from a backup, then the schema rollback, one safety
backup and one validation for both.

With the swap strategy the downgrade runs on the restored copy before it is swapped in:
it is rehearsal and change at once, and the live database sees only the swap. A downgrade
that fails there leaves the live database untouched (exit 5). In place, and in a dry run,
the downgrade is first rehearsed on the backup restored into a scratch database.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from rollback_cli.errors import ManualAttention, OperationFailed, Refused, RollbackError
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.catalog import alembic_revisions
from rollback_cli.postgres.connection import connect
from rollback_cli.rollback import migrations
from rollback_cli.rollback.data import DataRollback
from rollback_cli.rollback.lifecycle import RollbackContext, RollbackResult, plan_validation
from rollback_cli.rollback.rehearsal import run_on_copy
from rollback_cli.rollback.schema import (
    Downgrade,
    load_downgrade_config,
    plan_downgrade,
    plan_rehearsal,
    refuse_empty_downgrades,
    run_downgrade,
)

if TYPE_CHECKING:
    from rollback_cli.backups.manifest import Manifest


class FullRollback(DataRollback):
    """Restore the backup, then downgrade from the backup's revision to the target; the
    downgrade is skipped when the backup is already there and refused when it is older."""

    kind = "full"
    action = "full rollback"

    def __init__(self, ctx: RollbackContext, backup_ref: str, to_revision: str) -> None:
        super().__init__(ctx, backup_ref)
        self.to_revision = to_revision
        self.downgrade: Downgrade | None = None
        self.target_revision = ""

    @property
    def _downgrades_the_copy(self) -> bool:
        return self.ctx.options.strategy == "swap" and not self.ctx.run.dry_run

    def plan(self, result: RollbackResult, *, validate: bool = True) -> None:
        super().plan(result, validate=False)
        from_revisions = self.backup.manifest.alembic_revisions
        if not from_revisions:
            raise Refused(
                "the backup records no Alembic revision; use `rollback data` and then "
                "`rollback schema`"
            )
        config, _ = load_downgrade_config(self.ctx)
        script = migrations.script_directory(config)
        try:
            resolved = migrations.resolve_target(script, self.to_revision, from_revisions)
        except migrations.NotBehind:
            raise Refused(
                f"the backup's revision {','.join(from_revisions)} is older than or unrelated "
                f"to the target {self.to_revision}: restoring it cannot reach the target"
            ) from None
        self.target_revision = resolved
        if sorted(from_revisions) == [resolved]:
            result.plan_step("downgrade", f"skipped: the backup is already at {resolved}")
        else:
            self.downgrade = plan_downgrade(
                self.ctx,
                result,
                resolved,
                from_revisions,
                resolved=resolved,
                rehearsed=not self.ctx.options.no_rehearsal,
            )
            self._plan_rehearsal(result, from_revisions)
        what = "Alembic revision after the downgrade" if self.downgrade else "manifest row counts"
        plan_validation(self.ctx, result, what)

    def _plan_rehearsal(self, result: RollbackResult, from_revisions: list[str]) -> None:
        assert self.downgrade is not None
        if self._downgrades_the_copy:
            result.plan_step(
                "rehearsal",
                "the downgrade runs on the restored copy, before the swap: the live "
                "database sees only the swap, and a failing downgrade leaves it untouched",
            )
            return
        backup = (self.backup.tools, self.backup.local, self.backup.manifest.format)
        self.downgrade = plan_rehearsal(
            self.ctx, result, self.downgrade, from_revisions, backup=backup
        )

    def before_swap(self, copy: str, result: RollbackResult) -> None:
        """Downgrade the restored copy; the live database is still untouched."""
        if self.downgrade is None:
            return
        scratch = self.ctx.target.conninfo.with_dbname(copy)
        with step("downgrade-copy", to_revision=self.downgrade.target, database=copy):
            try:
                owned, duration = run_on_copy(self.ctx, scratch, self.downgrade.target)
            except Refused:
                raise
            except RollbackError as exc:
                raise OperationFailed(
                    f"the downgrade of the restored copy failed: {exc.one_line()}; the live "
                    "database was not touched (database unchanged)"
                ) from None
        conn = connect(scratch)
        try:
            now = alembic_revisions(conn)
        finally:
            conn.close()
        if owned.heads_after is not None:
            self.downgrade = replace(self.downgrade, after=tuple(sorted(owned.heads_after)))
        if sorted(now) != self.downgrade.expected_revisions:
            raise OperationFailed(
                f"after the downgrade the restored copy is at {','.join(now) or 'none'}, "
                f"expected {self.downgrade.target}; the live database was not touched "
                "(database unchanged)"
            )
        for reverted in result.reverted:
            statements = [
                s for s in owned.migration_statements() if s.revision == reverted["revision"]
            ]
            reverted["executed_sql"] = [s.sql for s in statements]
            reverted["duration_ms"] = round(sum(s.duration_ms for s in statements), 1)
        refuse_empty_downgrades(result, self.downgrade)
        get_logger().info(
            "downgrade ran on the restored copy", statements=len(owned.statements), ms=duration
        )

    def apply(self, result: RollbackResult) -> None:
        super().apply(result)
        if self.downgrade is None or self._downgrades_the_copy:
            return
        try:
            run_downgrade(self.ctx, self.downgrade, self.backup.manifest.alembic_revisions, result)
        except RollbackError as exc:
            raise ManualAttention(
                f"data restored from {self.backup.key} in place but the schema step failed: "
                f"{exc.one_line()}"
            ) from None

    def validation(self) -> tuple[list[str] | None, Manifest | None]:
        if self.downgrade is not None:
            return self.downgrade.expected_revisions, None
        expected = [] if self.target_revision == migrations.BASE else [self.target_revision]
        # Row counts were compared before anyone could write (see DataRollback.validation).
        return expected, None

    def revision_after(self, result: RollbackResult) -> str | None:
        if self.downgrade is not None:
            return self.downgrade.revision_after
        return None if self.target_revision == migrations.BASE else self.target_revision
