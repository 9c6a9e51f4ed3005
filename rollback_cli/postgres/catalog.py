"""Read-only catalog queries: row counts, revisions, privileges, database properties."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg2 import sql

from rollback_cli.errors import ConfigError

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection


_USER_TABLES = """
    SELECT n.nspname, c.relname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
    ORDER BY {order}
"""
_BY_NAME = "1, 2"
#: partitioned parents (their size is their partitions') first, then the largest tables
_LARGEST_FIRST = "c.relkind = 'p' DESC, pg_table_size(c.oid) DESC, 1, 2"


def user_tables(conn: PgConnection, *, largest_first: bool = False) -> list[tuple[str, str]]:
    """(schema, name) of every ordinary and partitioned user table (partitions excluded:
    their parent stands for them), by name or the largest first."""
    with conn.cursor() as cur:
        cur.execute(_USER_TABLES.format(order=_LARGEST_FIRST if largest_first else _BY_NAME))
        return [(str(schema), str(name)) for schema, name in cur.fetchall()]


def table_row_counts(
    conn: PgConnection, tables: list[tuple[str, str]] | None = None
) -> dict[str, int]:
    """Exact row counts of ``tables`` (default: every ordinary and partitioned user table),
    as seen by ``conn``."""
    if tables is None:
        tables = user_tables(conn)
    with conn.cursor() as cur:
        counts: dict[str, int] = {}
        for schema, name in tables:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
            row = cur.fetchone()
            counts[f"{schema}.{name}"] = int(row[0]) if row else 0
    return counts


#: The Alembic version table of this run: (schema or None for the search_path, table).
#: A project's env.py may name another (``version_table``, ``version_table_schema``); a
#: schema rollback learns it from env.py and reads and writes that one for the run.
VERSION_TABLE: ContextVar[tuple[str | None, str]] = ContextVar(
    "version_table", default=(None, "alembic_version")
)


@contextmanager
def version_table_scope() -> Iterator[None]:
    """Whatever :data:`VERSION_TABLE` is set to inside the block is undone at its end."""
    token = VERSION_TABLE.set(VERSION_TABLE.get())
    try:
        yield
    finally:
        VERSION_TABLE.reset(token)


def version_table_name() -> str:
    schema, table = VERSION_TABLE.get()
    return f"{schema}.{table}" if schema else table


def _version_table() -> sql.Identifier:
    schema, table = VERSION_TABLE.get()
    return sql.Identifier(schema, table) if schema else sql.Identifier(table)


def alembic_revisions(conn: PgConnection) -> list[str]:
    """The revisions in the version table (empty when the table does not exist)."""
    table = _version_table()
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(conn),))
        row = cur.fetchone()
        if not row or not row[0]:
            return []
        cur.execute(sql.SQL("SELECT version_num FROM {} ORDER BY version_num").format(table))
        return [str(r[0]) for r in cur.fetchall()]


def role_privileges(conn: PgConnection) -> dict[str, bool]:
    """superuser, createdb and can_terminate (pg_signal_backend) of the current role."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT r.rolsuper, r.rolcreatedb,
                   r.rolsuper OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')
            FROM pg_roles r WHERE r.rolname = current_user
            """
        )
        row = cur.fetchone()
    superuser, createdb, can_terminate = row if row else (False, False, False)
    return {
        "superuser": bool(superuser),
        "createdb": bool(createdb or superuser),
        "can_terminate": bool(can_terminate),
    }


def owns_database(conn: PgConnection, dbname: str) -> bool:
    """Whether the current role is (a member of) the owner of ``dbname``."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database "
            "WHERE datname = %s",
            (dbname,),
        )
        row = cur.fetchone()
    return bool(row and row[0])


