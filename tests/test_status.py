"""``status``: the preflight before a rollback. Connection, server and client versions,
privileges, current and head Alembic revisions, the rollback lock, sessions that would block."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from psycopg2 import sql

from rollback_cli.errors import ExitCode
from rollback_cli.postgres.lock import rollback_lock
from rollback_cli.settings import parse_database_url
from tests.cli_helpers import PASSWORD, Workspace, assert_no_password, unused_port
from tests.servers import TestDatabase

REV_TIER = "b7e2f5a91c38"
REV_HEAD = "e41c0d7f6a95"


@pytest.fixture
def ws(
    database: TestDatabase, tmp_path: Path, alembic_project: Path, cli_env: dict[str, str]
) -> Workspace:
    config = Config(str(alembic_project))
    config.attributes["configure_logger"] = False
    url = database.url.replace("postgresql://", "postgresql+psycopg2://", 1)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, REV_TIER)
    return Workspace(database, tmp_path / "work", alembic_ini=alembic_project)


def checks_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in doc["checks"]}


@pytest.fixture
def role(ws: Workspace) -> Iterator[Any]:
    """A factory of login roles (dropped afterwards); returns a URL for the role."""
    server = ws.db.server
    made: list[str] = []

    def make(*attributes: str, owner: bool = False, signal: bool = False) -> str:
        name = f"r{len(made)}_{ws.db.name}"
        attrs = sql.SQL(" ").join(sql.SQL(a) for a in ("LOGIN", *attributes))
        conn = server.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
                        sql.Identifier(name), attrs, sql.Literal(PASSWORD)
                    )
                )
        finally:
            conn.close()
        made.append(name)
        if owner:  # the database and its tables, as after a deploy run by this role
            server.execute(f'ALTER DATABASE "{ws.db.name}" OWNER TO "{name}"')
            for table in ("customers", "orders", "alembic_version"):
                ws.db.execute(f'ALTER TABLE "{table}" OWNER TO "{name}"')
        if signal:
            server.execute(f'GRANT pg_signal_backend TO "{name}"')
        return ws.url.replace("postgresql://postgres:", f"postgresql://{name}:", 1)

    yield make
    server.execute(f'ALTER DATABASE "{ws.db.name}" OWNER TO postgres')
    for name in made:
        server.execute(f'DROP OWNED BY "{name}"', dbname=ws.db.name)
        server.execute(f'DROP ROLE "{name}"')


def test_all_in_place_exits_0(ws: Workspace) -> None:
    run, doc = ws.run_json("status")
    assert run.exit_code == 0, str(run)
    checks = checks_of(doc)
    assert {name: c["status"] for name, c in checks.items()} == {
        "connection": "ok",
        "client": "ok",
        "privileges": "ok",
        "revision": "ok",
        "lock": "ok",
        "sessions": "ok",
    }
    major = ws.db.server.major
    assert f"(PostgreSQL {major}." in checks["connection"]["detail"]
    assert "***" in checks["connection"]["detail"]
    assert checks["client"]["detail"].startswith(f"pg_dump {major}.")
    assert str(ws.db.server.bin_dir) in checks["client"]["detail"]
    privileges = checks["privileges"]
    assert privileges["superuser"] and privileges["createdb"] and privileges["owner"]
    assert privileges["can_terminate"]
    assert checks["revision"]["current"] == REV_TIER and checks["revision"]["head"] == REV_HEAD
    assert doc["revision_before"] == REV_TIER and doc["head_revision"] == REV_HEAD
    assert doc["outcome"] == "success"

    table = ws.run("status")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("  ✓ ") for line in lines)
    assert f"current {REV_TIER}, head {REV_HEAD}" in table.stdout


def test_without_alembic_config_head_is_unknown(ws: Workspace) -> None:
    ws.alembic_ini = None  # none named: the default alembic.ini is not here
    run, doc = ws.run_json("status")
    assert run.exit_code == 0, str(run)
    revision = checks_of(doc)["revision"]
    assert revision["head"] is None and "head unknown" in revision["detail"]


def test_named_alembic_config_that_is_missing_fails(ws: Workspace, tmp_path: Path) -> None:
    ws.alembic_ini = tmp_path / "missing.ini"
    run, doc = ws.run_json("status")
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert checks_of(doc)["alembic"]["status"] == "fail"
    assert f"{ws.alembic_ini} not found" in run.error_line()


def test_revision_unknown_to_the_scripts_is_a_warning(ws: Workspace) -> None:
    ws.db.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    run, doc = ws.run_json("status")
    assert run.exit_code == 0, str(run)
    revision = checks_of(doc)["revision"]
    assert revision["status"] == "warning"
    assert "f00dfeedbeef is not in" in revision["detail"]


def test_owner_without_createdb_gets_a_warning(ws: Workspace, role: Any) -> None:
    url = role(owner=True)
    run, doc = ws.run_json("status", url=url)
    assert run.exit_code == 0, str(run)
    privileges = checks_of(doc)["privileges"]
    assert privileges["status"] == "warning"
    assert not privileges["createdb"] and privileges["owner"]
    assert "createdb=no" in privileges["detail"]
    assert "--strategy in-place" in privileges["detail"]
    table = ws.run("status", url=url)
    assert "  ! privileges: " in table.stdout


def test_owner_with_createdb_but_no_signal_rights_gets_a_warning(ws: Workspace, role: Any) -> None:
    run, doc = ws.run_json("status", url=role("CREATEDB", owner=True))
    assert run.exit_code == 0, str(run)
    privileges = checks_of(doc)["privileges"]
    assert privileges["status"] == "warning" and not privileges["can_terminate"]
    assert "terminate backends=no" in privileges["detail"]


def test_owner_with_createdb_and_signal_rights_is_ok(ws: Workspace, role: Any) -> None:
    run, doc = ws.run_json("status", url=role("CREATEDB", owner=True, signal=True))
    assert run.exit_code == 0, str(run)
    privileges = checks_of(doc)["privileges"]
    assert privileges["status"] == "ok" and not privileges["superuser"]


def test_role_that_is_neither_owner_nor_superuser_is_refused(ws: Workspace, role: Any) -> None:
    run = ws.run("--json", "status", url=role("CREATEDB"))
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert "must own the database or be superuser" in run.error_line()
    privileges = checks_of(run.json)["privileges"] if run.json.get("checks") else None
    assert privileges is None or privileges["status"] == "fail"
    assert_no_password(run.stdout, run.stderr)


def test_unreadable_revision_table_fails_that_check_only(ws: Workspace, role: Any) -> None:
    url = role("CREATEDB", signal=True)
    ws.db.execute(f'ALTER DATABASE "{ws.db.name}" OWNER TO "{url.split("//")[1].split(":")[0]}"')
    run = ws.run("--json", "status", url=url)
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert "revision: cannot check: permission denied for table alembic_version" in (
        run.error_line()
    )
    assert "Traceback" not in run.stderr


def test_idle_in_transaction_session_is_a_warning(ws: Workspace) -> None:
    idle = ws.db.connect(autocommit=False)
    try:
        with idle.cursor() as cur:
            cur.execute("SELECT count(*) FROM customers")
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        run, doc = ws.run_json("status")
    finally:
        idle.rollback()
        idle.close()
    assert run.exit_code == 0, str(run)
    sessions = checks_of(doc)["sessions"]
    assert sessions["status"] == "warning"
    assert f"pid {pid}" in sessions["detail"] and "idle in transaction" in sessions["detail"]


def test_rollback_lock_held_is_refused(ws: Workspace) -> None:
    with rollback_lock(parse_database_url(ws.url), ws.db.name):
        run = ws.run("--json", "status")
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert "a rollback is running: pid" in run.error_line()
    assert ws.run("status").exit_code == 0  # released


def test_a_database_merely_named_like_a_kept_one_is_not_reported(ws: Workspace) -> None:
    """Kept databases are known by the record a rollback wrote, never by name (a real kept
    database is reported: see test_rollback's undo tests)."""
    lookalike = f"{ws.db.name}_pre_20200101120000"
    ws.db.server.create_database(lookalike)
    run, doc = ws.run_json("status")
    assert run.exit_code == 0, str(run)
    assert "undo" not in checks_of(doc)
    assert lookalike not in json.dumps(doc)


def test_unreachable_server_exits_3(ws: Workspace) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{unused_port()}/{ws.db.name}"
    run = ws.run("status", url=url)
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert_no_password(run.stdout, run.stderr)


def test_status_changes_nothing(ws: Workspace) -> None:
    before = ws.db.server.databases()
    assert ws.run("status").exit_code == 0
    assert ws.db.server.databases() == before
    assert ws.backups() == []


def test_malformed_alembic_config_is_reported(ws: Workspace, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ini"
    broken.write_text("this is [not an ini file\n")
    ws.alembic_ini = broken
    run = ws.run("--json", "status")
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert f"alembic: Alembic config {broken} cannot be read: File contains no section" in (
        run.error_line()
    )
    assert "Traceback" not in run.stderr
