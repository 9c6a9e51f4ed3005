"""Adversarial suite: restores connect as a role without superuser rights when the operator
names one (--restore-url), so a backup's COPY ... TO PROGRAM cannot reach the server's host."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from rollback_cli.errors import ExitCode
from tests.rollback_helpers import Project, reseal, tier_project
from tests.servers import TestDatabase

PASSWORD = "own-Pa55:w/rd"


@pytest.fixture
def owned(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> Iterator[tuple[Project, str]]:
    """The example project whose database and tables belong to an ordinary login role;
    the tool itself connects as the superuser."""
    server = database15.server
    role = f"own_{uuid.uuid4().hex[:8]}"
    server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    server.execute(f'ALTER DATABASE "{database15.name}" OWNER TO {role}')
    server.execute(f"GRANT CREATE ON SCHEMA public TO {role}", dbname=database15.name)
    project = tier_project(database15, alembic_project, tmp_path)
    for table in ("customers", "orders", "alembic_version"):
        database15.execute(f"ALTER TABLE {table} OWNER TO {role}")
    url = f"postgresql://{role}:{quote(PASSWORD, safe='')}@{server.host}:{server.port}/x"
    try:
        yield project, url
    finally:
        database15.drop_all()
        server.execute(f"DROP OWNED BY {role}")
        server.execute(f"DROP ROLE {role}")


def test_rollback_restores_as_the_named_role(owned: tuple[Project, str]) -> None:
    project, restore_url = owned
    before = project.data_fingerprint()
    backup = project.backup()
    project.db.execute("DELETE FROM orders")

    result, doc = project.run_json(
        "--restore-url", restore_url, "rollback", "data", "--backup-file", backup
    )

    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == before
    assert not any("superuser rights" in w for w in doc["warnings"])
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("strategy", ["swap", "in-place"])
def test_copy_to_program_in_a_backup_cannot_run_as_the_restore_role(
    owned: tuple[Project, str], tmp_path: Path, strategy: str
) -> None:
    project, restore_url = owned
    marker = Path("/tmp") / f"prog{uuid.uuid4().hex[:8]}"
    backup = Path(project.backup("--format", "plain"))
    data = backup.read_bytes()
    at = data.rindex(b"-- PostgreSQL database dump complete")
    evil = f"COPY (SELECT 1) TO PROGRAM 'touch {marker}';\n".encode()
    backup.write_bytes(data[:at] + evil + data[at:])
    reseal(backup)
    project.db.execute("DELETE FROM orders")
    before = project.data_fingerprint()

    result = project.run(
        "--restore-url",
        restore_url,
        "rollback",
        "data",
        "--backup-file",
        str(backup),
        "--strategy",
        strategy,
    )

    assert result.exit_code in (ExitCode.BACKUP_INVALID, ExitCode.FAILED_UNCHANGED), result.stderr
    assert "TO PROGRAM" in result.stderr or "pg_execute_server_program" in result.stderr
    assert not marker.exists()
    assert project.data_fingerprint() == before
