"""Names of the databases the tool derives from a database's name: ``{db}{mark}{timestamp}``."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rollback_cli.errors import Refused
from rollback_cli.postgres.catalog import database_exists, databases_starting_with

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

PRE_MARK = "_pre_"
SCRATCH_MARK = "_rb_"
VERIFY_MARK = "_verify_"
STAMP_FORMAT = "%Y%m%d%H%M%S"
_STAMP = re.compile(r"(\d{14})$")


def stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(timezone.utc)).strftime(STAMP_FORMAT)


def derived_name(dbname: str, mark: str, when: datetime | None = None) -> str:
    """``{db}{mark}{ts}``, shortened to fit PostgreSQL's 63-byte identifiers."""
    suffix = f"{mark}{stamp(when)}"
    base = dbname.encode("utf-8")[: 63 - len(suffix)].decode("utf-8", "ignore")
    return base + suffix


def free_derived_name(conn: PgConnection, dbname: str, mark: str) -> str:
    """A derived name no database has yet (names carry seconds: wait for the next one)."""
    for _ in range(5):
        name = derived_name(dbname, mark)
        if not database_exists(conn, name):
            return name
        time.sleep(1.0)
    raise Refused(f"cannot find a free name for {name}")


def stamp_of(name: str) -> datetime | None:
    match = _STAMP.search(name)
    if not match:
        return None
    return datetime.strptime(match.group(1), STAMP_FORMAT).replace(tzinfo=timezone.utc)


def derived_databases(conn: PgConnection, dbname: str, mark: str) -> list[str]:
    """Databases named like ``dbname``'s derived ones with ``mark``, newest first."""
    prefix = derived_name(dbname, mark)[:-14]
    names = [n for n in databases_starting_with(conn, prefix) if stamp_of(n) is not None]
    return sorted(names, key=lambda n: stamp_of(n) or datetime.min, reverse=True)
