"""Restoring archives with pg_restore or psql, and checking that they can be read."""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from psycopg2 import sql

from rollback_cli.errors import BackupError, OperationFailed, Refused
from rollback_cli.log import ProgressSink, get_logger, progress_sink, redactor
from rollback_cli.postgres.clients import (
    ClientTools,
    child_environment,
    dbname_conninfo,
    error_tail,
    offline_environment,
)
from rollback_cli.postgres.connection import connect, server_major
from rollback_cli.postgres.script_guard import ScriptGuard

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo

PLAIN_HEADER = b"-- PostgreSQL database dump"
PLAIN_TRAILER = b"-- PostgreSQL database dump complete"


def check_archive_readable(tools: ClientTools, artifact: Path, fmt: str) -> int:
    """``pg_restore --list`` (or the plain header/trailer); returns the number of TOC entries."""
    if fmt == "plain":
        return _check_plain(artifact)
    result = subprocess.run(
        [tools.pg_restore, "--list", str(artifact)],
        capture_output=True,
        timeout=600,
        check=False,
        env=offline_environment(),
    )
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = redactor.scrub(message[0]) if message else f"exit {result.returncode}"
        if "unsupported version" in reason:
            raise Refused(
                f"pg_restore {tools.version} cannot read this archive: {reason}",
                hint="install a newer PostgreSQL client or pass --pg-bin-dir",
            )
        raise BackupError(f"pg_restore cannot read {artifact.name}: {reason}")
    _check_archive_sql(tools, artifact)
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(b";"))


def _check_archive_sql(tools: ClientTools, artifact: Path) -> None:
    """The SQL of the archive's table of contents (its schema part: no data pass), checked
    by the guard: what would reach psql on an in-place or newer-client restore."""
    with tempfile.TemporaryFile() as stderr:
        source, producer = sql_source(
            tools, artifact, "custom", False, False, stderr, schema_only=True
        )
        assert producer is not None
        try:
            with source:
                ScriptGuard(f"backup {artifact.name}").check_all(source)
        finally:
            if producer.poll() is None:
                producer.kill()
            producer.wait()


def psql_argv(
    tools: ClientTools, preamble: Path | None, script: str, *, single_transaction: bool
) -> list[str]:
    """psql running ``preamble`` (if any) then ``script`` (a path, or - for stdin)."""
    argv = [tools.psql, "--no-password", "--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1"]
    if preamble is not None:
        argv.append(f"--file={preamble}")
    argv.append(f"--file={script}")
    if single_transaction:
        argv.append("--single-transaction")
    return argv


def _check_plain(artifact: Path) -> int:
    size = artifact.stat().st_size
    with artifact.open("rb") as handle:
        head = handle.read(4096)
        handle.seek(max(0, size - 4096))
        tail = handle.read()
    if PLAIN_HEADER not in head:
        raise BackupError(f"{artifact.name} is not a plain pg_dump script (header missing)")
    if PLAIN_TRAILER not in tail:
        raise BackupError(f"{artifact.name} is truncated: the dump's completion trailer is missing")
    with artifact.open("rb") as handle:
        ScriptGuard(f"backup {artifact.name}").check_all(handle)
    return 0


def restore_into(
    tools: ClientTools,
    conninfo: ConnInfo,
    dbname: str,
    artifact: Path,
    fmt: str,
    *,
    jobs: int = 1,
    no_owner: bool = False,
    clean: bool = False,
    single_transaction: bool = False,
    preamble: Path | None = None,
    server_major_version: int | None = None,
    role: str | None = None,
    lock_timeout_ms: int | None = None,
) -> None:
    """Restore ``artifact`` (of pg_dump format ``fmt``) into ``dbname``; OperationFailed with
    the first error on failure. ``server_major_version`` saves a connection when known;
    ``role`` is the role the restore acts as; ``lock_timeout_ms`` bounds its lock waits.

    ``preamble`` (plain format only) is an SQL file run first, in the same transaction.
    """
    logger = get_logger()
    # psql runs what it reads, so a plain script (or a newer client's SQL for an older
    # server) reaches it only through the guard; pg_restore --dbname sends its SQL to the
    # server itself, where a backslash is only a syntax error.
    if fmt == "plain" or (
        tools.major >= NEWER_SESSION_SETTINGS
        and (server_major_version or _server_major(conninfo)) < NEWER_SESSION_SETTINGS
    ):
        _restore_filtered(
            tools,
            conninfo,
            dbname,
            artifact,
            fmt,
            no_owner=no_owner,
            clean=clean,
            single_transaction=single_transaction,
            preamble=preamble,
            role=role,
            lock_timeout_ms=lock_timeout_ms,
        )
        return
    argv = _restore_argv(
        tools,
        dbname,
        artifact,
        fmt,
        jobs=jobs,
        no_owner=no_owner,
        clean=clean,
        single_transaction=single_transaction,
        preamble=preamble,
    )
    logger.info(
        "restoring",
        database=dbname,
        tool=Path(argv[0]).name,
        jobs=jobs,
        no_owner=no_owner,
        single_transaction=single_transaction,
    )
    sink = progress_sink()
    total = table_data_entries(tools, artifact) if sink is not None else None
    with (
        child_environment(conninfo, dbname, lock_timeout_ms=lock_timeout_ms, role=role) as env,
        tempfile.TemporaryFile() as stderr_file,
    ):
        if sink is None or total is None:
            returncode = subprocess.run(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                env=env,
                pass_fds=env.pass_fds,
                check=False,
            ).returncode
        else:
            returncode = _run_counted(argv, env, stderr_file, sink, total)
        if returncode != 0:
            reason = error_tail(stderr_file, f"exit {returncode}")
            raise OperationFailed(f"restore into {dbname} failed: {reason}")


