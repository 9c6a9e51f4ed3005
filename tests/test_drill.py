"""The restore drill on real PostgreSQL 15 and 18 (and SeaweedFS once): the newest backup of
this database (never another's) or a named one is verified, restored into a scratch database,
checked and dropped; stale, missing, corrupt and failing backups exit 4 and leave nothing
behind; the live database is never changed."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollback_cli.backups.drill import AGE_UNITS, max_age_text, parse_max_age
from rollback_cli.errors import ExitCode, UsageError
from tests.cli_helpers import Run, Workspace, read_manifest, seed_shop, write_manifest
from tests.fixtures_s3 import SeaweedServer
from tests.servers import TestDatabase, temporary_database

CHECKS_OK = """\
-- name: every customer has an email
SELECT count(*) = count(email) FROM customers;
-- name: orders belong to customers
SELECT NOT EXISTS (SELECT 1 FROM orders o LEFT JOIN customers c ON c.id = o.customer_id
                   WHERE c.id IS NULL);
"""
CHECKS_FAIL = """\
-- name: every customer has an email
SELECT count(*) = count(email) FROM customers;
-- name: no customer without an email
SELECT NOT EXISTS (SELECT 1 FROM customers WHERE email IS NULL);
"""
CHECKS_WRITE = """\
-- name: sneaky write
CREATE TABLE drill_was_here (id int);
"""
DOC_KEYS = {
    "command",
    "outcome",
    "exit_code",
    "run_id",
    "environment",
    "log_file",
    "message",
    "backup_file",
    "backup_sha256",
    "backup_uri",
    "revision_before",
    "revision_after",
    "plan",
    "drill",
    "checks",
}
DRILL_KEYS = {
    "backup",
    "uri",
    "selected",
    "database",
    "host",
    "type",
    "format",
    "size",
    "created_at",
    "age_seconds",
    "age",
    "max_age_seconds",
    "max_age",
    "scratch_database",
    "scratch_dropped",
    "restore_seconds",
    "total_seconds",
    "tables",
    "rows",
    "alembic_revisions",
}


@pytest.fixture
def ws(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database)
    return Workspace(database, tmp_path / "work")


@pytest.fixture
def ws15(database15: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database15)
    return Workspace(database15, tmp_path / "work")


def live_fingerprint(db: TestDatabase) -> str:
    """A checksum of every row of the live database's tables, and of its table list."""
    rows = db.query(
        "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM customers t "
        "UNION ALL SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM orders t "
        "UNION ALL SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_stat_user_tables"
    )
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def leftovers(db: TestDatabase) -> list[str]:
    """Databases other than the live one that the drill could have left on the server."""
    return [name for name in db.related_databases() if name != db.name]


