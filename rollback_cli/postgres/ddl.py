"""Cluster-level DDL: create, drop and rename databases, block and end their sessions,
carry database-level settings and grants."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import OperationFailed
from rollback_cli.postgres.connection import first_line
from rollback_cli.postgres.connection import quote_ident as q

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.postgres.catalog import DatabaseLevelState, DatabaseProperties

TERMINATE_WAIT_SECONDS = 10.0


def create_database_like(
    conn: PgConnection,
    new_name: str,
    like: DatabaseProperties | None,
    *,
    set_owner: bool,
    purpose: str = "the restore",
) -> None:
    """CREATE DATABASE with the encoding, collation, ctype and tablespace of ``like``.

    The TABLESPACE clause is left out for pg_default: naming it needs CREATE on it, which
    only superusers have by default, and template0 puts the database there anyway.
    """
    import psycopg2

    parts = [f"CREATE DATABASE {q(new_name)} TEMPLATE template0"]
    if like is not None:
        parts += [
            f"ENCODING {_literal(like.encoding)}",
            f"LC_COLLATE {_literal(like.collate)} LC_CTYPE {_literal(like.ctype)}",
        ]
        if like.tablespace != "pg_default":
            parts.append(f"TABLESPACE {q(like.tablespace)}")
        if like.locale_provider == "i" and like.icu_locale:
            parts.append(f"LOCALE_PROVIDER icu ICU_LOCALE {_literal(like.icu_locale)}")
        elif like.locale_provider == "b" and like.icu_locale:
            parts.append(f"LOCALE_PROVIDER builtin BUILTIN_LOCALE {_literal(like.icu_locale)}")
        if set_owner:
            parts.append(f"OWNER {q(like.owner)}")
    try:
        with conn.cursor() as cur:
            cur.execute(" ".join(parts))
    except psycopg2.Error as exc:
        raise OperationFailed(
            f"cannot create the scratch database {new_name} for {purpose}: {first_line(exc)}",
            hint="the role needs CREATEDB (and CREATE on the database's tablespace)",
        ) from None


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def drop_database(conn: PgConnection, name: str) -> None:
    with conn.cursor() as cur:
        if conn.server_version >= 130000:
            cur.execute(f"DROP DATABASE IF EXISTS {q(name)} WITH (FORCE)")
        else:
            cur.execute(f"DROP DATABASE IF EXISTS {q(name)}")


def apply_database_state(conn: Any, dbname: str, state: DatabaseLevelState) -> None:
    with conn.cursor() as cur:
        for role, setting in state.settings:
            name, _, value = setting.partition("=")
            target = (
                f"ALTER ROLE {q(role)} IN DATABASE {q(dbname)}"
                if role
                else f"ALTER DATABASE {q(dbname)}"
            )
            cur.execute(f"{target} SET {q(name)} = %s", (value,))
        if state.acl is not None:
            cur.execute(f"REVOKE ALL ON DATABASE {q(dbname)} FROM PUBLIC")
            for grantee, privilege, grantable in state.acl:
                who = "PUBLIC" if grantee == "PUBLIC" else q(grantee)
                option = " WITH GRANT OPTION" if grantable else ""
                cur.execute(f"GRANT {privilege} ON DATABASE {q(dbname)} TO {who}{option}")
        if state.connection_limit != -1:
            cur.execute(f"ALTER DATABASE {q(dbname)} CONNECTION LIMIT {state.connection_limit}")
        if state.comment is not None:
            cur.execute(f"COMMENT ON DATABASE {q(dbname)} IS %s", (state.comment,))


def set_allow_connections(conn: Any, dbname: str, allow: bool) -> None:
    with conn.cursor() as cur:
        cur.execute(f"ALTER DATABASE {q(dbname)} WITH ALLOW_CONNECTIONS {str(allow).lower()}")


def terminate_backends(conn: Any, dbname: str, timeout: float = TERMINATE_WAIT_SECONDS) -> int:
    """Terminate every session on ``dbname`` and wait until they are gone."""
    deadline = time.monotonic() + timeout
    terminated = 0
    with conn.cursor() as cur:
        while True:
            cur.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) , count(*) "
                "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
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


def rename_database(conn: Any, old: str, new: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"ALTER DATABASE {q(old)} RENAME TO {q(new)}")


def drop_table(conn: PgConnection, schema: str, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {q(schema)}.{q(table)}")