def is_member_of(conn: PgConnection, role: str) -> bool:
    """Whether the current role may act as ``role`` (is it, or a member of it)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (role,))
        row = cur.fetchone()
    return bool(row and row[0])


def database_oid(conn: PgConnection, dbname: str) -> int | None:
    with conn.cursor() as cur:
        cur.execute("SELECT oid FROM pg_database WHERE datname = %s", (dbname,))
        row = cur.fetchone()
    return int(row[0]) if row else None


def database_name(conn: PgConnection, oid: int) -> str | None:
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE oid = %s", (oid,))
        row = cur.fetchone()
    return str(row[0]) if row else None


def allows_connections(conn: PgConnection, dbname: str) -> bool | None:
    """``datallowconn`` of ``dbname`` (None when there is no such database)."""
    with conn.cursor() as cur:
        cur.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (dbname,))
        row = cur.fetchone()
    return bool(row[0]) if row else None


def database_comments(conn: PgConnection, prefix: str) -> list[tuple[str, int, str]]:
    """(name, oid, comment) of every database whose comment starts with ``prefix``."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT d.datname, d.oid, c.description
            FROM pg_database d
            JOIN pg_shdescription c ON c.objoid = d.oid
                 AND c.classoid = 'pg_database'::regclass
            WHERE starts_with(c.description, %s)
            """,
            (prefix,),
        )
        return [(str(n), int(o), str(c)) for n, o, c in cur.fetchall()]


def session_identity(conn: PgConnection) -> tuple[int, str]:
    """This session's backend pid and start time: together they name it uniquely."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity "
            "WHERE pid = pg_backend_pid()"
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def session_alive(conn: PgConnection, pid: int, started: str) -> bool:
    """Whether the session (pid, backend_start) still runs. Another role's start time may be
    hidden from us: a live pid whose start we cannot see counts as alive."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s "
            "AND (backend_start IS NULL OR backend_start = %s::timestamptz)",
            (pid, started),
        )
        return cur.fetchone() is not None


def free_connection_slots(conn: PgConnection) -> int:
    """Connections the server would still accept from an ordinary role."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT current_setting('max_connections')::int "
            "- current_setting('superuser_reserved_connections')::int "
            "- (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        )
        row = cur.fetchone()
    return int(row[0]) if row else 0


def database_exists(conn: PgConnection, dbname: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        return cur.fetchone() is not None


@dataclass(frozen=True)
class DatabaseProperties:
    name: str
    owner: str
    encoding: str
    collate: str
    ctype: str
    tablespace: str
    locale_provider: str | None
    icu_locale: str | None


def database_properties(conn: PgConnection, dbname: str) -> DatabaseProperties:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT d.datname, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding),
                   d.datcollate, d.datctype, t.spcname
            FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace
            WHERE d.datname = %s
            """,
            (dbname,),
        )
        row = cur.fetchone()
        if row is None:
            raise ConfigError(f"database {dbname} does not exist")
        provider = icu = None
        if conn.server_version >= 150000:
            locale = "datlocale" if conn.server_version >= 170000 else "daticulocale"
            cur.execute(
                sql.SQL(
                    "SELECT datlocprovider::text, {} FROM pg_database WHERE datname = %s"
                ).format(sql.Identifier(locale)),
                (dbname,),
            )
            extra = cur.fetchone()
            if extra:
                provider, icu = extra
    name, owner, encoding, collate, ctype, tablespace = (str(v) for v in row)
    return DatabaseProperties(name, owner, encoding, collate, ctype, tablespace, provider, icu)


@dataclass(frozen=True)
class DatabaseLevelState:
    """What lives on the database object itself, not inside it."""

    settings: list[tuple[str | None, str]]  # (role or None, "name=value")
    acl: list[tuple[str, str, bool]] | None  # (grantee or PUBLIC, privilege, grantable)
    connection_limit: int
    comment: str | None


def read_database_state(conn: Any, dbname: str) -> DatabaseLevelState:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END,
                   unnest(s.setconfig)
            FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
            WHERE d.datname = %s ORDER BY 1 NULLS FIRST, 2
            """,
            (dbname,),
        )
        settings = [(r[0], str(r[1])) for r in cur.fetchall()]
        cur.execute(
            "SELECT datacl IS NULL, datconnlimit, shobj_description(oid, 'pg_database') "
            "FROM pg_database WHERE datname = %s",
            (dbname,),
        )
        row = cur.fetchone()
        assert row is not None
        acl_is_default, connlimit, comment = row
        acl: list[tuple[str, str, bool]] | None = None
        if not acl_is_default:
            cur.execute(
                """
                SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                       a.privilege_type, a.is_grantable
                FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s
                """,
                (dbname,),
            )
            acl = [(str(g), str(p), bool(x)) for g, p, x in cur.fetchall()]
    return DatabaseLevelState(settings, acl, int(connlimit), comment)


def user_schemas(conn: PgConnection) -> list[str]:
    """Every schema but PostgreSQL's own."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
            "AND nspname <> 'information_schema'"
        )
        return [str(r[0]) for r in cur.fetchall()]


def alembic_temp_tables(conn: PgConnection) -> list[tuple[str, str]]:
    """(schema, table) of tables Alembic's batch mode left behind (``_alembic_tmp_*``)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE starts_with(tablename, '_alembic_tmp_')"
        )
        return [(str(s), str(t)) for s, t in cur.fetchall()]


def risky_sessions(conn: PgConnection, dbname: str, seconds: int) -> list[tuple[Any, ...]]:
    """(pid, application_name, state, age in s) of sessions idle in a transaction or in one
    for longer than ``seconds``: they would block a rollback."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT pid, coalesce(application_name, ''), state,
                   extract(epoch FROM now() - xact_start)::int
            FROM pg_stat_activity
            WHERE datname = %s AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
              AND (state = 'idle in transaction' OR now() - xact_start > make_interval(secs => %s))
            ORDER BY xact_start
            """,
            (dbname, seconds),
        )
        return list(cur.fetchall())


