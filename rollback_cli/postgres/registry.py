"""The record of the databases this tool made: how it knows its own artifacts.

A scratch, verify or kept database is ours only if it carries our record, written by the
run that created (or kept) it, as its database comment (``pg_shdescription``): it lives
with the database object itself, survives renames, needs no table anywhere and no more
privilege than owning the database. A database whose *name* merely looks like one of ours
is never swapped, dropped or listed.

The record says which live database it belongs to (``of``), what it is (``kind``), and
which session made it (``pid`` + ``backend_start``): while that session is alive the run
is still going, and nothing touches its artifacts. A kept database records the OID of the
database that replaced it (``replaced_by``), so ``undo`` finds exactly the database kept by
the last rollback, and the live database's own comment (``comment``), so the swap and its
repair can put the comment back where it belongs. A scratch database being swapped in
records ``state = "swapping"`` and the live database's OID, so an interrupted swap can be
finished or undone by the next run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rollback_cli.postgres.catalog import database_comments, session_alive, session_identity
from rollback_cli.postgres.ddl import set_comment

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

RECORD_PREFIX = "db-rollback artifact "
RECORD_VERSION = 1
SCRATCH = "scratch"  # restored copy a data rollback swaps in
VERIFY = "verify"  # restored copy of a restore test
REHEARSAL = "rehearsal"  # schema copy a schema rollback rehearses its downgrade on
KEPT = "kept"  # the database a swap replaced, kept for `rollback undo`
INPLACE = "in-place"  # on the live database while an in-place restore refuses connections
BUSY = "busy"  # on the live database while a swap rollback builds its scratch copy
KINDS = frozenset({SCRATCH, VERIFY, REHEARSAL, KEPT, INPLACE, BUSY})
SWAPPING = "swapping"


@dataclass(frozen=True)
class ArtifactRecord:
    kind: str
    of: str
    run_id: str
    created_at: str
    pid: int | None = None
    backend_start: str | None = None
    state: str | None = None
    live_oid: int | None = None
    replaced_by: int | None = None
    comment: str | None = None
    intended: str | None = None
    version: int = RECORD_VERSION

    def to_comment(self) -> str:
        return RECORD_PREFIX + json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_comment(cls, text: str) -> ArtifactRecord | None:
        """The record in a database comment, or None when it is not one of ours."""
        if not text.startswith(RECORD_PREFIX):
            return None
        try:
            data = json.loads(text[len(RECORD_PREFIX) :])
            record = cls(**data)
        except (ValueError, TypeError):
            return None
        if record.version != RECORD_VERSION or record.kind not in KINDS:
            return None
        return record

    def swapping(self, live_oid: int, pid: int, backend_start: str) -> ArtifactRecord:
        """This record while the swap runs in the session (pid, backend_start)."""
        return replace(
            self, state=SWAPPING, live_oid=live_oid, pid=pid, backend_start=backend_start
        )


@dataclass(frozen=True)
class Artifact:
    name: str
    oid: int
    record: ArtifactRecord


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def new_record(conn: PgConnection, kind: str, of: str, run_id: str) -> ArtifactRecord:
    """A record naming ``conn``'s session as the creator (its liveness = the run's)."""
    pid, started = session_identity(conn)
    return ArtifactRecord(kind, of, run_id, now_iso(), pid=pid, backend_start=started)


def in_place_record(
    conn: PgConnection, of: str, run_id: str, comment: str | None
) -> ArtifactRecord:
    """Put on the live database while an in-place restore keeps connections out; holds the
    database's own comment, put back afterwards (or by the repair of a killed run)."""
    return replace(new_record(conn, INPLACE, of, run_id), comment=comment)


def busy_record(
    conn: PgConnection, of: str, run_id: str, comment: str | None, intended: str
) -> ArtifactRecord:
    """Put on the live database before its scratch copy ``intended`` is created: CREATE
    DATABASE may still complete after the run was killed, and then this record is what
    proves the copy is ours. Holds the live database's own comment, put back afterwards."""
    return replace(new_record(conn, BUSY, of, run_id), comment=comment, intended=intended)


def kept_record(of: str, run_id: str, replaced_by: int, comment: str | None) -> ArtifactRecord:
    return ArtifactRecord(KEPT, of, run_id, now_iso(), replaced_by=replaced_by, comment=comment)


def write(conn: PgConnection, dbname: str, record: ArtifactRecord) -> None:
    set_comment(conn, dbname, record.to_comment())


def artifacts_of(conn: PgConnection, dbname: str, *kinds: str) -> list[Artifact]:
    """Our artifacts belonging to the live database ``dbname``, newest first."""
    found = []
    for name, oid, comment in database_comments(conn, RECORD_PREFIX):
        record = ArtifactRecord.from_comment(comment)
        if record is not None and record.of == dbname and (not kinds or record.kind in kinds):
            found.append(Artifact(name, oid, record))
    return sorted(found, key=lambda a: a.record.created_at, reverse=True)


def run_is_alive(conn: PgConnection, record: ArtifactRecord) -> bool:
    """Whether the session that made ``record`` still runs (kept databases: never)."""
    if record.pid is None or record.backend_start is None:
        return False
    return session_alive(conn, record.pid, record.backend_start)
