"""Names of the databases the tool derives from a database's name: ``{db}{mark}{timestamp}``.

A name only helps a person read ``\\l``; what makes a database ours is its record
(:mod:`rollback_cli.postgres.registry`). Names never exceed PostgreSQL's 63 bytes and never
collide: a long database name is cut and followed by a hash of the whole name, so two long
names that share their first bytes still derive different names.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rollback_cli.errors import Refused
from rollback_cli.postgres.catalog import database_exists

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

PRE_MARK = "_pre_"
SCRATCH_MARK = "_rb_"
VERIFY_MARK = "_verify_"
REHEARSAL_MARK = "_rh_"
STAMP_FORMAT = "%Y%m%d%H%M%S"
MAX_IDENTIFIER_BYTES = 63
HASH_LENGTH = 8


def stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(timezone.utc)).strftime(STAMP_FORMAT)


def derived_name(dbname: str, mark: str, when: datetime | None = None) -> str:
    """``{db}{mark}{ts}``; when that exceeds 63 bytes, ``{db cut}~{hash8}{mark}{ts}``."""
    suffix = f"{mark}{stamp(when)}"
    name = dbname + suffix
    if len(name.encode("utf-8")) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(dbname.encode("utf-8")).hexdigest()[:HASH_LENGTH]
    room = MAX_IDENTIFIER_BYTES - len(suffix) - len(digest) - 1
    base = dbname.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{base}~{digest}{suffix}"


def free_derived_name(conn: PgConnection, dbname: str, mark: str) -> str:
    """A derived name no database has yet (names carry seconds: wait for the next one)."""
    for _ in range(5):
        name = derived_name(dbname, mark)
        if not database_exists(conn, name):
            return name
        time.sleep(1.0)
    raise Refused(f"cannot find a free name for {name}")
