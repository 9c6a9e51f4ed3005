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
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import ManualAttention, OperationFailed
from rollback_cli.log import get_logger
from rollback_cli.postgres.connection import quote_ident as q
from rollback_cli.postgres.ddl import (
    apply_database_state,
    rename_database,
    set_allow_connections,
    terminate_backends,
)

if TYPE_CHECKING:
    from rollback_cli.postgres.catalog import DatabaseLevelState


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


def swap_databases(conn: Any, swap: Swap, state: DatabaseLevelState | None) -> float:
    """Carry out ``swap``; return the unavailable window in milliseconds. On failure the live
    database is put back, or ManualAttention says exactly where things are."""
    live, replacement, kept_name = swap.live, swap.replacement, swap.kept_name
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
