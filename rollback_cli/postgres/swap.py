"""The short swap of a data rollback (and of ``undo``): block, terminate, rename.

Everything the swap carries (settings, per-role settings, grants, connection limit) is
put on the replacement *before* the swap, while the live database is untouched, and
:func:`check_swap_allowed` runs the same statements against the live database in a
transaction it rolls back, so a swap the role cannot complete is refused before any
change. The swap itself is then: disallow connections, end the client sessions, rename
live → kept and replacement → live, put the comment back, allow connections.

Signals are deferred only around the renames, whose lock waits are bounded by
``SWAP_LOCK_TIMEOUT_MS``; an interrupt leaves the database either as it was or fully
swapped, never half-way. The replacement carries a ``swapping`` record (see
:mod:`rollback_cli.postgres.registry`) for the duration, so a run killed at any point is
finished or undone by :func:`repair_interrupted_swaps`, which every repairing command
runs through the maintenance database.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING

from psycopg2 import sql

from rollback_cli.errors import ManualAttention, OperationFailed, Refused
from rollback_cli.log import get_logger
from rollback_cli.postgres import registry
from rollback_cli.postgres.catalog import (
    DatabaseLevelState,
    allows_connections,
    database_comments,
    database_name,
    database_oid,
    session_identity,
)
from rollback_cli.postgres.connection import database_error, first_line, set_lock_timeout
from rollback_cli.postgres.ddl import (
    drop_database,
    execute,
    rename_database,
    set_allow_connections,
    set_comment,
    setting_statements,
    terminate_backends,
)

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

# Lock waits while signals are deferred: a short bound, whatever --lock-timeout says.
SWAP_LOCK_TIMEOUT_MS = 2000
LOCK_NOT_AVAILABLE = "55P03"


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
class Swap:
    """Put ``replacement`` in place of ``live``, which is kept as ``kept_name``.

    The plan a dry run shows and the statements :func:`swap_databases` runs come from this
    one object.
    """

    live: str
    replacement: str
    kept_name: str

    def describe(self, *, blocking: bool = True) -> str:
        renames = (
            f"RENAME {self.live} TO {self.kept_name}; RENAME {self.replacement} TO {self.live}"
        )
        if not blocking:
            return renames
        return (
            f"ALTER DATABASE {self.live} WITH ALLOW_CONNECTIONS false; terminate its sessions; "
            f"{renames}; carry settings and grants; allow connections"
        )


def check_swap_allowed(conn: PgConnection, live: str, state: DatabaseLevelState) -> int:
    """Run what the swap will run (settings, grants, connection limit, comment, connection
    switch) against ``live`` itself in a transaction that is rolled back; Refused (exit 7),
    before any change, when the role may not. Returns how many statements were checked."""
    statements = [
        *setting_statements(live, state),
        *_switch_statements(live, state),
    ]
    error_class = database_error()
    conn.autocommit = False
    try:
        for statement in statements:
            try:
                execute(conn, statement)
            except error_class as exc:
                conn.rollback()
                if getattr(exc, "pgcode", None) == LOCK_NOT_AVAILABLE:
                    raise OperationFailed(
                        f"another session holds a lock on {live}'s catalog entry (an open "
                        "GRANT or ALTER DATABASE?); nothing was changed, retry when it ends"
                    ) from None
                raise Refused(
                    f"the swap could not carry {live}'s settings, grants or owner-only "
                    f"changes: {first_line(exc)}; nothing was changed",
                    hint="run as the database owner or a superuser, or use --strategy in-place",
                ) from None
    finally:
        if not conn.closed:
            conn.rollback()
            conn.autocommit = True
    return len(statements)


def _switch_statements(live: str, state: DatabaseLevelState) -> list[sql.Composable]:
    db = sql.Identifier(live)
    return [
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(db),
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(state.comment)),
    ]


def swap_databases(
    conn: PgConnection,
    swap: Swap,
    state: DatabaseLevelState,
    record: registry.ArtifactRecord,
    run_id: str,
) -> float:
    """Carry out ``swap``; return the unavailable window in milliseconds.

    ``record`` is the replacement's own record; ``state`` (read before) holds the live
    database's comment, put back on the live name afterwards. On failure before the renames
    the live database is left as it was; on failure of the renames it is put back, or
    ManualAttention says exactly where things are."""
    logger = get_logger()
    live, replacement, kept_name = swap.live, swap.replacement, swap.kept_name
    live_oid, replacement_oid = database_oid(conn, live), database_oid(conn, replacement)
    if live_oid is None or replacement_oid is None:
        raise OperationFailed(f"{live if live_oid is None else replacement} no longer exists")
    registry.write(conn, replacement, record.swapping(live_oid, *session_identity(conn)))
    started = time.monotonic()
    terminated = _block(conn, live, replacement)
    with deferred_signals():
        set_lock_timeout(conn, SWAP_LOCK_TIMEOUT_MS)
        kept = registry.kept_record(live, run_id, replacement_oid, state.comment)
        renamed_live = False
        try:
            registry.write(conn, live, kept)
            rename_database(conn, live, kept_name)
            renamed_live = True
            logger.info("live database renamed", database=live, kept_as=kept_name)
            rename_database(conn, replacement, live)
            logger.info("replacement renamed", database=live, replacement=replacement)
        except Exception as exc:
            _put_back(conn, live, kept_name, renamed_live, state.comment, exc)
            raise OperationFailed(
                f"swap failed before it completed and was undone: {exc}"
            ) from None
        try:
            # Connections first: until the comment replaces the swapping record, a run
            # killed here is finished by the repair, which finds that record.
            set_allow_connections(conn, live, True)
            set_comment(conn, live, state.comment)
        except Exception as exc:
            raise ManualAttention(
                f"the backup is in place as {live} (the old database is kept as {kept_name}) "
                f"but connections could not be allowed again: {exc}; run "
                f'ALTER DATABASE "{live}" WITH ALLOW_CONNECTIONS true, or any db-rollback '
                "cleanup-artifacts, which finishes the swap"
            ) from None
        window_ms = (time.monotonic() - started) * 1000
    with suppress(Exception):
        set_allow_connections(conn, kept_name, True)
    logger.info(
        "databases swapped",
        database=live,
        kept_as=kept_name,
        sessions_terminated=terminated,
        unavailable_ms=round(window_ms, 1),
    )
    return window_ms


def _block(conn: PgConnection, live: str, replacement: str) -> int:
    """Disallow connections to both databases and end the live one's client sessions; on
    any failure or interrupt the live database accepts connections again."""
    try:
        set_allow_connections(conn, replacement, False)
        set_allow_connections(conn, live, False)
        get_logger().info("connections blocked", database=live)
        terminated = terminate_backends(conn, live)
        terminate_backends(conn, replacement)
        return terminated
    except BaseException as exc:
        with suppress(Exception):
            set_allow_connections(conn, live, True)
        if isinstance(exc, Exception):
            raise OperationFailed(
                f"swap failed before it began and was undone: {first_line(exc)}"
            ) from None
        raise


def _put_back(
    conn: PgConnection,
    live: str,
    kept_name: str,
    renamed_live: bool,
    comment: str | None,
    exc: Exception,
) -> None:
    logger = get_logger()
    try:
        if renamed_live:
            rename_database(conn, kept_name, live)
        set_comment(conn, live, comment)
        set_allow_connections(conn, live, True)
        logger.warning("swap undone; live database unchanged", error=str(exc))
    except Exception as second:
        raise ManualAttention(
            f"swap failed ({exc}) and putting the live database back failed too ({second}): "
            f"the original database is named {kept_name if renamed_live else live}; run any "
            "db-rollback cleanup-artifacts to put it back, or rename it to "
            f'{live} and run ALTER DATABASE "{live}" WITH ALLOW_CONNECTIONS true'
        ) from None


def repair_interrupted_swaps(conn: PgConnection, live: str) -> list[str]:
    """Finish or undo every swap of ``live`` whose run died (kill -9, lost machine), and
    let connections in again after a killed in-place restore.

    Before the renames: the live database gets its comment back and accepts connections.
    Between them: the original is renamed back. After them: the swap is finished (comment,
    connections). The replacement is dropped by cleanup afterwards when it is a scratch
    copy; a kept database swapped in by an interrupted undo is kept again. Returns what
    was done, one line per action."""
    done: list[str] = []
    for artifact in registry.artifacts_of(conn, live):
        record = artifact.record
        if registry.run_is_alive(conn, record):
            continue
        if record.state == registry.SWAPPING:
            done += _repair_one(conn, live, artifact)
        elif record.kind == registry.BUSY and artifact.name == live:
            set_comment(conn, live, record.comment)
            done.append(f"{live} has its own comment back (a rollback was killed)")
            if record.intended and _unclaimed(conn, record.intended):
                drop_database(conn, record.intended)
                done.append(f"dropped {record.intended}, created by the killed rollback")
        elif record.kind == registry.INPLACE and artifact.name == live:
            # An in-place restore was killed: its transaction was rolled back by the server.
            set_comment(conn, live, record.comment)
            set_allow_connections(conn, live, True)
            done.append(f"{live} accepts connections again (an in-place restore was killed)")
    if allows_connections(conn, live) is False and not done:
        done += _finish_after_renames(conn, live)
    if allows_connections(conn, live) is False and not done:
        get_logger().warning(
            "the live database refuses connections and no interrupted swap of ours explains "
            "it; leaving it as it is",
            database=live,
        )
    return done


def _unclaimed(conn: PgConnection, name: str) -> bool:
    """A database that exists without any record: created by a run killed before it could
    write one (a copy with a scratch record is a stray copy, which cleanup drops itself)."""
    return database_oid(conn, name) is not None and _record_of(conn, name) is None


def _finish_after_renames(conn: PgConnection, live: str) -> list[str]:
    """The live database refuses connections and the last kept database of ``live`` says
    it was replaced by it: a swap was killed after its renames. Finish it."""
    live_oid = database_oid(conn, live)
    for artifact in registry.artifacts_of(conn, live, registry.KEPT):
        if artifact.record.replaced_by == live_oid and live_oid is not None:
            set_allow_connections(conn, live, True)
            set_comment(conn, live, artifact.record.comment)
            with suppress(Exception):
                set_allow_connections(conn, artifact.name, True)
            return [f"finished an interrupted swap: {live} accepts connections again"]
    return []


def _repair_one(conn: PgConnection, live: str, artifact: registry.Artifact) -> list[str]:
    record = artifact.record
    assert record.live_oid is not None
    original = database_name(conn, record.live_oid)
    # The original carries our kept record (with its own comment in it) once the swap
    # wrote it; before that it still has its own comment, which stays.
    original_record = _record_of(conn, original) if original is not None else None
    actions: list[str] = []
    if artifact.name == live:
        # Both renames happened: finish the swap.
        set_comment(conn, live, original_record.comment if original_record else None)
        set_allow_connections(conn, live, True)
        actions.append(f"finished an interrupted swap: {live} is the restored database")
        if original is not None:
            set_allow_connections(conn, original, True)
        return actions
    if original is not None and original != live and database_oid(conn, live) is None:
        rename_database(conn, original, live)
        actions.append(f"renamed {original} back to {live} (a swap was interrupted)")
    if original is not None:
        if original_record is not None:
            set_comment(conn, live, original_record.comment)
        set_allow_connections(conn, live, True)
        actions.append(f"{live} accepts connections again")
    # The replacement goes back to what it was: a scratch copy (dropped by the caller's
    # cleanup) or, for an interrupted undo, a kept database.
    restored = _unswapped(record)
    registry.write(conn, artifact.name, restored)
    with suppress(Exception):
        set_allow_connections(conn, artifact.name, True)
    return actions


def _unswapped(record: registry.ArtifactRecord) -> registry.ArtifactRecord:
    return replace(record, state=None, live_oid=None)


def _record_of(conn: PgConnection, dbname: str) -> registry.ArtifactRecord | None:
    for name, _oid, comment in database_comments(conn, registry.RECORD_PREFIX):
        if name == dbname:
            return registry.ArtifactRecord.from_comment(comment)
    return None
