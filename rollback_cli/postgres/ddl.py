"""Cluster-level DDL: create, drop and rename databases, block and end their sessions,
carry database-level settings and grants.

Every statement is composed with :mod:`psycopg2.sql`: identifiers and literals are quoted
by the driver, never by Python string formatting, so a ``%`` or a quote in a database,
role or setting name is just a character.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg2 import sql

from rollback_cli.errors import OperationFailed
from rollback_cli.postgres.connection import first_line

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.postgres.catalog import DatabaseLevelState, DatabaseProperties

TERMINATE_WAIT_SECONDS = 10.0
# The privileges a database ACL can hold (aclexplode's names); anything else is refused.
DATABASE_PRIVILEGES = frozenset({"CONNECT", "CREATE", "TEMPORARY"})
# Settings whose value is a list: re-applied as one literal per element, as pg_dump does
# (variable_is_guc_list_quote in pg_dump), or ``search_path = 'app, public'`` would become
# the single quoted schema name "app, public".
LIST_SETTINGS = frozenset(
    {
        "local_preload_libraries",
        "search_path",
        "session_preload_libraries",
        "shared_preload_libraries",
        "temp_tablespaces",
        "unix_socket_directories",
    }
)


def execute(
    conn: PgConnection, statement: sql.Composable, params: Sequence[Any] | None = None
) -> None:
    with conn.cursor() as cur:
        cur.execute(statement, params)


def create_database_like(
    conn: PgConnection,
    new_name: str,
    like: DatabaseProperties | None,
    *,
    set_owner: bool,
    purpose: str = "the restore",
) -> None:
    """CREATE DATABASE with the encoding, collation, ctype, tablespace (and owner, when
    ``set_owner``) of ``like``.

    The TABLESPACE clause is left out for pg_default: naming it needs CREATE on it, which
    only superusers have by default, and template0 puts the database there anyway.
    """
    import psycopg2

    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(new_name))]
    if like is not None:
        parts.append(
            sql.SQL("ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                sql.Literal(like.encoding), sql.Literal(like.collate), sql.Literal(like.ctype)
            )
        )
        if like.tablespace != "pg_default":
            parts.append(sql.SQL("TABLESPACE {}").format(sql.Identifier(like.tablespace)))
        if like.locale_provider == "i" and like.icu_locale:
            parts.append(
                sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(like.icu_locale))
            )
        elif like.locale_provider == "b" and like.icu_locale:
            parts.append(
                sql.SQL("LOCALE_PROVIDER builtin BUILTIN_LOCALE {}").format(
                    sql.Literal(like.icu_locale)
                )
            )
        if set_owner:
            parts.append(sql.SQL("OWNER {}").format(sql.Identifier(like.owner)))
    try:
        execute(conn, sql.SQL(" ").join(parts))
    except psycopg2.Error as exc:
        raise OperationFailed(
            f"cannot create the scratch database {new_name} for {purpose}: {first_line(exc)}",
            hint="the role needs CREATEDB (and CREATE on the database's tablespace)",
        ) from None


def drop_database(conn: PgConnection, name: str) -> None:
    force = sql.SQL(" WITH (FORCE)") if conn.server_version >= 130000 else sql.SQL("")
    execute(conn, sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))


def split_setting_list(value: str) -> list[str]:
    """The elements of a list-valued setting as PostgreSQL stores it (``app, "My S", public``):
    separated by commas, double-quoted where needed (``""`` is a quote)."""
    items: list[str] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i].isspace():
            i += 1
        if i < n and value[i] == '"':
            i += 1
            item = []
            while i < n:
                if value[i] == '"':
                    if i + 1 < n and value[i + 1] == '"':
                        item.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                item.append(value[i])
                i += 1
            items.append("".join(item))
            while i < n and value[i] != ",":
                i += 1
        else:
            end = value.find(",", i)
            end = n if end == -1 else end
            items.append(value[i:end].strip())
            i = end
        i += 1  # the comma
    return items


def _setting_value(name: str, value: str) -> sql.Composable:
    if name.lower() in LIST_SETTINGS:
        return sql.SQL(", ").join(sql.Literal(item) for item in split_setting_list(value))
    return sql.Literal(value)


def setting_statements(dbname: str, state: DatabaseLevelState) -> list[sql.Composable]:
    """What carries ``state`` onto ``dbname``: every database-level and per-role setting,
    exactly (list values stay lists), the ACL and the connection limit. Existing settings
    of ``dbname`` are reset first, so the result equals ``state`` whatever it held."""
    db = sql.Identifier(dbname)
    statements: list[sql.Composable] = [sql.SQL("ALTER DATABASE {} RESET ALL").format(db)]
    for role, setting in state.settings:
        name, _, value = setting.partition("=")
        target = (
            sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role), db)
            if role
            else sql.SQL("ALTER DATABASE {}").format(db)
        )
        statements.append(
            sql.SQL("{} SET {} = {}").format(
                target, sql.Identifier(name), _setting_value(name, value)
            )
        )
    if state.acl is not None:
        statements.append(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        for grantee, privilege, grantable in state.acl:
            if privilege not in DATABASE_PRIVILEGES:
                raise OperationFailed(f"unknown database privilege {privilege!r} on {dbname}")
            who = sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee)
            option = sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL("")
            statements.append(
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(privilege), db, who, option
                )
            )
    statements.append(
        sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            db, sql.Literal(state.connection_limit)
        )
    )
    return statements


def role_setting_resets(conn: PgConnection, dbname: str) -> list[sql.Composable]:
    """``ALTER ROLE r IN DATABASE db RESET ALL`` for each role with settings there."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_get_userbyid(s.setrole) FROM pg_db_role_setting s "
            "JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = %s AND s.setrole <> 0",
            (dbname,),
        )
        roles = [str(r[0]) for r in cur.fetchall()]
    return [
        sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(
            sql.Identifier(role), sql.Identifier(dbname)
        )
        for role in roles
    ]


