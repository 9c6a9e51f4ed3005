"""The rehearsal: a schema rollback's real downgrade, run first on a copy of the live
database's schema, through the project's own env.py.

It shows what offline SQL cannot: the statements that really ran (for every revision,
those that look at the live connection too), their durations and the locks they take,
what they dropped, and how many live rows or values each drop would destroy. A downgrade
that fails here stops the run before the live database is touched.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rollback_cli.backups.scratch import schema_copy
from rollback_cli.errors import OperationFailed, Refused, RollbackError
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.catalog import count_values, user_columns
from rollback_cli.postgres.connection import connect, maintenance_connection
from rollback_cli.rollback import migrations

if TYPE_CHECKING:
    from rollback_cli.rollback.lifecycle import RollbackContext

_LOCKS = (
    (
        re.compile(
            r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY\b.*?\bON\s+([\w.\"]+)", re.I | re.S
        ),
        "SHARE UPDATE EXCLUSIVE",
    ),
    (
        re.compile(
            r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\b.*?\bON\s+(?:ONLY\s+)?([\w.\"]+)", re.I | re.S
        ),
        "SHARE",
    ),
    (
        re.compile(r"^\s*(ALTER|DROP)\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?([\w.\"]+)", re.I),
        "ACCESS EXCLUSIVE",
    ),
    (re.compile(r"^\s*(DELETE\s+FROM|UPDATE|INSERT\s+INTO)\s+([\w.\"]+)", re.I), "ROW EXCLUSIVE"),
)


@dataclass
class Drop:
    schema: str
    table: str
    column: str | None
    live_values: int

    def describe(self) -> str:
        what = (
            f"column {self.schema}.{self.table}.{self.column}"
            if self.column
            else (f"table {self.schema}.{self.table}")
        )
        unit = "non-null values" if self.column else "rows"
        return f"{what} ({self.live_values} {unit} in the live database)"


@dataclass
class Rehearsal:
    duration_ms: float
    statements: list[dict[str, Any]] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)

    @property
    def data_at_risk(self) -> list[Drop]:
        return [d for d in self.drops if d.live_values > 0]

    def to_document(self) -> dict[str, Any]:
        return {
            "duration_ms": self.duration_ms,
            "statements": self.statements,
            "drops": [
                {
                    "schema": d.schema,
                    "table": d.table,
                    "column": d.column,
                    "live_values": d.live_values,
                }
                for d in self.drops
            ],
        }


def lock_of(statement: str) -> str | None:
    for pattern, mode in _LOCKS:
        match = pattern.match(statement)
        if match:
            return f"{mode} on {match.group(2).replace(chr(34), '')}"
    return None


def rehearse(ctx: RollbackContext, target_revision: str, revisions: list[str]) -> Rehearsal:
    """Run the downgrade to ``target_revision`` on a schema copy; OperationFailed (exit 5)
    when it fails there, with the live database untouched."""
    admin = maintenance_connection(ctx.target.conninfo)
    try:
        with step("rehearsal") as details, schema_copy(admin, ctx.target, revisions) as copy:
            scratch = ctx.target.conninfo.with_dbname(copy)
            before = _columns(scratch)
            url = migrations.alembic_url(scratch, ctx.options.timeouts)
            config = migrations.load_config(ctx.target.alembic_config, url)
            started = time.monotonic()
            owned = migrations.downgrade(
                config,
                target_revision,
                url,
                scratch,
                ctx.options.timeouts,
                redirect_from=ctx.target.conninfo,
            )
            duration = round((time.monotonic() - started) * 1000, 1)
            after = _columns(scratch)
            details.update(statements=len(owned.statements), downgrade_ms=duration)
    except Refused:
        raise  # env.py reaches another database: refused as it is (exit 7)
    except RollbackError as exc:
        raise OperationFailed(
            f"the rehearsal of the downgrade failed: {exc.one_line()}; the live database was "
            "not touched (database unchanged)"
        ) from None
    finally:
        admin.close()
    rehearsal = Rehearsal(duration)
    for statement in owned.statements:
        if "alembic_version" in statement.sql:
            continue
        rehearsal.statements.append(
            {
                "sql": statement.sql,
                "duration_ms": statement.duration_ms,
                "lock": lock_of(statement.sql),
            }
        )
    rehearsal.drops = _drops(ctx, before, after)
    get_logger().info(
        "rehearsal finished",
        duration_ms=duration,
        statements=len(rehearsal.statements),
        drops=[d.describe() for d in rehearsal.drops],
    )
    return rehearsal


def _columns(conninfo: Any) -> set[tuple[str, str, str]]:
    conn = connect(conninfo)
    try:
        return user_columns(conn)
    finally:
        conn.close()


def _drops(
    ctx: RollbackContext, before: set[tuple[str, str, str]], after: set[tuple[str, str, str]]
) -> list[Drop]:
    """What the downgrade dropped, with what the live database holds there now."""
    tables_after = {(s, t) for s, t, _ in after}
    dropped_tables = sorted({(s, t) for s, t, _ in before} - tables_after)
    dropped_columns = sorted((s, t, c) for s, t, c in before - after if (s, t) in tables_after)
    if not dropped_tables and not dropped_columns:
        return []
    live = connect(ctx.target.conninfo)
    try:
        drops = [Drop(s, t, None, count_values(live, s, t, None)) for s, t in dropped_tables]
        drops += [Drop(s, t, c, count_values(live, s, t, c)) for s, t, c in dropped_columns]
    finally:
        live.close()
    return drops
