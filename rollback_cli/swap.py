"""The short swap of a data rollback: block, terminate, rename, carry settings and grants over.

Signals are deferred while it runs, so an interrupt leaves the database either as it was
or fully swapped, never half-way.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rollback_cli.errors import ManualAttention, OperationFailed
from rollback_cli.log import get_logger
from rollback_cli.pg import quote_ident as q

TERMINATE_WAIT_SECONDS = 10.0


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise KeyboardInterrupt."""
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            get_logger().warning("signal deferred until the swap finished", signal=received[0])
            raise KeyboardInterrupt


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


def swap_databases(
    conn: Any, live: str, replacement: str, kept_name: str, state: DatabaseLevelState | None
) -> float:
    """Put ``replacement`` in place of ``live`` (kept as ``kept_name``); return the unavailable
    window in milliseconds. On failure the live database is put back, or ManualAttention says
    exactly where things are."""
    logger = get_logger()
    with deferred_signals():
        started = time.monotonic()
        set_allow_connections(conn, replacement, False)
        set_allow_connections(conn, live, False)
        renamed_live = False
        try:
            terminated = terminate_backends(conn, live)
            terminate_backends(conn, replacement)
            rename_database(conn, live, kept_name)
            renamed_live = True
            rename_database(conn, replacement, live)
        except Exception as exc:
            _put_back(conn, live, kept_name, renamed_live, exc)
            raise OperationFailed(
                f"swap failed before it completed and was undone: {exc}"
            ) from None
        try:
            if state is not None:
                apply_database_state(conn, live, state)
            set_allow_connections(conn, live, True)
        except Exception as exc:
            raise ManualAttention(
                f"the backup is in place as {live} (the old database is kept as {kept_name}) but "
                f"connections or settings could not be restored: {exc}; run "
                f"ALTER DATABASE {q(live)} WITH ALLOW_CONNECTIONS true and compare settings "
                f"with {kept_name}"
            ) from None
        window_ms = (time.monotonic() - started) * 1000
        set_allow_connections(conn, kept_name, True)
    logger.info(
        "databases swapped",
        database=live,
        kept_as=kept_name,
        sessions_terminated=terminated,
        unavailable_ms=round(window_ms, 1),
    )
    return window_ms


def _put_back(conn: Any, live: str, kept_name: str, renamed_live: bool, exc: Exception) -> None:
    logger = get_logger()
    try:
        if renamed_live:
            rename_database(conn, kept_name, live)
        set_allow_connections(conn, live, True)
        logger.warning("swap undone; live database unchanged", error=str(exc))
    except Exception as second:
        raise ManualAttention(
            f"swap failed ({exc}) and putting the live database back failed too ({second}): "
            f"the original database is named {kept_name if renamed_live else live}; rename it to "
            f"{live} and run ALTER DATABASE {q(live)} WITH ALLOW_CONNECTIONS true"
        ) from None
