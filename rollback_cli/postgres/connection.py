"""Connections: our own (psycopg2), to the target or to a maintenance database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from psycopg2 import sql

from rollback_cli.errors import ConfigError
from rollback_cli.log import bound_context, new_run_id, redactor

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo

APPLICATION_NAME = "db-rollback"
DEFAULT_LOCK_TIMEOUT_MS = 5000
#: the lock timeout of every session a run opens (its --lock-timeout)
RUN_LOCK_TIMEOUT_MS: ContextVar[int] = ContextVar(
    "lock_timeout_ms", default=DEFAULT_LOCK_TIMEOUT_MS
)
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
    application_name: str | None = None,
    lock_timeout_ms: int | None = None,
) -> PgConnection:
    """Open a psycopg2 connection or raise ConfigError with libpq's reason on one line.

    Every statement of the session waits at most ``lock_timeout_ms`` for a lock (default:
    the run's, see :func:`lock_timeout`; 0: no bound), so no step of ours queues behind
    another session's lock forever.
    """
    import psycopg2

    redactor.add_secret(conninfo.password)
    kwargs: dict[str, Any] = conninfo.psycopg_kwargs(dbname)
    kwargs.setdefault("connect_timeout", connect_timeout)
    kwargs["application_name"] = application_name or run_application_name()
    try:
        conn = psycopg2.connect(**kwargs)
    except psycopg2.OperationalError as exc:
        name = dbname or conninfo.dbname
        target = f"{conninfo.display_host}:{conninfo.port or 5432}/{name}"
        reason = first_line(exc)
        hint = None
        if "not currently accepting connections" in reason:
            hint = (
                f"{name} refuses connections; if a db-rollback run was killed during a swap, "
                "`db-rollback cleanup-artifacts` puts it right, otherwise run "
                f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'
            )
        raise ConfigError(f"cannot connect to {target}: {reason}", hint=hint) from None
    except psycopg2.ProgrammingError as exc:
        # libpq rejected the parameters themselves (an unknown URL query option, say).
        raise ConfigError(f"database URL is not valid: {first_line(exc)}") from None
    conn.autocommit = True
    set_lock_timeout(
        conn, RUN_LOCK_TIMEOUT_MS.get() if lock_timeout_ms is None else lock_timeout_ms
    )
    conn.autocommit = autocommit
    return conn  # type: ignore[no-any-return]  # psycopg2.connect is untyped


def current_run_id() -> str:
    """The run id logging was configured with; a fresh one for an unconfigured library."""
    return str(bound_context().get("run_id") or new_run_id())


def run_application_name() -> str:
    """``db-rollback <run id>``: our sessions and our client tools' sessions carry it, so
    that a run can find (and end) whatever it left on the server."""
    run_id = bound_context().get("run_id")
    return f"{APPLICATION_NAME} {run_id}" if run_id else APPLICATION_NAME


def end_run_sessions(conninfo: ConnInfo) -> int:
    """Terminate the server sessions this run's client tools left behind (a pg_restore
    killed mid-statement leaves its backend running, holding its locks)."""
    name = run_application_name()
    if name == APPLICATION_NAME:
        return 0
    conn = maintenance_connection(conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            row = cur.fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


@contextmanager
def lock_timeout(milliseconds: int) -> Iterator[None]:
    """Sessions opened inside the block wait at most ``milliseconds`` for a lock."""
    token = RUN_LOCK_TIMEOUT_MS.set(milliseconds)
    try:
        yield
    finally:
        RUN_LOCK_TIMEOUT_MS.reset(token)


def set_lock_timeout(conn: PgConnection, milliseconds: int) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(milliseconds)}ms",))


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


def maintenance_connection(
    conninfo: ConnInfo, *, lock_timeout_ms: int | None = None
) -> PgConnection:
    """A connection to a database other than the target (for CREATE/ALTER/DROP DATABASE)."""
    last_error: ConfigError | None = None
    for name in (*MAINTENANCE_DATABASES, conninfo.dbname):
        if name == conninfo.dbname and name in MAINTENANCE_DATABASES:
            continue
        try:
            return connect(conninfo, name, lock_timeout_ms=lock_timeout_ms)
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


#: what identifies a database on a cluster, read through any connection (no parameters, so
#: it runs through whatever driver an application's migration environment uses)
IDENTITY_QUERY = (
    "SELECT current_database(), pg_postmaster_start_time()::text, current_setting('port'), "
    "(SELECT oid FROM pg_database WHERE datname = current_database())::text"
)


def identity(conn: PgConnection) -> tuple[str, ...]:
    """(database, cluster start time, port, database OID) of ``conn``'s database."""
    with conn.cursor() as cur:
        cur.execute(IDENTITY_QUERY)
        row = cur.fetchone()
    assert row is not None
    return tuple(str(value) for value in row)


def timeout_statements(
    conn: PgConnection, lock_timeout_ms: int, statement_timeout_ms: int
) -> list[str]:
    """``SET lock_timeout`` and ``SET statement_timeout`` as text, composed through ``conn``,
    for a session of another driver (an application's own engine)."""
    return [
        sql.SQL("SET {} = {}")
        .format(sql.Identifier(name), sql.Literal(f"{int(ms)}ms"))
        .as_string(conn)
        for name, ms in (
            ("lock_timeout", lock_timeout_ms),
            ("statement_timeout", statement_timeout_ms),
        )
    ]
