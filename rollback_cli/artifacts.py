"""Leftovers of rollbacks: kept pre-rollback databases, stray scratch databases, temp files."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

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


def stamp_of(name: str) -> datetime | None:
    match = _STAMP.search(name)
    if not match:
        return None
    return datetime.strptime(match.group(1), STAMP_FORMAT).replace(tzinfo=timezone.utc)


def _databases_with(conn: Any, dbname: str, mark: str) -> list[str]:
    prefix = derived_name(dbname, mark)[: -14]
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))
        names = [str(r[0]) for r in cur.fetchall() if stamp_of(str(r[0])) is not None]
    return sorted(names, key=lambda n: stamp_of(n) or datetime.min, reverse=True)


def kept_databases(conn: Any, dbname: str) -> list[str]:
    """Pre-rollback copies of ``dbname``, newest first."""
    return _databases_with(conn, dbname, PRE_MARK)


def scratch_databases(conn: Any, dbname: str) -> list[str]:
    return _databases_with(conn, dbname, SCRATCH_MARK) + _databases_with(conn, dbname, VERIFY_MARK)
