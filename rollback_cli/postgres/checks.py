"""What ``validate`` and ``status`` ask of the database and the client directory.

Operator checks run read-only: each in its own transaction started with ``SET TRANSACTION
READ ONLY``, under a ``statement_timeout``, and rolled back afterwards, so a check that
writes fails and one that hangs is cancelled. Tables the role may not read raise
:class:`UnreadableTable` (a ConfigError, exit 3) naming the grant that is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rollback_cli.errors import ConfigError
from rollback_cli.postgres.catalog import alembic_revisions, table_row_counts
from rollback_cli.postgres.connection import first_line

if TYPE_CHECKING:
    from collections.abc import Callable

    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.postgres.clients import ClientTools

#: statement_timeout of one operator check
CHECK_TIMEOUT_MS = 30_000

_T = TypeVar("_T")


def run_read_only_check(
    conn: PgConnection, sql: str, *, timeout_ms: int = CHECK_TIMEOUT_MS
) -> tuple[bool, str]:
    """Run an operator's check query, which must return one boolean: (passed, detail).

    The query runs alone in a read-only transaction with ``statement_timeout`` set to
    ``timeout_ms`` and is rolled back afterwards, whatever it did. ``conn`` must not be
    inside a transaction; its autocommit setting is restored.
    """
    import psycopg2
    from psycopg2 import sql as pgsql
    from psycopg2.extensions import TRANSACTION_STATUS_IDLE

    statement = sql.strip().rstrip(";").strip()
    if not statement:
        return False, "the check holds no SQL"
    if ";" in statement:
        # Several statements in one simple query could COMMIT the read-only transaction and
        # run the rest outside it: a check is exactly one statement.
        return False, "a check must be one statement (it holds ';')"
    if conn.closed:
        return False, "query failed: the connection is closed"
    if conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
        raise RuntimeError("run_read_only_check needs a connection outside a transaction")
    autocommit = conn.autocommit
    conn.autocommit = False  # psycopg2 opens the transaction (BEGIN) before the first query
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute(
                pgsql.SQL("SET LOCAL statement_timeout = {}").format(
                    pgsql.Literal(max(int(timeout_ms), 1))
                )
            )
            cur.execute(statement)
            row = cur.fetchone() if cur.description is not None else None
    except psycopg2.Error as exc:
        return False, f"query failed: {first_line(exc)}"
    finally:
        _end_transaction(conn, autocommit)
    if row is None or len(row) != 1 or not isinstance(row[0], bool):
        return False, f"expected one boolean, got {row!r}"
    return bool(row[0]), "true" if row[0] else "returned false"


def _end_transaction(conn: PgConnection, autocommit: bool) -> None:
    import psycopg2

    if conn.closed:
        return
    try:
        conn.rollback()
        conn.autocommit = autocommit
    except psycopg2.Error:
        pass  # the connection broke: the server discards the transaction with it


class UnreadableTable(ConfigError):
    """The role lacks SELECT on a table ``validate`` or ``status`` reads."""

    def __init__(self, action: str, reason: str, role: str) -> None:
        super().__init__(f"{action}: {reason}", hint=f"grant SELECT on it to {role}")
        self.reason = reason
        self.role = role


def readable_revisions(conn: PgConnection) -> list[str]:
    """The revisions in ``alembic_version`` (empty when there is no such table); raises
    :class:`UnreadableTable` when the role may not read it."""
    return _readable(conn, "cannot read alembic_version", lambda: alembic_revisions(conn))


def readable_row_counts(conn: PgConnection) -> dict[str, int]:
    """Exact row counts of every user table; raises :class:`UnreadableTable` when the role
    may not read one of them."""
    return _readable(conn, "cannot count rows", lambda: table_row_counts(conn))


def _readable(conn: PgConnection, action: str, read: Callable[[], _T]) -> _T:
    from psycopg2 import errors

    try:
        return read()
    except errors.InsufficientPrivilege as exc:
        if not conn.autocommit:
            conn.rollback()
        raise UnreadableTable(action, first_line(exc), _current_user(conn)) from None


def _current_user(conn: PgConnection) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        row = cur.fetchone()
    return str(row[0]) if row else "the role"


def missing_client_tools(tools: ClientTools) -> list[str]:
    """Which of pg_dump, pg_restore and psql are not executable files in ``tools.bin_dir``."""
    paths = {"pg_dump": tools.pg_dump, "pg_restore": tools.pg_restore, "psql": tools.psql}
    return [
        name
        for name, path in paths.items()
        if not (Path(path).is_file() and os.access(path, os.X_OK))
    ]
