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
from typing import TYPE_CHECKING, Any, cast

from rollback_cli.backups.scratch import schema_copy
from rollback_cli.errors import OperationFailed, Refused, RollbackError
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.catalog import count_values, schema_objects, user_columns
from rollback_cli.postgres.connection import connect, maintenance_connection
from rollback_cli.rollback import migrations
from rollback_cli.rollback.environment import OwnedEnvironment

if TYPE_CHECKING:
    from rollback_cli.rollback.lifecycle import RollbackContext
    from rollback_cli.settings import ConnInfo

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
    #: the revision whose downgrade dropped it (None when no statement names it)
    revision: str | None = None

    def describe(self) -> str:
        what = (
            f"column {self.schema}.{self.table}.{self.column}"
            if self.column
            else (f"table {self.schema}.{self.table}")
        )
        unit = "non-null values" if self.column else "rows"
        return f"{what} ({self.live_values} {unit} in the live database)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "table": self.table,
            "column": self.column,
            "live_values": self.live_values,
            "revision": self.revision,
        }


@dataclass
class Rehearsal:
    duration_ms: float
    #: what it ran on: "schema" (a copy of the live schema), "data" (of the live data too)
    #: or "backup" (the backup a full rollback restores)
    copy: str = "schema"
    statements: list[dict[str, Any]] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    #: the version table's revisions after the rehearsed downgrade (Alembic's own)
    heads_after: list[str] | None = None
    #: what the downgrade dropped, created or changed in the catalog
    catalog: list[dict[str, str | None]] = field(default_factory=list)

    @property
    def data_at_risk(self) -> list[Drop]:
        return [d for d in self.drops if d.live_values > 0]

    def for_revision(self, revision: str) -> dict[str, Any]:
        """What the rehearsal saw of one reverted revision: its statements, their time,
        locks, and the drops with the live rows or values they destroy."""
        statements = [s for s in self.statements if s["revision"] == revision]
        drops = [d for d in self.drops if d.revision == revision]
        return {
            "executed_sql": [s["sql"] for s in statements],
            "duration_ms": round(sum(s["duration_ms"] for s in statements), 1),
            "locks": sorted({lock for s in statements for lock in s["locks"]}),
            "dropped": [d.to_dict() for d in drops],
            "rows_at_risk": sum(d.live_values for d in drops),
        }

    def to_document(self) -> dict[str, Any]:
        return {
            "duration_ms": self.duration_ms,
            "copy": self.copy,
            "statements": self.statements,
            "drops": [d.to_dict() for d in self.drops],
            "heads_after": self.heads_after,
            "catalog": self.catalog,
        }


def lock_of(statement: str) -> str | None:
    for pattern, mode in _LOCKS:
        match = pattern.match(statement)
        if match:
            return f"{mode} on {match.group(2).replace(chr(34), '')}"
    return None


def rehearse(
    ctx: RollbackContext,
    target_revision: str,
    revisions: list[str],
    *,
    backup: tuple[Any, Any, str] | None = None,
) -> Rehearsal:
    """Run the downgrade to ``target_revision`` on a copy (the live schema, its data too
    with --rehearse-with-data, or ``backup`` restored); OperationFailed (exit 5) when it
    fails there, with the live database untouched."""
    with_data = ctx.options.rehearse_with_data
    kind = "backup" if backup is not None else "data" if with_data else "schema"
    admin = maintenance_connection(ctx.target.conninfo)
    try:
        with (
            step("rehearsal", copy=kind) as details,
            schema_copy(admin, ctx.target, revisions, with_data=with_data, backup=backup) as copy,
        ):
            scratch = ctx.target.conninfo.with_dbname(copy)
            before, objects_before = _catalog(scratch)
            owned, duration = run_on_copy(ctx, scratch, target_revision)
            after, objects_after = _catalog(scratch)
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
    found = _findings(ctx, kind, duration, owned, before, after)
    found.catalog = catalog_changes(objects_before, objects_after)
    return found


