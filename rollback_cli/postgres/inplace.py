"""The in-place restore: writers stopped first, then one transaction that replaces
everything, so no committed write is lost and nothing the backup lacks survives.

One psql session does it all. It begins a transaction and takes EXCLUSIVE locks on every
user table: readers go on, writers wait (and writes already under way finish first, within
the lock timeout). From then on no write can commit, so a safety backup taken now holds
every committed write. Then new connections are refused, every other session is ended,
and the same transaction drops every user schema, recreates ``public``, runs the backup's
SQL, and commits only once all of it succeeded. Any failure, interrupt or kill ends the
session before COMMIT: PostgreSQL rolls everything back.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from psycopg2 import sql

from rollback_cli.errors import BackupError, OperationFailed
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.catalog import session_identity, user_schemas, user_tables
from rollback_cli.postgres.clients import ClientTools, child_environment, error_tail
from rollback_cli.postgres.connection import connect, run_application_name
from rollback_cli.postgres.ddl import set_allow_connections, terminate_backends
from rollback_cli.postgres.restore import plain_preamble, psql_argv, pump, sql_source
from rollback_cli.postgres.script_guard import ScriptGuard

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo


class WritersStopped:
    """A psql session on the live database holding EXCLUSIVE locks on every user table,
    inside an open transaction that :meth:`replace_with` finishes."""

    def __init__(
        self,
        tools: ClientTools,
        conninfo: ConnInfo,
        admin: PgConnection,
        *,
        server_major: int,
        no_owner: bool,
        role: str | None,
        lock_timeout_ms: int,
    ) -> None:
        self.tools = tools
        self.conninfo = conninfo
        self.admin = admin
        self.server_major = server_major
        self.no_owner = no_owner
        self.role = role
        self.lock_timeout_ms = lock_timeout_ms
        self.application_name = f"{run_application_name()} in-place"[:63]
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self._stderr: IO[bytes] | None = None
        self._stack = ExitStack()

    def __enter__(self) -> WritersStopped:
        conn = connect(self.conninfo)
        try:
            lock = _lock_statement(conn, user_tables(conn))
        finally:
            conn.close()
        env = self._stack.enter_context(
            child_environment(self.conninfo, lock_timeout_ms=self.lock_timeout_ms, role=self.role)
        )
        env["PGAPPNAME"] = self.application_name
        self._stderr = self._stack.enter_context(tempfile.TemporaryFile())
        try:
            self.process = subprocess.Popen(
                psql_argv(self.tools, None, "-", single_transaction=False),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=env,
                pass_fds=env.pass_fds,
            )
            assert self.process.stdin is not None
            with step("stop-writers") as details:
                self.process.stdin.write(b"BEGIN;\n")
                self.process.stdin.flush()
                self.pid = self._wait_until_idle()
                # Sessions idle in a transaction would hold their locks (and their
                # uncommitted writes) for ever: end them; what they had not committed was
                # never a committed write.
                details["sessions_ended"] = terminate_backends(
                    self.admin, self.conninfo.dbname, spare=(self.pid,)
                )
                self.process.stdin.write(lock)
                self.process.stdin.flush()
                self._wait_until_idle()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_idle(self) -> int:
        """The session's pid once its last statement returned (it is then idle in its
        transaction); OperationFailed when it gave up (lock timeout)."""
        assert self.process is not None
        deadline = time.monotonic() + self.lock_timeout_ms / 1000 + 30
        conn = connect(self.conninfo)
        try:
            while True:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
                        (self.application_name,),
                    )
                    row = cur.fetchone()
                if row is not None and row[1] == "idle in transaction":
                    return int(row[0])
                if self.process.poll() is not None or time.monotonic() > deadline:
                    assert self._stderr is not None
                    reason = error_tail(self._stderr, "the session ended")
                    raise OperationFailed(
                        f"cannot stop writers on {self.conninfo.dbname}: {reason}; "
                        "nothing was changed (a session holds a table: retry, or raise "
                        "--lock-timeout)"
                    )
                time.sleep(0.02)
        finally:
            conn.close()

    def replace_with(
        self,
        artifact: Path,
        fmt: str,
        check: Callable[[PgConnection], None],
        assertions: str = "",
    ) -> None:
        """Refuse new connections, end every other session, then drop the user schemas and
        run the archive's SQL in the open transaction; commit if all of it succeeded.

        ``check`` then looks at the result through a session opened beforehand, while no
        one else can connect (so no application write can make the comparison wrong).
        Connections are allowed again whatever happens."""
        assert self.process is not None and self.pid is not None and self._stderr is not None
        live, admin = self.conninfo.dbname, self.admin
        observer = connect(self.conninfo)
        try:
            preamble = plain_preamble(observer, user_schemas(observer), self.server_major)
            set_allow_connections(admin, live, False)
            try:
                self._restore(
                    artifact,
                    fmt,
                    preamble,
                    assertions,
                    spare=(self.pid, observer_pid(observer)),
                )
                check(observer)
            finally:
                set_allow_connections(admin, live, True)
        finally:
            observer.close()

    def _restore(
        self, artifact: Path, fmt: str, preamble: str, assertions: str, spare: tuple[int, ...]
    ) -> None:
        """The restore, then ``assertions`` (SQL that raises on a mismatch), then COMMIT:
        anything failing before COMMIT leaves nothing committed."""
        assert self.process is not None and self._stderr is not None
        assert self.process.stdin is not None
        live = self.conninfo.dbname
        ended = terminate_backends(self.admin, live, spare=spare)
        get_logger().info("sessions ended for the in-place restore", count=ended)
        self.process.stdin.write(preamble.encode("utf-8"))
        with tempfile.TemporaryFile() as source_err:
            source, producer = sql_source(
                self.tools, artifact, fmt, self.no_owner, False, source_err
            )
            source_code, code = pump(
                source,
                producer,
                self.process,
                assertions.encode("utf-8") + b"COMMIT;\n",
                guard=ScriptGuard(f"backup {artifact.name}"),
            )
            if source_code != 0:
                reason = error_tail(source_err, f"exit {source_code}")
                raise OperationFailed(f"restore into {live} failed: {reason}")
        if code != 0:
            reason = error_tail(self._stderr, f"exit {code}")
            if "the manifest says" in reason or "manifest's revisions" in reason:
                # The backup restored, but not into what its manifest describes.
                raise BackupError(
                    f"the backup does not match its manifest ({reason}); nothing was committed"
                )
            raise OperationFailed(f"restore into {live} failed: {reason}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # before COMMIT: the server rolls the transaction back
            self.process.wait()
        self._stack.close()


def _lock_statement(conn: PgConnection, tables: list[tuple[str, str]]) -> bytes:
    if not tables:
        return b""
    statement = sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE;\n").format(
        sql.SQL(", ").join(sql.Identifier(schema, name) for schema, name in tables)
    )
    return statement.as_string(conn).encode("utf-8")


def observer_pid(conn: PgConnection) -> int:
    return session_identity(conn)[0]
