"""``rollback undo``: swap back exactly the database the last data rollback kept.

"The last" is known by record, not by name or date: the kept database whose record says
it was replaced by the database now live. If that one is gone, undo refuses rather than
reach for an older, unrelated state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rollback_cli.errors import Refused
from rollback_cli.log import step
from rollback_cli.postgres.catalog import DatabaseLevelState, read_database_state
from rollback_cli.postgres.connection import current_run_id, maintenance_connection
from rollback_cli.postgres.ddl import apply_database_state
from rollback_cli.postgres.names import PRE_MARK, free_derived_name
from rollback_cli.postgres.registry import Artifact
from rollback_cli.postgres.swap import Swap, check_swap_allowed, swap_databases
from rollback_cli.rollback.artifacts import kept_databases, undo_candidate
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
    _candidate: Artifact | None = None
    _state: DatabaseLevelState | None = None

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
        candidate = undo_candidate(self._admin, db)
        if candidate is None:
            older = [a.name for a in kept_databases(self._admin, db)]
            if not older:
                raise Refused(
                    f"no kept pre-rollback database of {db} to swap back "
                    "(cleanup-artifacts may have removed it)"
                )
            raise Refused(
                f"the database kept by the last rollback of {db} is gone (dropped by hand or "
                f"by cleanup-artifacts); older kept databases ({', '.join(older)}) are not "
                "swapped back: they hold older states than the one undo would restore"
            )
        self._state = read_database_state(self._admin, db)
        checked = check_swap_allowed(self._admin, db, self._state)
        self._candidate = candidate
        self._swap = Swap(db, candidate.name, free_derived_name(self._admin, db, PRE_MARK))
        result.plan_step(
            "swap",
            f"{self._swap.describe(blocking=False)} ({candidate.name} was kept by the last "
            f"rollback, {candidate.record.created_at}; {checked} statements checked; undo "
            "again to reverse)",
        )

    def apply(self, result: RollbackResult) -> None:
        assert self._admin is not None and self._swap is not None
        assert self._candidate is not None and self._state is not None
        apply_database_state(self._admin, self._swap.replacement, self._state)
        with step("swap") as details:
            result.unavailable_ms = swap_databases(
                self._admin, self._swap, self._state, self._candidate.record, current_run_id()
            )
            details.update(unavailable_ms=round(result.unavailable_ms, 1))
        result.kept_database = self._swap.kept_name
