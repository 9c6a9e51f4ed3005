"""``rollback undo``: swap the database kept by the last data rollback back in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rollback_cli.errors import Refused
from rollback_cli.log import step
from rollback_cli.postgres.catalog import read_database_state
from rollback_cli.postgres.connection import maintenance_connection
from rollback_cli.postgres.names import PRE_MARK, free_derived_name
from rollback_cli.postgres.swap import Swap, swap_databases
from rollback_cli.rollback.artifacts import kept_databases
from rollback_cli.rollback.lifecycle import Procedure, RollbackResult

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection


class UndoRollback(Procedure):
    """The current database is kept in turn, so an undo can itself be undone. The kept
    database is the safety copy: no safety backup is taken."""

    kind = "undo"
    action = "rollback undo"
    takes_safety_backup = False

    _admin: PgConnection | None = None
    _swap: Swap | None = None

    @contextmanager
    def prepare(self) -> Iterator[None]:
        self._admin = maintenance_connection(self.ctx.target.conninfo)
        try:
            yield
        finally:
            self._admin.close()
            self._admin = None

    def plan(self, result: RollbackResult) -> None:
        assert self._admin is not None
        db = self.ctx.inspection.dbname
        kept = kept_databases(self._admin, db)
        if not kept:
            raise Refused(
                f"no kept pre-rollback database of {db} to swap back "
                "(cleanup-artifacts may have removed it)"
            )
        self._swap = Swap(db, kept[0], free_derived_name(self._admin, db, PRE_MARK))
        result.plan_step("swap", f"{self._swap.describe(blocking=False)} (undo again to reverse)")

    def apply(self, result: RollbackResult) -> None:
        assert self._admin is not None and self._swap is not None
        state = read_database_state(self._admin, self._swap.live)
        with step("swap") as details:
            result.unavailable_ms = swap_databases(self._admin, self._swap, state)
            details.update(unavailable_ms=round(result.unavailable_ms, 1))
        result.kept_database = self._swap.kept_name
