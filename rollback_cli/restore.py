"""Restoring archives with pg_restore/psql, and the databases they are restored into."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rollback_cli import pg
from rollback_cli.errors import BackupError, ConfigError, OperationFailed, Refused
from rollback_cli.log import get_logger, redactor

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.manifest import Manifest
    from rollback_cli.settings import ConnInfo

MAINTENANCE_DATABASES = ("postgres", "template1")
PLAIN_HEADER = b"-- PostgreSQL database dump"
PLAIN_TRAILER = b"-- PostgreSQL database dump complete"


def maintenance_connection(conninfo: ConnInfo) -> PgConnection:
    """A connection to a database other than the target (for CREATE/ALTER/DROP DATABASE)."""
    last_error: ConfigError | None = None
    for name in (*MAINTENANCE_DATABASES, conninfo.dbname):
        if name == conninfo.dbname and name in MAINTENANCE_DATABASES:
            continue
        try:
            return pg.connect(conninfo, name)
        except ConfigError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


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
            cur.execute(
                "SELECT datlocprovider::text, "
                + ("datlocale" if conn.server_version >= 170000 else "daticulocale")
                + " FROM pg_database WHERE datname = %s",
                (dbname,),
            )
            extra = cur.fetchone()
            if extra:
                provider, icu = extra
    name, owner, encoding, collate, ctype, tablespace = (str(v) for v in row)
    return DatabaseProperties(name, owner, encoding, collate, ctype, tablespace, provider, icu)


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

    q = pg.quote_ident
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
            f"cannot create the scratch database {new_name} for {purpose}: {pg.first_line(exc)}",
            hint="the role needs CREATEDB (and CREATE on the database's tablespace)",
        ) from None


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def drop_database(conn: PgConnection, name: str) -> None:
    with conn.cursor() as cur:
        if conn.server_version >= 130000:
            cur.execute(f"DROP DATABASE IF EXISTS {pg.quote_ident(name)} WITH (FORCE)")
        else:
            cur.execute(f"DROP DATABASE IF EXISTS {pg.quote_ident(name)}")


def role_privileges(conn: PgConnection) -> dict[str, bool]:
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


def check_archive_readable(tools: pg.ClientTools, artifact: Path, fmt: str) -> int:
    """``pg_restore --list`` (or the plain header/trailer); returns the number of TOC entries."""
    if fmt == "plain":
        return _check_plain(artifact)
    result = subprocess.run(
        [tools.pg_restore, "--list", str(artifact)],
        capture_output=True,
        timeout=600,
        check=False,
        env=_offline_environment(),
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
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(b";"))


def _offline_environment() -> dict[str, str]:
    """For a client tool that connects nowhere: no connection settings, password included."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _psql_argv(
    tools: pg.ClientTools, preamble: Path | None, script: str, *, single_transaction: bool
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
    return 0


def restore_into(
    tools: pg.ClientTools,
    conninfo: ConnInfo,
    dbname: str,
    artifact: Path,
    manifest: Manifest,
    *,
    jobs: int = 1,
    no_owner: bool = False,
    clean: bool = False,
    single_transaction: bool = False,
    preamble: Path | None = None,
) -> None:
    """Restore ``artifact`` into ``dbname``; OperationFailed with the first error on failure.

    ``preamble`` (plain format only) is an SQL file run first, in the same transaction.
    """
    logger = get_logger()
    if tools.major >= NEWER_SESSION_SETTINGS and _server_major(conninfo) < NEWER_SESSION_SETTINGS:
        _restore_filtered(
            tools,
            conninfo,
            dbname,
            artifact,
            manifest,
            no_owner=no_owner,
            clean=clean,
            single_transaction=single_transaction,
            preamble=preamble,
        )
        return
    if manifest.format == "plain":
        argv = _psql_argv(tools, preamble, str(artifact), single_transaction=single_transaction)
    else:
        argv = [tools.pg_restore, "--no-password", "--exit-on-error", f"--dbname={dbname}"]
        if no_owner:
            argv.append("--no-owner")
        if clean:
            argv += ["--clean", "--if-exists"]
        if single_transaction:
            argv.append("--single-transaction")
        elif jobs > 1:
            argv.append(f"--jobs={jobs}")
        argv.append(str(artifact))
    logger.info(
        "restoring",
        database=dbname,
        tool=Path(argv[0]).name,
        jobs=jobs,
        no_owner=no_owner,
        single_transaction=single_transaction,
    )
    with pg.child_environment(conninfo, dbname) as env, tempfile.TemporaryFile() as stderr_file:
        result = subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=stderr_file, env=env, check=False
        )
        if result.returncode != 0:
            reason = pg.error_tail(stderr_file, f"exit {result.returncode}")
            raise OperationFailed(f"restore into {dbname} failed: {reason}")


# pg_restore and pg_dump from 17 on always emit ``SET transaction_timeout = 0``, a setting
# older servers reject; such restores go through psql with that one line removed.
NEWER_SESSION_SETTINGS = 17
_UNKNOWN_TO_OLDER_SERVERS = (b"SET transaction_timeout = 0;",)


def _server_major(conninfo: ConnInfo) -> int:
    conn = pg.connect(conninfo)
    try:
        return pg.server_major(conn)
    finally:
        conn.close()


def _restore_filtered(
    tools: pg.ClientTools,
    conninfo: ConnInfo,
    dbname: str,
    artifact: Path,
    manifest: Manifest,
    *,
    no_owner: bool,
    clean: bool,
    single_transaction: bool,
    preamble: Path | None,
) -> None:
    """A newer client's output into an older server: SQL text, filtered, into psql."""
    get_logger().info(
        "restoring through psql (client newer than the server)",
        database=dbname,
        client_major=tools.major,
        single_transaction=single_transaction,
    )
    psql = _psql_argv(tools, preamble, "-", single_transaction=single_transaction)
    producer: subprocess.Popen[bytes] | None = None
    with (
        pg.child_environment(conninfo, dbname) as env,
        tempfile.TemporaryFile() as psql_err,
        tempfile.TemporaryFile() as source_err,
    ):
        source: IO[bytes]
        if manifest.format == "plain":
            source = artifact.open("rb")
        else:
            argv = [tools.pg_restore, "--file=-"]
            if no_owner:
                argv.append("--no-owner")
            if clean:
                argv += ["--clean", "--if-exists"]
            argv.append(str(artifact))
            producer = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=source_err, env=_offline_environment()
            )
            assert producer.stdout is not None
            source = producer.stdout
        consumer = subprocess.Popen(
            psql, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=psql_err, env=env
        )
        assert consumer.stdin is not None
        # psql commits its single transaction when its input ends, so it may only see the
        # end of input once the whole source was read without error; any other way out
        # kills it first and the server rolls the transaction back.
        source_code = 0
        complete = False
        try:
            with source:
                for line in source:
                    if line.rstrip(b"\n") in _UNKNOWN_TO_OLDER_SERVERS:
                        continue
                    consumer.stdin.write(line)
            source_code = producer.wait() if producer is not None else 0
            complete = source_code == 0
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
        if source_code != 0:
            reason = pg.error_tail(source_err, f"exit {source_code}")
            raise OperationFailed(f"restore into {dbname} failed: {reason}")
        if code != 0:
            reason = pg.error_tail(psql_err, f"exit {code}")
            raise OperationFailed(f"restore into {dbname} failed: {reason}")