def apply_database_state(conn: PgConnection, dbname: str, state: DatabaseLevelState) -> None:
    """Carry settings, grants and connection limit (not the comment) onto ``dbname``."""
    for statement in [*role_setting_resets(conn, dbname), *setting_statements(dbname, state)]:
        execute(conn, statement)


def set_comment(conn: PgConnection, dbname: str, comment: str | None) -> None:
    execute(
        conn,
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(dbname), sql.Literal(comment)
        ),
    )


def set_allow_connections(conn: PgConnection, dbname: str, allow: bool) -> None:
    keyword = sql.SQL("true" if allow else "false")
    execute(
        conn,
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(dbname), keyword
        ),
    )


def terminate_backends(
    conn: PgConnection,
    dbname: str,
    timeout: float = TERMINATE_WAIT_SECONDS,
    *,
    spare: tuple[int, ...] = (),
) -> int:
    """Terminate every client session on ``dbname`` and wait until they are gone.

    Autovacuum workers are left alone (a non-superuser may not signal them): the rename
    that follows makes PostgreSQL stop them itself.
    """
    deadline = time.monotonic() + timeout
    terminated = 0
    with conn.cursor() as cur:
        while True:
            cur.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)), count(*) "
                "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend' AND NOT pid = ANY(%s)",
                (dbname, list(spare)),
            )
            row = cur.fetchone()
            killed, remaining = (int(row[0]), int(row[1])) if row else (0, 0)
            terminated += killed
            if remaining == 0:
                return terminated
            if time.monotonic() > deadline:
                raise OperationFailed(
                    f"{remaining} session(s) on {dbname} did not end within {timeout:.0f}s"
                )
            time.sleep(0.02)


def rename_database(conn: PgConnection, old: str, new: str) -> None:
    execute(
        conn,
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)),
    )


def drop_table(conn: PgConnection, schema: str, table: str) -> None:
    execute(
        conn,
        sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, table)),
    )