# pg_restore --verbose: one line a table's data once it is loaded (parallel or not), and the
# lines of its other messages; only errors, warnings and their details are kept.
_TABLE_LOADED = re.compile(
    rb"^pg_restore: (?:finished item \d+ TABLE DATA|processing data for table)"
)
_KEPT = re.compile(rb"^pg_restore: (?:error|warning|detail|hint):|^(?!pg_restore: )")


def table_data_entries(tools: ClientTools, artifact: Path) -> int | None:
    """How many tables' data ``artifact`` (custom or directory) holds, from its table of
    contents; None when it cannot be read (progress is then not shown)."""
    listed = subprocess.run(
        [tools.pg_restore, "--list", str(artifact)],
        env=offline_environment(),
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        return None
    return sum(
        1
        for line in listed.stdout.splitlines()
        if not line.startswith(b";") and b" TABLE DATA " in line
    )


def _run_counted(
    argv: list[str], env: Any, stderr_file: IO[bytes], sink: ProgressSink, total: int
) -> int:
    """pg_restore with --verbose, its tables counted as they are loaded; what it reports
    besides goes to ``stderr_file`` (for the error message)."""
    process = subprocess.Popen(
        [*argv, "--verbose"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=env.pass_fds,
    )
    assert process.stderr is not None
    done = 0
    try:
        sink("restore", 0, total, "tables")
        for line in process.stderr:
            if _TABLE_LOADED.match(line):
                done += 1
                sink("restore", min(done, total), total, "tables")
            elif _KEPT.match(line):
                stderr_file.write(line)
        return process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise


def _restore_argv(
    tools: ClientTools,
    dbname: str,
    artifact: Path,
    fmt: str,
    *,
    jobs: int,
    no_owner: bool,
    clean: bool,
    single_transaction: bool,
    preamble: Path | None,
) -> list[str]:
    if fmt == "plain":
        return psql_argv(tools, preamble, str(artifact), single_transaction=single_transaction)
    # A conninfo with the name as a quoted value: libpq expands a bare --dbname holding "="
    # as a connection string ("host=elsewhere dbname=x" would connect elsewhere).
    argv = [
        tools.pg_restore,
        "--no-password",
        "--exit-on-error",
        f"--dbname={dbname_conninfo(dbname)}",
    ]
    argv += _pg_restore_options(no_owner=no_owner, clean=clean)
    if single_transaction:
        argv.append("--single-transaction")
    elif jobs > 1:
        argv.append(f"--jobs={jobs}")
    return [*argv, str(artifact)]


def _pg_restore_options(*, no_owner: bool, clean: bool) -> list[str]:
    return (["--no-owner"] if no_owner else []) + (["--clean", "--if-exists"] if clean else [])


# pg_restore and pg_dump from 17 on always emit ``SET transaction_timeout = 0``, a setting
# older servers reject; such restores go through psql with that one line removed.
NEWER_SESSION_SETTINGS = 17
_UNKNOWN_TO_OLDER_SERVERS = (b"SET transaction_timeout = 0;",)


def _server_major(conninfo: ConnInfo) -> int:
    conn = connect(conninfo)
    try:
        return server_major(conn)
    finally:
        conn.close()


def _restore_filtered(
    tools: ClientTools,
    conninfo: ConnInfo,
    dbname: str,
    artifact: Path,
    fmt: str,
    *,
    no_owner: bool,
    clean: bool,
    single_transaction: bool,
    preamble: Path | None,
    role: str | None,
    lock_timeout_ms: int | None,
) -> None:
    """SQL text (a plain script, or pg_restore's script of an archive) into psql, every line
    checked by the guard, and without the lines an older server rejects."""
    get_logger().info(
        "restoring through psql",
        database=dbname,
        client_major=tools.major,
        single_transaction=single_transaction,
    )
    psql = psql_argv(tools, preamble, "-", single_transaction=single_transaction)
    with (
        child_environment(conninfo, dbname, lock_timeout_ms=lock_timeout_ms, role=role) as env,
        tempfile.TemporaryFile() as psql_err,
        tempfile.TemporaryFile() as source_err,
    ):
        source, producer = sql_source(tools, artifact, fmt, no_owner, clean, source_err)
        consumer = subprocess.Popen(
            psql,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=psql_err,
            env=env,
            pass_fds=env.pass_fds,
        )
        source_code, code = pump(
            source, producer, consumer, guard=ScriptGuard(f"backup {artifact.name}")
        )
        if source_code != 0:
            reason = error_tail(source_err, f"exit {source_code}")
            raise OperationFailed(f"restore into {dbname} failed: {reason}")
        if code != 0:
            reason = error_tail(psql_err, f"exit {code}")
            raise OperationFailed(f"restore into {dbname} failed: {reason}")


def sql_source(
    tools: ClientTools,
    artifact: Path,
    fmt: str,
    no_owner: bool,
    clean: bool,
    stderr: IO[bytes],
    *,
    schema_only: bool = False,
) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    """The archive as SQL text: a plain file itself, or pg_restore's script (offline)."""
    if fmt == "plain":
        return artifact.open("rb"), None
    argv = [
        tools.pg_restore,
        "--file=-",
        *_pg_restore_options(no_owner=no_owner, clean=clean),
        *(["--schema-only"] if schema_only else []),
        str(artifact),
    ]
    producer = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=stderr, env=offline_environment()
    )
    assert producer.stdout is not None
    return producer.stdout, producer


def pump(
    source: IO[bytes],
    producer: subprocess.Popen[bytes] | None,
    consumer: subprocess.Popen[bytes],
    trailer: bytes = b"",
    *,
    guard: ScriptGuard,
) -> tuple[int, int]:
    """Feed ``source`` to psql, each line checked by ``guard`` before psql sees it, without
    the lines older servers reject; return the exit codes of the producer (0 for a file)
    and of psql. UnsafeScript (exit 4) stops it before the offending line.

    psql commits its single transaction when its input ends, so it may only see the end of
    input once the whole source was read without error; any other way out kills it first
    and the server rolls the transaction back.
    """
    assert consumer.stdin is not None
    source_code = 0
    complete = False
    try:
        with source:
            for line in guard.filtered(source):
                if line.rstrip(b"\n") in _UNKNOWN_TO_OLDER_SERVERS:
                    continue
                consumer.stdin.write(line)
        source_code = producer.wait() if producer is not None else 0
        complete = source_code == 0
        if complete and trailer:
            consumer.stdin.write(trailer)
    except BrokenPipeError:
        complete = True  # psql stopped at an error on its own; its stderr says which
    finally:
        if not complete:
            consumer.kill()
        with contextlib.suppress(BrokenPipeError):
            consumer.stdin.close()
        code = consumer.wait()
        if producer is not None:
            if producer.poll() is None:
                producer.kill()
            producer.wait()
    return source_code, code


def plain_preamble(conn: PgConnection, schemas: list[str], major: int) -> str:
    """SQL that empties the database the way a plain dump expects to find it."""
    statements: list[sql.Composable] = [
        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        for schema in schemas
    ]
    # Recreate public as initdb makes it, so the restored schema matches the backup's.
    owner = "pg_database_owner" if major >= 14 else "CURRENT_USER"
    statements += [
        sql.SQL("CREATE SCHEMA public AUTHORIZATION {}").format(sql.SQL(owner)),
        sql.SQL("GRANT USAGE ON SCHEMA public TO PUBLIC"),
        sql.SQL("COMMENT ON SCHEMA public IS 'standard public schema'"),
    ]
    if major < 15:
        statements.append(sql.SQL("GRANT CREATE ON SCHEMA public TO PUBLIC"))
    return "".join(statement.as_string(conn) + ";\n" for statement in statements)
