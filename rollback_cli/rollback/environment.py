"""Owning the migration environment: an application's env.py runs inside the tool's run.

Whatever env.py does (builds its own engine from its own settings, runs an async engine
through ``run_sync``), Alembic migrates through the connection env.py hands to
``context.configure``. That call is where the tool takes control: it proves the connection
reaches the target database (same cluster, same database OID), refuses before any
statement otherwise, sets the run's lock and statement timeouts on it, and records every
statement executed with its duration.

Application code also must not take over the tool's logging or stdout: around every call
into it, the logging configuration is kept and restored (env.py's ``fileConfig`` would
replace the handlers and disable the tool's loggers) and stdout is captured (a migration's
``print`` would corrupt ``--json``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import Refused
from rollback_cli.log import get_logger
from rollback_cli.postgres.connection import (
    IDENTITY_QUERY,
    connect,
    identity,
    timeout_statements,
)

if TYPE_CHECKING:
    from rollback_cli.settings import ConnInfo


@dataclass
class ExecutedStatement:
    sql: str
    duration_ms: float
    revision: str | None = None
    #: the table locks the statement took ("ACCESS EXCLUSIVE on public.orders"), as the
    #: server reported them (rehearsals only); None when they were not observed
    locks: list[str] | None = None


# The relation locks this session holds, on user relations (what a statement added to them
# is what it took: locks are held to the end of the transaction).
HELD_LOCKS = """
    SELECT l.mode, format('%I.%I', n.nspname, c.relname)
    FROM pg_locks l
    JOIN pg_class c ON c.oid = l.relation
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_%'
"""
_MODES = {
    "AccessShareLock": "ACCESS SHARE",
    "RowShareLock": "ROW SHARE",
    "RowExclusiveLock": "ROW EXCLUSIVE",
    "ShareUpdateExclusiveLock": "SHARE UPDATE EXCLUSIVE",
    "ShareLock": "SHARE",
    "ShareRowExclusiveLock": "SHARE ROW EXCLUSIVE",
    "ExclusiveLock": "EXCLUSIVE",
    "AccessExclusiveLock": "ACCESS EXCLUSIVE",
}


@dataclass
class OwnedEnvironment:
    """What the migration environment did: the statements it executed."""

    expected: str
    statements: list[ExecutedStatement] = field(default_factory=list)
    connections: int = 0
    #: the version table env.py configured (``schema.table`` or ``table``)
    version_table: str = "alembic_version"
    #: the revisions in the version table after the last migration step (Alembic's own)
    heads_after: list[str] | None = None
    #: the migration step running now, as Alembic announces it ("X -> Y, message")
    running: str | None = None

    def attribute(self, revision: str) -> None:
        """The statements not yet attributed ran for ``revision`` (Alembic reports each
        migration step once it is applied)."""
        for statement in reversed(self.statements):
            if statement.revision is not None:
                break
            statement.revision = revision

    def migration_statements(self) -> list[ExecutedStatement]:
        """The statements the migrations ran, without Alembic's own on the version table."""
        table = self.version_table.rpartition(".")[2]
        return [s for s in self.statements if table not in s.sql]


