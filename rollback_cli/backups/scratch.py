"""Scratch copies: a backup restored into a new database made like the live one, compared
with its manifest, and dropped unless the caller keeps it.

The restore test of ``backup verify`` and the swap of a data rollback both build one.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import OperationFailed
from rollback_cli.log import get_logger, redactor, step
from rollback_cli.postgres.catalog import (
    alembic_revisions,
    database_exists,
    database_properties,
    role_privileges,
    table_row_counts,
)
from rollback_cli.postgres.clients import ClientTools, child_environment, find_client
from rollback_cli.postgres.connection import connect, server_major
from rollback_cli.postgres.ddl import create_database_like, drop_database
from rollback_cli.postgres.names import free_derived_name
from rollback_cli.postgres.restore import restore_into

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.backups.manifest import Manifest
    from rollback_cli.settings import ConnInfo, Target


class RestoreFailed(OperationFailed):
    """The backup itself could not be restored (its SQL failed), as opposed to the scratch
    database not being creatable."""


@dataclass
class ScratchCopy:
    name: str
    comparison: dict[str, Any]
    no_owner: bool
    kept: bool = False

    def keep(self) -> None:
        """Leave the database in place when the block ends (it was swapped in)."""
        self.kept = True


@contextmanager
def restored_copy(
    admin: PgConnection,
    target: Target,
    archive_tools: ClientTools,
    local: Path,
    manifest: Manifest,
    mark: str,
    *,
    jobs: int = 1,
    purpose: str = "the restore",
) -> Iterator[ScratchCopy]:
    """Restore ``local`` into a new database ``{db}{mark}{ts}`` like the live one (same
    encoding, collation, tablespace; owner when the role may set it) and compare it with the
    manifest; the copy is dropped when the block ends unless :meth:`ScratchCopy.keep` was
    called. ``admin`` is a maintenance connection the caller owns."""
    conninfo = target.conninfo
    major = server_major(admin)
    tools = find_client(major, target.pg_bin_dir)
    if tools.major < archive_tools.major:
        tools = archive_tools  # an archive only its own (newer) client can read
    privileges = role_privileges(admin)
    no_owner = not privileges["superuser"]
    like = (
        database_properties(admin, target.dbname) if database_exists(admin, target.dbname) else None
    )
    scratch = free_derived_name(admin, target.dbname, mark)
    copy: ScratchCopy | None = None
    try:
        with step("restore", scratch_database=scratch):
            create_database_like(admin, scratch, like, set_owner=not no_owner, purpose=purpose)
            if no_owner:
                get_logger().warning("restoring without ownership (role is not superuser)")
            try:
                if manifest.type == "data":
                    _copy_live_schema(tools, conninfo, scratch, no_owner, major)
                restore_into(
                    tools,
                    conninfo,
                    scratch,
                    local,
                    manifest.format,
                    jobs=jobs,
                    no_owner=no_owner,
                    server_major_version=major,
                )
            except OperationFailed as exc:
                raise RestoreFailed(exc.message, hint=exc.hint) from None
        with step("validate-scratch") as details:
            comparison = compare_with_manifest(conninfo, scratch, manifest)
            details.update(tables=comparison["tables"], rows=comparison["rows"])
        copy = ScratchCopy(scratch, comparison, no_owner)
        yield copy
    finally:
        if copy is None or not copy.kept:
            _drop_quietly(admin, scratch)


def _drop_quietly(conn: PgConnection, name: str) -> None:
    try:
        drop_database(conn, name)
        get_logger().info("scratch database dropped", database=name)
    except Exception as exc:
        get_logger().warning("could not drop scratch database", database=name, error=str(exc))


def _copy_live_schema(
    tools: ClientTools, conninfo: ConnInfo, scratch: str, no_owner: bool, major: int
) -> None:
    """A data-only backup is restored into a copy of the live database's schema."""
    with tempfile.TemporaryDirectory(prefix="db-rollback-schema-") as temp_dir:
        schema_file = Path(temp_dir) / "schema.dump"
        argv = [
            tools.pg_dump,
            "--no-password",
            "--schema-only",
            "--format=custom",
            f"--file={schema_file}",
        ]
        with child_environment(conninfo) as env:
            result = subprocess.run(argv, env=env, capture_output=True, check=False, umask=0o077)
        if result.returncode != 0:
            lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
            reason = redactor.scrub(lines[0]) if lines else f"exit {result.returncode}"
            raise OperationFailed(f"cannot copy the schema of {conninfo.dbname}: {reason}")
        restore_into(
            tools,
            conninfo,
            scratch,
            schema_file,
            "custom",
            no_owner=no_owner,
            server_major_version=major,
        )


def compare_with_manifest(conninfo: ConnInfo, dbname: str, manifest: Manifest) -> dict[str, Any]:
    """Row counts and Alembic revision of ``dbname`` against ``manifest``."""
    conn = connect(conninfo, dbname)
    try:
        counts = table_row_counts(conn)
        revisions = alembic_revisions(conn)
    finally:
        conn.close()
    mismatches: list[str] = []
    if manifest.has_data:
        for table, expected in sorted(manifest.row_counts.items()):
            actual = counts.get(table)
            if actual is None:
                mismatches.append(f"table {table} missing")
            elif actual != expected:
                mismatches.append(f"{table}: {actual} rows, manifest {expected}")
    if manifest.type != "data" and revisions != manifest.alembic_revisions:
        mismatches.append(
            f"alembic revision {','.join(revisions) or 'none'}, manifest "
            f"{','.join(manifest.alembic_revisions) or 'none'}"
        )
    return {
        "database": dbname,
        "tables": len(counts),
        "rows": sum(counts.values()),
        "alembic_revisions": revisions,
        "mismatches": mismatches,
    }