def drill(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> tuple[Run, dict]:
    run = ws.run("--json", "drill", *args, env=env)
    return run, (run.json if run.stdout.strip() else {})


def write_checks(ws: Workspace, text: str) -> Path:
    ws.workdir.mkdir(parents=True, exist_ok=True)
    path = ws.workdir / "checks.sql"
    path.write_text(text)
    return path


# --- choosing the backup -------------------------------------------------------------------


def test_drill_restores_the_newest_backup_of_this_database_and_never_another(
    ws: Workspace,
) -> None:
    ws.backup()
    ws.db.execute(
        "INSERT INTO customers (name, email) SELECT 'late', 'l@x' FROM generate_series(1,7)"
    )
    newest = ws.backup()
    ws.backup("--type", "schema")  # newer, but not a full backup
    # Another database on the same server backs up into the same directory, later still.
    with temporary_database(ws.db.server) as other:
        seed_shop(other, customers=3, orders=4)
        Workspace(other, ws.workdir).backup()
        before = live_fingerprint(ws.db)

        run, doc = drill(ws)

        assert run.exit_code == 0, str(run)
        assert set(doc) == DOC_KEYS
        assert doc["command"] == "drill" and doc["outcome"] == "success"
        assert doc["backup_file"] == newest.name
        assert doc["backup_sha256"] == read_manifest(newest)["sha256"]
        assert doc["backup_uri"] == newest.resolve().as_uri()
        drilled = doc["drill"]
        assert set(drilled) == DRILL_KEYS
        assert drilled["backup"] == newest.name and drilled["selected"] == "newest"
        assert drilled["database"] == ws.db.name and drilled["type"] == "full"
        assert drilled["size"] == newest.stat().st_size
        assert (drilled["tables"], drilled["rows"]) == (2, 57 + 500)
        assert 0 <= drilled["age_seconds"] < 120 and drilled["max_age_seconds"] is None
        assert drilled["restore_seconds"] > 0 and drilled["scratch_dropped"] is True
        assert drilled["scratch_database"].startswith(ws.db.name + "_verify_")
        verdicts = {c["check"]: c["status"] for c in doc["checks"]}
        assert {"manifest", "size", "signature", "sha256", "readable"} <= set(verdicts)
        assert verdicts["manifest comparison"] == "ok"
        assert live_fingerprint(ws.db) == before
        assert leftovers(ws.db) == []
        assert leftovers(other) == []


def test_the_newest_backup_is_drilled_even_when_broken_never_an_older_one(
    ws: Workspace,
) -> None:
    ws.backup()
    newest = ws.backup()
    newest.unlink()  # its manifest stays: a backup that cannot be restored

    run, doc = drill(ws)

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert newest.name in run.error_line()
    assert doc["outcome"] == "backup_invalid"
    assert leftovers(ws.db) == []


def test_drill_of_a_named_backup(ws15: Workspace) -> None:
    older = ws15.backup()
    ws15.db.execute("DELETE FROM orders WHERE id > 100")
    ws15.backup()

    run, doc = drill(ws15, str(older))

    assert run.exit_code == 0, str(run)
    assert doc["drill"]["backup"] == older.name and doc["drill"]["selected"] == "named"
    assert doc["drill"]["rows"] == 550
    # The manifest's path names the same backup.
    run, doc = drill(ws15, f"{older}.json")
    assert run.exit_code == 0, str(run)
    assert doc["drill"]["backup"] == older.name


def test_no_backup_at_all_is_exit_4_with_one_line(ws15: Workspace) -> None:
    run, doc = drill(ws15)

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    line = run.error_line()
    assert f"no full backup of database {ws15.db.name}" in line and "nothing to drill" in line
    assert doc["outcome"] == "backup_invalid"
    assert leftovers(ws15.db) == []


def test_another_databases_backups_are_no_backup_of_this_one(ws15: Workspace) -> None:
    with temporary_database(ws15.db.server) as other:
        seed_shop(other, customers=2, orders=2)
        Workspace(other, ws15.workdir).backup()

        run, _ = drill(ws15)

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert "no full backup" in run.error_line()


def test_backups_from_another_server_of_the_same_name_are_drilled_when_unambiguous(
    ws15: Workspace,
) -> None:
    """A drill on a throwaway server: the backups were made of the same database elsewhere."""
    first, second = ws15.backup(), ws15.backup()
    for backup in (first, second):
        manifest = read_manifest(backup)
        manifest["host"] = "db-a.internal"
        write_manifest(backup, manifest)

    run, doc = drill(ws15)
    assert run.exit_code == 0, str(run)
    assert doc["drill"]["backup"] == second.name and doc["drill"]["host"] == "db-a.internal"

    manifest = read_manifest(first)
    manifest["host"] = "db-b.internal"
    write_manifest(first, manifest)
    run, _ = drill(ws15)

    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "db-a.internal, db-b.internal" in run.error_line()
    assert "name the backup to drill" in run.error_line()


def test_drill_on_a_server_without_the_live_database(ws15: Workspace) -> None:
    """The live database need not exist: the copy is made on the server all the same."""
    with temporary_database(ws15.db.server) as gone:
        seed_shop(gone, customers=4, orders=9)
        elsewhere = Workspace(gone, ws15.workdir)
        elsewhere.backup()
        ws15.db.server.drop_database(gone.name)

        run, doc = drill(elsewhere)

        assert run.exit_code == 0, str(run)
        assert (doc["drill"]["tables"], doc["drill"]["rows"]) == (2, 13)
        assert not gone.exists()
        assert gone.related_databases() == []


# --- age -----------------------------------------------------------------------------------


def test_max_age_passes_a_fresh_backup_and_fails_a_stale_one(ws15: Workspace) -> None:
    backup = ws15.backup()

    run, doc = drill(ws15, "--max-age", "1h")
    assert run.exit_code == 0, str(run)
    assert doc["drill"]["max_age_seconds"] == 3600 and doc["drill"]["max_age"] == "1h"

    time.sleep(2.2)
    run, doc = drill(ws15, "--max-age", "1s")

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    line = run.error_line()
    assert backup.name in line and "older than --max-age 1s" in line
    assert doc["outcome"] == "backup_invalid"
    assert leftovers(ws15.db) == []
    # Refused before anything was restored.
    events = ws15.last_log_events()
    assert not [e for e in events if e.get("step") == "restore"]


@pytest.mark.parametrize("bad", ["26", "1.5h", "-2d", "0h", "2 d", "26H", "1h30m", "", "xyz"])
def test_a_bad_max_age_is_a_usage_error(ws15: Workspace, bad: str) -> None:
    run = ws15.run("drill", "--max-age", bad)

    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "--max-age" in run.stderr
    assert leftovers(ws15.db) == []


@given(st.integers(min_value=1, max_value=999_999_999), st.sampled_from(sorted(AGE_UNITS)))
def test_max_age_units_round_trip(number: int, unit: str) -> None:
    seconds = parse_max_age(f"{number}{unit}")
    assert seconds == number * AGE_UNITS[unit]
    assert parse_max_age(max_age_text(seconds)) == seconds


@given(st.text(max_size=12))
def test_max_age_rejects_garbage(text: str) -> None:
    import re

    if re.fullmatch(r"[1-9][0-9]{0,8}[smhdw]", text):
        assert parse_max_age(text) > 0
        return
    with pytest.raises(UsageError, match="cannot read age"):
        parse_max_age(text)


# --- checks --------------------------------------------------------------------------------


def test_checks_pass_on_the_restored_copy(ws: Workspace) -> None:
    ws.backup()
    checks = write_checks(ws, CHECKS_OK)

    run, doc = drill(ws, "--checks", str(checks))

    assert run.exit_code == 0, str(run)
    verdicts = {c["check"]: (c["status"], c["detail"]) for c in doc["checks"]}
    assert verdicts["every customer has an email"] == ("ok", "true")
    assert verdicts["orders belong to customers"] == ("ok", "true")


def test_a_failing_check_fails_the_drill_with_exit_4(ws15: Workspace) -> None:
    ws15.db.execute("UPDATE customers SET email = NULL WHERE id = 1")
    ws15.backup()
    before = live_fingerprint(ws15.db)
    checks = write_checks(ws15, CHECKS_FAIL)

    run, doc = drill(ws15, "--checks", str(checks))

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    line = run.error_line()
    assert "every customer has an email: returned false" in line
    assert "no customer without an email: returned false" in line
    assert doc["outcome"] == "backup_invalid"
    events = [e for e in ws15.last_log_events() if e.get("event") == "drill check"]
    assert {e["check"]: e["ok"] for e in events}["every customer has an email"] is False
    assert leftovers(ws15.db) == []
    assert live_fingerprint(ws15.db) == before


def test_a_check_that_writes_fails_and_writes_nothing(ws15: Workspace) -> None:
    ws15.backup()
    checks = write_checks(ws15, CHECKS_WRITE)

    run, _ = drill(ws15, "--checks", str(checks))

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert "read-only transaction" in run.error_line()
    assert ws15.db.query("SELECT to_regclass('drill_was_here')") == [(None,)]
    assert leftovers(ws15.db) == []


def test_an_unreadable_checks_file_is_a_usage_error_before_anything_runs(
    ws15: Workspace,
) -> None:
    ws15.backup()
    empty = write_checks(ws15, "-- nothing here\n")

    run, _ = drill(ws15, "--checks", str(empty))

    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "holds no SQL" in run.error_line()
    assert not [e for e in ws15.last_log_events() if e.get("step") == "drill"]


# --- corrupt and unrestorable backups ------------------------------------------------------


def test_a_corrupt_backup_is_exit_4_and_leaves_nothing(ws: Workspace) -> None:
    backup = ws.backup()
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    backup.write_bytes(bytes(data))
    before = live_fingerprint(ws.db)

    run, doc = drill(ws)

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert "fails its checksum" in run.error_line()
    assert doc["outcome"] == "backup_invalid"
    assert leftovers(ws.db) == []
    assert live_fingerprint(ws.db) == before


def test_a_backup_that_does_not_restore_is_exit_4_and_its_scratch_is_dropped(
    ws15: Workspace,
) -> None:
    backup = ws15.backup("--format", "plain")
    text = backup.read_text()
    broken = text.replace(
        "CREATE TABLE public.orders",
        "CREATE TABLE public.orders_x (id int);\nSELECT 1/0;\nCREATE TABLE public.orders",
        1,
    )
    assert broken != text
    backup.write_text(broken)
    # Resealed, as its maker would have written it: the checksum is right, the SQL is not.
    manifest = read_manifest(backup)
    manifest["size"] = backup.stat().st_size
    manifest["sha256"] = hashlib.sha256(backup.read_bytes()).hexdigest()
    write_manifest(backup, manifest)
    before = live_fingerprint(ws15.db)

    run, _ = drill(ws15)

    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert "restore drill of" in run.error_line() and "division by zero" in run.error_line()
    events = ws15.last_log_events()
    assert any(e.get("event") == "scratch database dropped" for e in events)
    assert leftovers(ws15.db) == []
    assert live_fingerprint(ws15.db) == before


# --- dry run, output, audit, storage -------------------------------------------------------


def test_dry_run_verifies_and_plans_but_makes_no_scratch_database(ws15: Workspace) -> None:
    backup = ws15.backup()
    checks = write_checks(ws15, CHECKS_OK)

    run, doc = drill(ws15, "--dry-run", "--checks", str(checks))

    assert run.exit_code == 0, str(run)
    assert doc["outcome"] == "dry_run" and doc["backup_file"] == backup.name
    assert [s["step"] for s in doc["plan"]] == [
        "restore",
        "check every customer has an email",
        "check orders belong to customers",
        "drop",
    ]
    assert doc["drill"]["scratch_database"] is None
    assert "sha256" in {c["check"] for c in doc["checks"]}
    assert not [e for e in ws15.last_log_events() if e.get("step") == "restore"]


def test_human_summary_and_audit_record(ws15: Workspace) -> None:
    backup = ws15.backup()

    run = ws15.run("drill", "--max-age", "26h")

    assert run.exit_code == 0, str(run)
    out = run.stdout
    assert f"restore drill passed: {backup.name}" in out
    assert "(allowed 26h)" in out
    assert "2 tables, 550 rows in" in out and "(dropped)" in out
    assert "✓ manifest comparison" in out
    audit = ws15.last_log_events()[-1]
    assert audit["event"] == "audit" and audit["command"] == "drill"
    assert audit["outcome"] == "success" and audit["exit_code"] == 0
    assert audit["backup_file"] == backup.name


def test_drill_from_s3(
    ws15: Workspace, s3_env: SeaweedServer, s3_bucket: str, cli_env: dict[str, str]
) -> None:
    storage = ["--storage", f"s3://{s3_bucket}/drill"]
    run = ws15.run("--json", *storage, "backup", "create")
    assert run.exit_code == 0, str(run)
    key = run.json["backup_key"]

    run = ws15.run("--json", *storage, "drill", "--max-age", "1h")

    assert run.exit_code == 0, str(run)
    doc = run.json
    assert doc["backup_uri"] == f"s3://{s3_bucket}/drill/staging/{key}"
    assert doc["drill"]["rows"] == 550
    assert s3_env.secret_key not in run.stdout + run.stderr
    assert leftovers(ws15.db) == []
    # The downloaded copy is gone too.
    assert not [p for p in ws15.backup_dir.rglob("*") if p.is_file() and "download" in str(p)]


def test_json_document_is_one_document_on_stdout(ws15: Workspace) -> None:
    ws15.backup()
    run, doc = drill(ws15)
    assert run.exit_code == 0, str(run)
    assert json.loads(run.stdout) == doc
    assert all(c.keys() >= {"check", "name", "ok", "status", "detail"} for c in doc["checks"])


def test_help_documents_the_exit_codes_and_an_example(cli_env: dict[str, str]) -> None:
    from tests.cli_helpers import invoke

    run = invoke(["drill", "--help"])

    assert run.exit_code == 0
    assert "Exit codes of a drill:" in run.stdout
    assert "older than --max-age" in run.stdout and "fails a --checks query" in run.stdout
    assert "db-rollback drill backups/backup_production_" in run.stdout