@contextlib.contextmanager
def isolated_from_application() -> Iterator[io.StringIO]:
    """Run application code without letting it change the tool's logging or stdout."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    manager = logging.Logger.manager
    loggers = {
        name: (logger.disabled, logger.level, list(logger.handlers), logger.propagate)
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield captured
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (disabled, logger_level, logger_handlers, propagate) in loggers.items():
            logger = logging.getLogger(name)
            logger.disabled, logger.propagate = disabled, propagate
            logger.setLevel(logger_level)
            logger.handlers[:] = logger_handlers
        for name, added in manager.loggerDict.items():
            if name not in loggers and isinstance(added, logging.Logger):
                added.handlers.clear()  # the application's own, added meanwhile
                added.propagate = True
        text = captured.getvalue()
        if text.strip():
            get_logger().debug("output of the migration environment", output=text[-4000:])


@contextlib.contextmanager
def owned_environment(
    expected: ConnInfo,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    *,
    redirect_from: ConnInfo | None = None,
    url: str | None = None,
    read_only: bool = False,
) -> Iterator[OwnedEnvironment]:
    """While the block runs, every connection env.py configures Alembic with must reach
    ``expected``; it gets the timeouts, and its statements are recorded.

    With ``redirect_from`` (a rehearsal): a connection env.py opened to that database (it
    builds its own engine from its own settings) is replaced by one of ours to
    ``expected`` (at ``url``), so the rehearsal never runs on the live database.

    ``read_only``: the session is made read-only before Alembic uses it (reading the
    current revision on the live database: whatever env.py runs after it configures the
    connection, the server refuses to write)."""
    from alembic.runtime.environment import EnvironmentContext
    from sqlalchemy import create_engine, event
    from sqlalchemy.pool import NullPool

    ours = connect(expected)
    try:
        wanted = identity(ours)
        setup = timeout_statements(ours, lock_timeout_ms, statement_timeout_ms)
        if read_only:
            setup += ["SET transaction_read_only = on", "SET default_transaction_read_only = on"]
    finally:
        ours.close()
    redirected: tuple[str, ...] | None = None
    if redirect_from is not None:
        live = connect(redirect_from)
        try:
            redirected = identity(live)
        finally:
            live.close()
    owned = OwnedEnvironment(expected=expected.dbname)
    # What the operator calls the target: the live database, even when a rehearsal runs
    # on its copy.
    label = redirect_from.dbname if redirect_from is not None else expected.dbname
    original = EnvironmentContext.configure
    opened: list[Any] = []

    def configure(self: Any, connection: Any = None, *args: Any, **kwargs: Any) -> Any:
        if connection is not None:
            if (
                redirected is not None
                and url is not None
                and _identity_of(connection) == redirected
            ):
                engine = create_engine(url, poolclass=NullPool)
                connection = engine.connect()
                opened.append(connection)
                get_logger().info("the migration environment's connection redirected to the copy")
            _take(connection, wanted, setup, label)
            _record(event, connection, owned, observe_locks=redirected is not None)
            owned.connections += 1
            kwargs["on_version_apply"] = _attributing(owned, kwargs.get("on_version_apply"))
            table = kwargs.get("version_table") or "alembic_version"
            schema = kwargs.get("version_table_schema")
            owned.version_table = f"{schema}.{table}" if schema else table
        return original(self, connection, *args, **kwargs)

    EnvironmentContext.configure = configure  # type: ignore[method-assign]
    announcer = logging.getLogger("alembic.runtime.migration")
    listener = _StepListener(owned)
    announcer.addHandler(listener)
    level = announcer.level
    if not announcer.isEnabledFor(logging.INFO):
        announcer.setLevel(logging.INFO)
    try:
        yield owned
    finally:
        announcer.removeHandler(listener)
        announcer.setLevel(level)
        EnvironmentContext.configure = original  # type: ignore[method-assign]
        for connection in opened:
            with contextlib.suppress(Exception):
                connection.close()


class _StepListener(logging.Handler):
    """Alembic announces each migration step ("Running downgrade X -> Y, message") before
    it runs: a failure is then known to be in that step."""

    def __init__(self, owned: OwnedEnvironment) -> None:
        super().__init__(logging.INFO)
        self.owned = owned

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Running downgrade ", "Running upgrade ")):
            self.owned.running = message.split(" ", 2)[2][:200]


def _attributing(owned: OwnedEnvironment, theirs: Any) -> Any:
    """An ``on_version_apply`` callback that attributes the statements to the migration
    step that ran them, then calls env.py's own callback(s)."""
    if theirs is None:
        callbacks = []
    elif isinstance(theirs, list | tuple):
        callbacks = list(theirs)
    else:
        callbacks = [theirs]

    def applied(*, ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
        owned.attribute(step.up_revision_id or ",".join(step.up_revision_ids))
        owned.heads_after = sorted(heads)
        for callback in callbacks:
            callback(ctx=ctx, step=step, heads=heads, run_args=run_args)

    return [applied]


def _identity_of(connection: Any) -> tuple[str, ...]:
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.execute(IDENTITY_QUERY)
        row = cursor.fetchone()
        return tuple(str(value) for value in row) if row else ()
    finally:
        cursor.close()


def _held_locks(conn: Any) -> set[tuple[str, str]] | None:
    """The relation locks the session holds now (None when they cannot be read)."""
    try:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(HELD_LOCKS)
            return {(str(mode), str(name)) for mode, name in cursor.fetchall()}
        finally:
            cursor.close()
    except Exception:
        return None


def _take(connection: Any, wanted: tuple[str, ...], setup: list[str], dbname: str) -> None:
    """Prove ``connection`` reaches the target, then set the timeouts, through the driver's
    own cursor (so no SQLAlchemy transaction is started or ended behind env.py's back)."""
    found = _identity_of(connection)
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        if found != wanted:
            where = f"database {found[0]!r}" if found else "an unknown database"
            raise Refused(
                f"the migration environment (env.py) connects to {where}"
                + (" on another server" if found and found[0] == dbname else "")
                + f", not to the target {dbname}: nothing was run; make env.py use the URL "
                "it is given (config.get_main_option('sqlalchemy.url') or DATABASE_URL)"
            )
        for statement in setup:
            cursor.execute(statement)
    finally:
        cursor.close()


def _record(
    event: Any, connection: Any, owned: OwnedEnvironment, *, observe_locks: bool = False
) -> None:
    """Record every statement with its duration; with ``observe_locks`` (a rehearsal, on a
    copy, through psycopg2) also the table locks each one took, read from pg_locks."""
    started: list[float] = []
    held: set[tuple[str, str]] = set()
    observe = observe_locks and connection.dialect.driver == "psycopg2"

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started.append(time.monotonic())

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        began = started.pop() if started else time.monotonic()
        duration = round((time.monotonic() - began) * 1000, 1)
        locks = None
        if observe:
            now = _held_locks(conn)
            if now is not None:
                taken = now - held if held <= now else now  # a new transaction began
                held.clear()
                held.update(now)
                locks = sorted(f"{_MODES.get(mode, mode)} on {name}" for mode, name in taken)
        owned.statements.append(ExecutedStatement(statement.strip(), duration, locks=locks))

    event.listen(connection, "before_cursor_execute", before)
    event.listen(connection, "after_cursor_execute", after)


__all__ = [
    "ExecutedStatement",
    "OwnedEnvironment",
    "isolated_from_application",
    "owned_environment",
]
