"""Full rollbacks: the data rollback from a backup, then the schema rollback, one safety
backup and one validation for both."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rollback_cli.errors import ManualAttention, Refused, RollbackError
from rollback_cli.rollback import migrations
from rollback_cli.rollback.data import DataRollback
from rollback_cli.rollback.lifecycle import RollbackContext, RollbackResult, plan_validation
from rollback_cli.rollback.schema import (
    Downgrade,
    load_downgrade_config,
    plan_downgrade,
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
            # Not an ancestor of the backup's revision: newer (refuse) or unrelated (refuse).
            raise Refused(
                f"the backup's revision {','.join(from_revisions)} is older than or unrelated "
                f"to the target {self.to_revision}: restoring it cannot reach the target"
            ) from None
        self.target_revision = resolved
        if sorted(from_revisions) == [resolved]:
            result.plan_step("downgrade", f"skipped: the backup is already at {resolved}")
        else:
            self.downgrade = plan_downgrade(
                self.ctx, result, resolved, from_revisions, resolved=resolved
            )
        what = "Alembic revision after the downgrade" if self.downgrade else "manifest row counts"
        plan_validation(self.ctx, result, what)

    def apply(self, result: RollbackResult) -> None:
        super().apply(result)
        if self.downgrade is None:
            return
        try:
            run_downgrade(self.ctx, self.downgrade, self.backup.manifest.alembic_revisions, result)
        except RollbackError as exc:
            raise ManualAttention(
                f"data restored from {self.backup.key} (old database kept as "
                f"{result.kept_database}) but the schema step failed: {exc.one_line()}"
            ) from None

    def validation(self) -> tuple[list[str] | None, Manifest | None]:
        expected = [] if self.target_revision == migrations.BASE else [self.target_revision]
        # Row counts were compared before anyone could write (see DataRollback.validation).
        return expected, None

    def revision_after(self, result: RollbackResult) -> str | None:
        return None if self.target_revision == migrations.BASE else self.target_revision
