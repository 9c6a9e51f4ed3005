"""``validate`` and ``status`` against hostile or unlucky input: a checks file that writes,
a check that never ends, a role that may not read ``alembic_version`` or a table, a client
directory holding pg_dump alone."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from psycopg2 import sql

from rollback_cli.errors import ExitCode, Refused
from rollback_cli.postgres.checks import CHECK_TIMEOUT_MS, run_read_only_check
from rollback_cli.rollback.status import preflight
from rollback_cli.rollback.validate import read_checks_file, validate_database
from rollback_cli.settings import Target, parse_database_url
from tests.cli_helpers import PASSWORD, Workspace, assert_no_password, table_counts
from tests.servers import TestDatabase

REV_TIER = "b7e2f5a91c38"


@pytest.fixture
def ws(
    database: TestDatabase, tmp_path: Path, alembic_project: Path, cli_env: dict[str, str]
) -> Workspace:
    """The example project migrated to REV_TIER: customers and orders with rows."""
    config = Config(str(alembic_project))
    config.attributes["configure_logger"] = False
    url = database.url.replace("postgresql://", "postgresql+psycopg2://", 1)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, REV_TIER)
    return Workspace(database, tmp_path / "work", alembic_ini=alembic_project)


def snapshot(ws: Workspace) -> dict[str, Any]:
    """Everything a write could change: databases, tables, columns and row counts."""
    return {
        "databases": ws.db.server.databases(),
        "tables": table_counts(ws.db),
        "columns": ws.db.query(
            "SELECT table_schema, table_name, column_name, data_type "
            "FROM information_schema.columns "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3"
        ),
        "relations": ws.db.query(
            "SELECT c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' ORDER BY 1"
        ),
    }


def idle_in_transaction(ws: Workspace) -> list[tuple[Any, ...]]:
    return ws.db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
        "AND state LIKE 'idle in transaction%%'",
        (ws.db.name,),
    )


# --- a checks file that writes ---------------------------------------------------------------

# (name, checks file, the error the real run reports)
WRITES = [
    (
        "create",
        "-- name: create a table\nCREATE TABLE evil (id int);\n",
        "create a table: query failed: cannot execute CREATE TABLE in a read-only transaction",
    ),
    (
        "create-as",
        "-- name: create as\nCREATE TABLE evil AS SELECT true AS ok;\n",
        "create as: query failed: cannot execute CREATE TABLE AS in a read-only transaction",
    ),
    (
        "insert",
        "-- name: insert\nINSERT INTO customers (name) VALUES ('mallory') RETURNING true;\n",
        "insert: query failed: cannot execute INSERT in a read-only transaction",
    ),
    (
        "update",
        "-- name: update\nUPDATE orders SET amount = 0 RETURNING true;\n",
        "update: query failed: cannot execute UPDATE in a read-only transaction",
    ),
    (
        # A data-modifying CTE is refused as the SELECT it is part of.
        "delete-in-cte",
        "-- name: delete in cte\nWITH d AS (DELETE FROM orders RETURNING 1) "
        "SELECT count(*) > 0 FROM d;\n",
        "delete in cte: query failed: cannot execute SELECT in a read-only transaction",
    ),
    (
        "drop",
        "-- name: drop orders\nDROP TABLE orders;\n",
        "drop orders: query failed: cannot execute DROP TABLE in a read-only transaction",
    ),
    (
        # The file is split at ';': COMMIT is a check of its own and cannot end the
        # read-only transaction of the next one.
        "commit-then-create",
        "-- name: commit\nCOMMIT;\n-- name: create after commit\nCREATE TABLE evil (id int);\n",
        "create after commit: query failed: cannot execute CREATE TABLE in a read-only transaction",
    ),
    (
        "read-write-then-drop",
        "-- name: read write\nSET TRANSACTION READ WRITE;\n"
        "-- name: session read write\n"
        "SELECT set_config('default_transaction_read_only', 'off', false) = 'off';\n"
        "-- name: drop after\nDROP TABLE customers CASCADE;\n",
        "drop after: query failed: cannot execute DROP TABLE in a read-only transaction",
    ),
    (
        "sequence",
        "-- name: nextval\nSELECT nextval('customers_id_seq') > 0;\n",
        "nextval: query failed: cannot execute nextval() in a read-only transaction",
    ),
]


@pytest.mark.parametrize(
    ("checks_sql", "error"), [w[1:] for w in WRITES], ids=[w[0] for w in WRITES]
)
def test_writing_check_fails_read_only_and_changes_nothing(
    ws: Workspace, tmp_path: Path, checks_sql: str, error: str
) -> None:
    checks = tmp_path / "checks.sql"
    checks.write_text(checks_sql)
    before = snapshot(ws)
    run = ws.run("validate", "--checks", str(checks))
    assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
    assert error in run.error_line()
    assert "Traceback" not in run.stderr
    assert snapshot(ws) == before
    assert idle_in_transaction(ws) == []
    assert_no_password(run.stdout, run.stderr)


@pytest.mark.parametrize("checks_sql", [w[1] for w in WRITES], ids=[w[0] for w in WRITES])
def test_dry_run_plans_writing_checks_without_running_them(
    ws: Workspace, tmp_path: Path, checks_sql: str
) -> None:
    checks = tmp_path / "checks.sql"
    checks.write_text(checks_sql)
    before = snapshot(ws)
    run, doc = ws.run_json("validate", "--dry-run", "--checks", str(checks))
    assert run.exit_code == 0, str(run)
    assert doc["outcome"] == "dry_run"
    planned = [c for c in doc["validation"] if c.get("planned")]
    assert [(c["name"], c["sql"]) for c in planned] == read_checks_file(checks)
    for check in planned:
        assert check["status"] == "info" and check["ok"]
        assert check["detail"].startswith("planned, not run (dry run): ")
    assert [p["step"] for p in doc["plan"]] == [f"check {c['name']}" for c in planned]
    assert {c["name"] for c in doc["validation"]} - {c["name"] for c in planned} == {"connectivity"}
    assert snapshot(ws) == before

    text = ws.run("validate", "--checks", str(checks), "--dry-run")
    assert text.exit_code == 0, str(text)
    assert "queries were not run" in text.stdout
    assert text.stdout.count("planned, not run") == len(planned)
    assert snapshot(ws) == before


def test_dry_run_still_parses_the_checks_file(ws: Workspace, tmp_path: Path) -> None:
    empty = tmp_path / "empty.sql"
    empty.write_text("-- name: nothing here\n;\n")
    run = ws.run("--dry-run", "validate", "--checks", str(empty))
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "holds no SQL" in run.error_line()
    run = ws.run("--dry-run", "validate", "--checks", str(tmp_path / "missing.sql"))
    assert run.exit_code == ExitCode.USAGE, str(run)


def test_checks_after_a_failed_one_still_run(ws: Workspace, tmp_path: Path) -> None:
    """Each check has its own transaction: an error does not poison the next one."""
    checks = tmp_path / "checks.sql"
    checks.write_text(
        "-- name: write\nINSERT INTO customers (name) VALUES ('x') RETURNING true;\n"
        "-- name: broken\nSELECT 1/0 = 1;\n"
        "-- name: customers present\nSELECT count(*) > 0 FROM customers;\n"
        "-- name: not boolean\nSELECT 1;\n"
    )
    before = snapshot(ws)
    report = validate_database(parse_database_url(ws.url), checks_file=checks)
    verdicts = {c.name: (c.status, c.detail) for c in report.checks}
    assert verdicts["write"] == (
        "fail",
        "query failed: cannot execute INSERT in a read-only transaction",
    )
    assert verdicts["broken"] == ("fail", "query failed: division by zero")
    assert verdicts["customers present"] == ("ok", "true")
    assert verdicts["not boolean"][0] == "fail"
    assert snapshot(ws) == before


def test_runner_refuses_several_statements_and_restores_the_connection(ws: Workspace) -> None:
    before = snapshot(ws)
    conn = ws.db.connect(autocommit=True)
    try:
        ok, detail = run_read_only_check(conn, "COMMIT; CREATE TABLE evil (id int)")
        assert not ok and "one statement" in detail
        ok, detail = run_read_only_check(conn, "SELECT true;")
        assert ok and detail == "true"
        ok, detail = run_read_only_check(conn, "CREATE TABLE evil (id int)")
        assert (ok, detail) == (
            False,
            "query failed: cannot execute CREATE TABLE in a read-only transaction",
        )
        assert conn.autocommit is True
        with conn.cursor() as cur:  # back in autocommit mode, session defaults untouched
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "0"
            cur.execute("SHOW transaction_read_only")
            assert cur.fetchone()[0] == "off"
    finally:
        conn.close()
    assert snapshot(ws) == before


# --- a check that never ends -----------------------------------------------------------------


def test_slow_check_is_cancelled_by_its_statement_timeout(ws: Workspace, tmp_path: Path) -> None:
    checks = tmp_path / "checks.sql"
    checks.write_text("-- name: slow\nSELECT pg_sleep(60) IS NULL;\n-- name: after\nSELECT true;\n")
    started = time.monotonic()
    report = validate_database(
        parse_database_url(ws.url), checks_file=checks, check_timeout_ms=1000
    )
    elapsed = time.monotonic() - started
    verdicts = {c.name: (c.status, c.detail) for c in report.checks}
    assert verdicts["slow"] == (
        "fail",
        "query failed: canceling statement due to statement timeout",
    )
    assert verdicts["after"] == ("ok", "true")
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_slow_check_fails_within_the_default_timeout_from_the_cli(
    database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    ws = Workspace(database18, tmp_path / "work")
    checks = tmp_path / "checks.sql"
    checks.write_text("-- name: slow\nSELECT pg_sleep(60) IS NULL;\n")
    started = time.monotonic()
    run = ws.run("validate", "--checks", str(checks))
    elapsed = time.monotonic() - started
    assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
    assert "slow: query failed: canceling statement due to statement timeout" in run.error_line()
    assert elapsed < CHECK_TIMEOUT_MS / 1000 + 15, f"took {elapsed:.1f}s"


# --- a role that may not read alembic_version ------------------------------------------------


def as_superuser(ws: Workspace, *statements: sql.Composed) -> None:
    conn = ws.db.connect()
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture
def reader(ws: Workspace) -> Iterator[tuple[str, str]]:
    """A login role with SELECT on customers and orders, not on alembic_version: (name, URL).
    Dropped afterwards."""
    name = f"ro_{ws.db.name}"
    role = sql.Identifier(name)
    as_superuser(
        ws,
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(PASSWORD)),
        sql.SQL("GRANT SELECT ON customers, orders TO {}").format(role),
        sql.SQL("REVOKE ALL ON alembic_version FROM PUBLIC, {}").format(role),
    )
    try:
        yield name, ws.url.replace("postgresql://postgres:", f"postgresql://{name}:", 1)
    finally:
        as_superuser(
            ws, sql.SQL("DROP OWNED BY {}").format(role), sql.SQL("DROP ROLE {}").format(role)
        )


def test_validate_without_select_on_alembic_version_exits_3(
    ws: Workspace, reader: tuple[str, str]
) -> None:
    name, url = reader
    run = ws.run("validate", "--expect-revision", REV_TIER, url=url)
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert run.plain_stderr() == [
        "db-rollback: error: cannot read alembic_version: permission denied for table "
        f"alembic_version (grant SELECT on it to {name})"
    ]
    assert "unexpected error" not in run.stderr and "Traceback" not in run.stderr
    assert_no_password(run.stdout, run.stderr)


def test_validate_without_an_expected_revision_does_not_read_alembic_version(
    ws: Workspace, reader: tuple[str, str], tmp_path: Path
) -> None:
    checks = tmp_path / "checks.sql"
    checks.write_text("SELECT count(*) > 0 FROM customers;")
    run = ws.run("validate", "--checks", str(checks), url=reader[1])
    assert run.exit_code == 0, str(run)


def test_validate_without_select_on_a_counted_table_exits_3(
    ws: Workspace, reader: tuple[str, str]
) -> None:
    name, url = reader
    backup = ws.backup()
    role = sql.Identifier(name)
    as_superuser(
        ws,
        sql.SQL("GRANT SELECT ON alembic_version TO {}").format(role),
        sql.SQL("REVOKE SELECT ON orders FROM {}").format(role),
    )
    run = ws.run("validate", "--backup-file", str(backup), url=url)
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert run.plain_stderr() == [
        "db-rollback: error: cannot count rows: permission denied for table orders "
        f"(grant SELECT on it to {name})"
    ]


def test_status_without_select_on_alembic_version_fails_the_revision_check(
    ws: Workspace, reader: tuple[str, str]
) -> None:
    name, url = reader
    run = ws.run("--json", "status", url=url)
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert (
        "revision: cannot check: permission denied for table alembic_version "
        f"(grant SELECT on it to {name})"
    ) in run.error_line()
    assert "unexpected error" not in run.stderr and "Traceback" not in run.stderr

    assert ws.alembic_ini is not None
    target = Target.resolve(
        url, environment="staging", pg_bin_dir=ws.db.server.bin_dir, alembic_config=ws.alembic_ini
    )
    with pytest.raises(Refused) as raised:
        preflight(target)
    checks = {c.name: c for c in raised.value.report.checks}  # type: ignore[attr-defined]
    assert checks["revision"].status == "fail"
    assert checks["revision"].detail == (
        f"cannot check: permission denied for table alembic_version (grant SELECT on it to {name})"
    )
    # The other checks still ran.
    assert checks["connection"].status == "ok" and checks["lock"].status == "ok"
    assert checks["client"].status == "ok"


# --- a client directory holding pg_dump alone ------------------------------------------------


def test_status_with_pg_dump_alone_names_the_missing_tools(ws: Workspace, tmp_path: Path) -> None:
    lonely = tmp_path / "bin"
    lonely.mkdir()
    (lonely / "pg_dump").symlink_to(ws.db.server.bin_dir / "pg_dump")
    ws.pg_bin_dir = lonely
    run = ws.run("status")
    assert run.exit_code == ExitCode.REFUSED, str(run)
    line = run.error_line()
    major = ws.db.server.major
    assert f"client: pg_restore, psql missing or not executable in {lonely}" in line
    assert f"install postgresql-client-{major}" in line
    assert "Traceback" not in run.stderr


def test_status_with_a_non_executable_pg_restore_fails(ws: Workspace, tmp_path: Path) -> None:
    partial = tmp_path / "bin"
    partial.mkdir()
    for tool in ("pg_dump", "psql"):
        (partial / tool).symlink_to(ws.db.server.bin_dir / tool)
    (partial / "pg_restore").write_bytes((ws.db.server.bin_dir / "pg_restore").read_bytes())
    os.chmod(partial / "pg_restore", 0o644)
    ws.pg_bin_dir = partial
    run = ws.run("status")
    assert run.exit_code == ExitCode.REFUSED, str(run)
    line = run.error_line()
    assert f"client: pg_restore missing or not executable in {partial}" in line
    assert "psql missing" not in line and "pg_restore, psql" not in line

    (partial / "psql").unlink()
    (partial / "psql").symlink_to(partial / "nowhere")  # dangling: not there
    (partial / "pg_restore").unlink()
    (partial / "pg_restore").symlink_to(ws.db.server.bin_dir / "pg_restore")
    run = ws.run("status")
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert f"client: psql missing or not executable in {partial}" in run.error_line()


def test_status_with_the_complete_client_directory_is_ok(ws: Workspace) -> None:
    run, doc = ws.run_json("status")
    assert run.exit_code == 0, str(run)
    client = {c["name"]: c for c in doc["checks"]}["client"]
    assert client["status"] == "ok" and "pg_restore, psql" in client["detail"]