def user_columns(conn: PgConnection) -> set[tuple[str, str, str]]:
    """(schema, table, column) of every column of every user table."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT n.nspname, c.relname, a.attname
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
              AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
            """
        )
        return {(str(s), str(t), str(a)) for s, t, a in cur.fetchall()}


def schema_objects(conn: PgConnection) -> dict[str, dict[str, str]]:
    """What a downgrade can drop or change, by kind (table, column, index, constraint,
    type, sequence): each object's name and a description of its definition."""
    queries = {
        "table": "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%'",
        "column": "SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname), "
        "format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' NOT NULL' "
        "ELSE '' END FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
        "AND a.attnum > 0 AND NOT a.attisdropped "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%'",
        "index": "SELECT format('%I.%I', n.nspname, c.relname), pg_get_indexdef(c.oid) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('i', 'I') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%'",
        "constraint": "SELECT format('%I.%I.%I', n.nspname, t.relname, k.conname), "
        "pg_get_constraintdef(k.oid) FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid "
        "JOIN pg_namespace n ON n.oid = t.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%'",
        "type": "SELECT format('%I.%I', n.nspname, t.typname), t.typtype::text || "
        "coalesce(' ' || (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) "
        "FROM pg_enum e WHERE e.enumtypid = t.oid), '') FROM pg_type t "
        "JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typtype IN ('e', 'd') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%'",
        "sequence": "SELECT format('%I.%I', n.nspname, c.relname), 'sequence' "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'S' "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%'",
    }
    found: dict[str, dict[str, str]] = {}
    with conn.cursor() as cur:
        for kind, query in queries.items():
            cur.execute(query)
            found[kind] = {str(name): str(definition) for name, definition in cur.fetchall()}
    return found


def count_values(conn: PgConnection, schema: str, table: str, column: str | None) -> int:
    """Rows of a table, or non-null values of one of its columns."""
    what = (
        sql.SQL("count(*)")
        if column is None
        else sql.SQL("count({})").format(sql.Identifier(column))
    )
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {} FROM {}").format(what, sql.Identifier(schema, table)))
        row = cur.fetchone()
    return int(row[0]) if row else 0


def set_revisions(conn: PgConnection, revisions: list[str]) -> None:
    """Make the version table hold ``revisions`` (a schema-only copy has no rows)."""
    table = _version_table()
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(conn),))
        row = cur.fetchone()
        if not row or not row[0]:
            return
        cur.execute(sql.SQL("DELETE FROM {}").format(table))
        for revision in revisions:
            cur.execute(
                sql.SQL("INSERT INTO {} (version_num) VALUES (%s)").format(table), (revision,)
            )


def count_assertions(
    conn: PgConnection, row_counts: dict[str, int], revisions: list[str] | None
) -> str:
    # pg_dump's script empties search_path: every name here is schema-qualified.
    """SQL that raises unless every table holds the given number of rows (and
    alembic_version the given revisions): run inside a restore's transaction before its
    COMMIT, a restore that does not match its manifest is never committed."""
    tag = sql.SQL("$check_{}$").format(sql.SQL(secrets.token_hex(6)))
    blocks = []
    for name, expected in sorted(row_counts.items()):
        schema, _, table = name.partition(".")
        relation = sql.Identifier(schema, table)
        blocks.append(
            sql.SQL(
                "DO {tag} BEGIN IF (SELECT count(*) FROM {rel}) <> {n} THEN RAISE EXCEPTION "
                "{msg}, (SELECT count(*) FROM {rel}); END IF; END {tag};"
            ).format(
                tag=tag,
                rel=relation,
                n=sql.Literal(int(expected)),
                msg=sql.Literal(f"{name}: % rows restored, the manifest says {int(expected)}"),
            )
        )
    version_tables = [name for name in row_counts if name.endswith(".alembic_version")]
    if revisions is not None and len(version_tables) == 1:
        schema, _, table = version_tables[0].partition(".")
        blocks.append(
            sql.SQL(
                "DO {tag} BEGIN IF (SELECT array_agg(version_num::text ORDER BY 1) FROM "
                "{rel}) IS DISTINCT FROM {revs}::text[] THEN RAISE EXCEPTION {msg}; "
                "END IF; END {tag};"
            ).format(
                tag=tag,
                rel=sql.Identifier(schema, table),
                revs=sql.Literal(sorted(revisions) or None),
                msg=sql.Literal("alembic_version does not hold the manifest's revisions"),
            )
        )
    return "".join(block.as_string(conn) + "\n" for block in blocks)
