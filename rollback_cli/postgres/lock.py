"""The rollback lock: a session advisory lock held in the maintenance database.

Holding it in ``postgres`` (not the target) means it survives the rename of the target
database and is released by PostgreSQL itself if this process dies.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import Refused
from rollback_cli.log import bound_context, get_logger
from rollback_cli.postgres.connection import maintenance_connection

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo

LOCK_CLASS = 0x52424B  # "RBK"


def lock_key(dbname: str) -> tuple[int, int]:
    objid = zlib.crc32(dbname.encode("utf-8"))
    if objid >= 2**31:
        objid -= 2**32
    return LOCK_CLASS, objid


def lock_holder(conn: Any, dbname: str) -> str | None:
    """Who holds the rollback lock for ``dbname`` (any database of the cluster), or None."""
    classid, objid = lock_key(dbname)
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT a.pid, coalesce(a.application_name, ''), a.usename,
                   to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted
              AND l.classid = (%s::bigint & 4294967295)::oid
              AND l.objid = (%s::bigint & 4294967295)::oid AND l.objsubid = 2
            """,
            (classid, objid),
        )
        row = cur.fetchone()
    if row is None:
        return None
    pid, app, user, started = row
    return f"pid {pid}, application_name {app!r}, user {user}, started {started}"


@contextmanager
def rollback_lock(conninfo: ConnInfo, dbname: str) -> Iterator[PgConnection]:
    """Hold the rollback lock for ``dbname``; a second holder is refused (exit 7) by name."""
    logger = get_logger()
    context = bound_context()
    conn = maintenance_connection(conninfo)
    try:
        app_name = f"db-rollback {context.get('run_id', '')} {context.get('actor', '')}".strip()
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('application_name', %s, false)", (app_name[:63],))
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", lock_key(dbname))
            row = cur.fetchone()
        if not row or not row[0]:
            holder = lock_holder(conn, dbname) or "another session"
            raise Refused(
                f"another rollback of {dbname} is running ({holder})",
                hint="wait for it to finish; the lock is released when it exits",
            )
        logger.info("lock acquired", database=dbname)
        yield conn
    finally:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock_all()")
            logger.info("lock released", database=dbname)
        except Exception as exc:
            # Closing the session below releases the lock anyway.
            logger.warning("explicit unlock failed", error=type(exc).__name__)
        conn.close()