def run_on_copy(
    ctx: RollbackContext, scratch: ConnInfo, target_revision: str
) -> tuple[OwnedEnvironment, float]:
    """The project's downgrade through its env.py on the copy ``scratch``; a connection
    env.py opens to the live database is redirected to the copy."""
    url = migrations.alembic_url(scratch)
    config = migrations.target_config(ctx.target, url)
    started = time.monotonic()
    owned = migrations.downgrade(
        config,
        target_revision,
        url,
        scratch,
        ctx.options.timeouts,
        redirect_from=ctx.target.conninfo,
    )
    return owned, round((time.monotonic() - started) * 1000, 1)


def _findings(
    ctx: RollbackContext,
    kind: str,
    duration: float,
    owned: OwnedEnvironment,
    before: set[tuple[str, str, str]],
    after: set[tuple[str, str, str]],
) -> Rehearsal:
    rehearsal = Rehearsal(duration, kind, heads_after=owned.heads_after)
    for statement in owned.migration_statements():
        rehearsal.statements.append(
            {
                "revision": statement.revision,
                "sql": statement.sql,
                "duration_ms": statement.duration_ms,
                # What the server reported; else (not observed, or released at once in
                # autocommit) what the statement's text implies.
                "locks": statement.locks or [lock for lock in [lock_of(statement.sql)] if lock],
            }
        )
    rehearsal.drops = _drops(ctx, before, after)
    for drop in rehearsal.drops:
        drop.revision = _dropped_by(drop, rehearsal.statements)
    get_logger().info(
        "rehearsal finished",
        duration_ms=duration,
        statements=len(rehearsal.statements),
        drops=[d.describe() for d in rehearsal.drops],
    )
    return rehearsal


def _dropped_by(drop: Drop, statements: list[dict[str, Any]]) -> str | None:
    """The revision of the first statement that drops what ``drop`` names."""
    names = [drop.table] if drop.column is None else [drop.table, drop.column]
    for statement in statements:
        text = statement["sql"].replace('"', "")
        if re.search(r"\bDROP\b", text, re.I) and all(
            re.search(rf"\b{re.escape(name)}\b", text) for name in names
        ):
            return cast("str | None", statement["revision"])
    # A table rebuilt by batch_alter_table (copy, drop, rename) names only the new table.
    for statement in statements:
        if re.search(rf"\b{re.escape(drop.table)}\b", statement["sql"].replace('"', "")):
            return cast("str | None", statement["revision"])
    return None


def catalog_changes(
    before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]
) -> list[dict[str, str | None]]:
    """Tables, columns, indexes, constraints, types and sequences dropped, created or
    changed (a column's type or nullability, an index's or constraint's definition)."""
    changes: list[dict[str, str | None]] = []
    for kind in before.keys() | after.keys():
        old, new = before.get(kind, {}), after.get(kind, {})
        for name in sorted(old.keys() | new.keys()):
            if name not in new:
                change = "dropped"
            elif name not in old:
                change = "created"
            elif old[name] != new[name]:
                change = "changed"
            else:
                continue
            changes.append(
                {
                    "kind": kind,
                    "name": name,
                    "change": change,
                    "before": old.get(name),
                    "after": new.get(name),
                }
            )
    order = ("table", "column", "constraint", "index", "type", "sequence")
    return sorted(changes, key=lambda c: (order.index(str(c["kind"])), str(c["name"])))


def _catalog(
    conninfo: Any,
) -> tuple[set[tuple[str, str, str]], dict[str, dict[str, str]]]:
    """The copy's columns (what drops are counted on) and its objects, on one connection."""
    conn = connect(conninfo)
    try:
        return user_columns(conn), schema_objects(conn)
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
        # A full rollback rehearses on its backup: what the live database lacks holds nothing.
        present = user_columns(live)
        tables = {(s, t) for s, t, _ in present}

        def count(schema: str, table: str, column: str | None) -> int:
            there = (
                (schema, table) in tables if column is None else (schema, table, column) in present
            )
            return count_values(live, schema, table, column) if there else 0

        drops = [Drop(s, t, None, count(s, t, None)) for s, t in dropped_tables]
        drops += [Drop(s, t, c, count(s, t, c)) for s, t, c in dropped_columns]
    finally:
        live.close()
    return drops
