"""Connections: our own (psycopg2), to the target or to a maintenance database."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollback_cli.errors import ConfigError
from rollback_cli.log import redactor

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo

APPLICATION_NAME = "db-rollback"
MAINTENANCE_DATABASES = ("postgres", "template1")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return redactor.scrub(line.strip())


def connect(
    conninfo: ConnInfo,
    dbname: str | None = None,
    *,
    autocommit: bool = True,
    connect_timeout: int = 10,
    application_name: str = APPLICATION_NAME,
) -> PgConnection:
    """Open a psycopg2 connection or raise ConfigError with libpq's reason on one line."""
    import psycopg2

    redactor.add_secret(conninfo.password)
    kwargs: dict[str, Any] = conninfo.psycopg_kwargs(dbname)
    kwargs.setdefault("connect_timeout", connect_timeout)
    kwargs["application_name"] = application_name
    try:
        conn = psycopg2.connect(**kwargs)
    except psycopg2.OperationalError as exc:
        target = f"{conninfo.display_host}:{conninfo.port or 5432}/{dbname or conninfo.dbname}"
        raise ConfigError(f"cannot connect to {target}: {first_line(exc)}") from None
    except psycopg2.ProgrammingError as exc:
        # libpq rejected the parameters themselves (an unknown URL query option, say).
        raise ConfigError(f"database URL is not valid: {first_line(exc)}") from None
    conn.autocommit = autocommit
    return conn  # type: ignore[no-any-return]  # psycopg2.connect is untyped


def database_error() -> type[Exception]:
    """The base class of psycopg2's errors, for callers that must not import psycopg2."""
    import psycopg2

    return psycopg2.Error


def server_major(conn: PgConnection) -> int:
    return int(conn.server_version) // 10000


def server_version_text(conn: PgConnection) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        row = cur.fetchone()
    return str(row[0]) if row else "unknown"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def maintenance_connection(conninfo: ConnInfo) -> PgConnection:
    """A connection to a database other than the target (for CREATE/ALTER/DROP DATABASE)."""
    last_error: ConfigError | None = None
    for name in (*MAINTENANCE_DATABASES, conninfo.dbname):
        if name == conninfo.dbname and name in MAINTENANCE_DATABASES:
            continue
        try:
            return connect(conninfo, name)
        except ConfigError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


def export_snapshot(conn: PgConnection) -> str | None:
    """Start a read-only REPEATABLE READ transaction on ``conn`` and export its snapshot, so
    that pg_dump (``--snapshot``) and our own queries see the same data."""
    conn.rollback()
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_export_snapshot()")
        row = cur.fetchone()
    return str(row[0]) if row else None
