"""Rollbacks end to end on real PostgreSQL 15 and 18 with the example Alembic project.

Each test reads like a runbook step: set the database up, break it the way a bad
deploy would, roll back, and compare schema and data with what they were.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg2
import pytest

from rollback_cli.postgres.lock import rollback_lock
from rollback_cli.settings import parse_database_url
from tests.rollback_helpers import (
    REV_CREATE,
    REV_DROP_EMAIL,
    REV_SEED,
    REV_TIER,
    Project,
    RoleDatabase,
    log_events,
    tier_project,
)
from tests.servers import TestDatabase, embedded_bin_dir


@pytest.fixture
def project(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> Project:
    """The example project upgraded to the tier revision (before the bad migration)."""
    return tier_project(database, alembic_project, tmp_path)


# --- full rollback: the deploy-gone-wrong story -------------------------------------------


def test_full_rollback_brings_back_dropped_column_data(project: Project) -> None:
    schema_before = project.schema_dump()
    data_before = project.data_fingerprint()
    backup = project.backup()

    project.upgrade(REV_DROP_EMAIL)  # the bad migration: customers.email and its data are gone
    assert project.schema_dump() != schema_before

    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup
    )
    assert result.exit_code == 0, result.stderr
    assert doc["outcome"] == "success"
    assert doc["revision_before"] == REV_DROP_EMAIL
    assert doc["revision_after"] == REV_TIER
    assert project.revision() == REV_TIER
    assert project.schema_dump() == schema_before
    assert project.data_fingerprint() == data_before
    # One safety backup, of the broken state, and the old database kept for undo.
    assert "_safety" in doc["backup_file"] and Path(doc["backup_file"]).exists()
    assert doc["kept_database"] in project.databases()
    assert doc["unavailable_ms"] < 1000
    assert not [name for name in project.databases() if "_rb_" in name]
    # The lock is held until the result is validated.
    events = [e for e in log_events(project) if e["command"] == "rollback full"]
    order = [
        e["event"] if e["event"] != "step finished" else f"{e['step']} finished" for e in events
    ]
    assert order.index("validate finished") < order.index("lock released")


def test_full_rollback_runs_schema_step_after_data(project: Project) -> None:
    backup = project.backup()  # at REV_TIER
    project.upgrade(REV_DROP_EMAIL)
    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_SEED[:6], "--backup-file", backup
    )
    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_SEED
    columns = {
        r[0]
        for r in project.db.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'"
        )
    }
    assert "email" in columns and "tier" not in columns
    assert project.db.query("SELECT count(*), count(email) FROM customers") == [(20, 20)]
    assert [step["revision"] for step in doc["reverted"]] == [REV_TIER]


def test_full_rollback_refuses_backup_older_than_target(project15: Project) -> None:
    project = project15
    project.upgrade(REV_SEED) if False else None
    backup_at_tier = project.backup()
    project.upgrade(REV_DROP_EMAIL)
    before = project.data_fingerprint()
    result = project.run(
        "rollback", "full", "--to-revision", REV_DROP_EMAIL, "--backup-file", backup_at_tier
    )
    assert result.exit_code == 7
    assert "older than" in result.stderr
    assert project.data_fingerprint() == before
    assert project.databases() == [project.db.name]


# --- data rollback ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["custom", "plain", "directory"])
def test_data_rollback_swap_restores_every_format(project15: Project, fmt: str) -> None:
    project = project15
    data_before = project.data_fingerprint()
    backup = project.backup("--format", fmt)
    project.db.execute("DELETE FROM orders WHERE id % 2 = 0; UPDATE customers SET name = 'x'")

    result = project.run("rollback", "data", "--backup-file", backup)
    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == data_before


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_data_rollback_in_place(project: Project, fmt: str) -> None:
    data_before = project.data_fingerprint()
    schema_before = project.schema_dump()
    backup = project.backup("--format", fmt)
    project.db.execute("DELETE FROM orders; UPDATE customers SET tier = 'gold'")

    result = project.run("rollback", "data", "--backup-file", backup, "--strategy", "in-place")
    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == data_before
    assert project.schema_dump() == schema_before
    assert project.databases() == [project.db.name]  # no scratch, nothing kept


def test_dry_run_changes_nothing(project: Project) -> None:
    backup = project.backup()
    project.upgrade(REV_DROP_EMAIL)
    schema_before, data_before = project.schema_dump(), project.data_fingerprint()
    databases_before, files_before = project.databases(), project.files()

    for args in (
        ["rollback", "data", "--backup-file", backup],
        ["rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup],
        ["rollback", "schema", "--to-revision", REV_SEED],
    ):
        result, doc = project.run_json("--dry-run", *args)
        assert result.exit_code == 0, result.stderr
        assert doc["outcome"] == "dry_run"
        assert doc["plan"], "a dry run prints its plan"

    assert project.schema_dump() == schema_before
    assert project.data_fingerprint() == data_before
    assert project.databases() == databases_before
    assert project.files() == files_before  # no safety backup either


def test_schema_dry_run_shows_sql_and_flags_drops(project: Project) -> None:
    project.upgrade(REV_DROP_EMAIL)
    result = project.run("--dry-run", "rollback", "schema", "--to-revision", REV_SEED)
    assert result.exit_code == 0, result.stderr
    assert "ALTER TABLE customers DROP COLUMN tier" in result.stdout
    assert "drops column customers.tier" in result.stdout
    assert "ALTER TABLE customers ADD COLUMN email" in result.stdout
    assert project.revision() == REV_DROP_EMAIL


def test_concurrent_rollback_is_refused_naming_the_holder(project15: Project) -> None:
    project = project15
    backup = project.backup()
    conninfo = parse_database_url(project.db.url)
    with rollback_lock(conninfo, project.db.name):
        result = project.run("rollback", "data", "--backup-file", backup)
    assert result.exit_code == 7
    assert "another rollback" in result.stderr and "pid" in result.stderr
    assert project.databases() == [project.db.name]


def test_production_needs_yes(project15: Project) -> None:
    project = project15
    backup = project.backup()
    result, doc = project.run_json(
        "rollback",
        "data",
        "--backup-file",
        backup,
        "--allow-cross-environment",
        environment="production",
    )
    assert result.exit_code == 7
    assert doc["outcome"] == "refused"
    assert "--yes" in doc["message"]
    assert project.databases() == [project.db.name]
    result = project.run(
        "--yes",
        "rollback",
        "data",
        "--backup-file",
        backup,
        "--allow-cross-environment",
        environment="production",
    )
    assert result.exit_code == 0, result.stderr


def test_production_refuses_skipping_the_safety_backup(project15: Project) -> None:
    project = project15
    result = project.run(
        "--yes",
        "rollback",
        "schema",
        "--to-revision",
        REV_SEED,
        "--no-safety-backup",
        environment="production",
    )
    assert result.exit_code == 7
    assert project.revision() == REV_TIER


def test_cross_environment_backup_is_refused(project15: Project) -> None:
    project = project15
    backup = project.run_json("backup", "create", environment="qa")[1]["backup_file"]
    data_before = project.data_fingerprint()
    project.db.execute("DELETE FROM orders")
    changed = project.data_fingerprint()
    result = project.run("rollback", "data", "--backup-file", backup)
    assert result.exit_code == 7
    assert "'qa'" in result.stderr
    assert project.data_fingerprint() == changed
    result = project.run("rollback", "data", "--backup-file", backup, "--allow-cross-environment")
    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == data_before


def test_corrupt_backup_is_refused_before_any_change(project15: Project) -> None:
    project = project15
    backup = Path(project.backup())
    raw = bytearray(backup.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    backup.write_bytes(bytes(raw))
    project.db.execute("DELETE FROM orders")
    before = project.data_fingerprint()
    files_before = project.files()
    result = project.run("rollback", "data", "--backup-file", str(backup))
    assert result.exit_code == 4
    assert "checksum" in result.stderr
    assert project.data_fingerprint() == before
    assert project.databases() == [project.db.name]
    assert project.files() == files_before


@pytest.mark.parametrize("strategy", ["swap", "in-place"])
def test_restore_failing_midway_leaves_live_database_intact(
    project: Project, strategy: str
) -> None:
    _restore_failing_midway(project, strategy, [])


def test_restore_failing_midway_through_psql_for_a_newer_client(project15: Project) -> None:
    """An 18 client into a 15 server goes through a filtered psql; a failure midway must
    roll its single transaction back, not commit what came before."""
    _restore_failing_midway(project15, "in-place", ["--pg-bin-dir", str(embedded_bin_dir())])


def _restore_failing_midway(project: Project, strategy: str, bin_dir: list[str]) -> None:
    # A check that reads another table: restoring a_items before z_allowed violates it.
    project.db.execute("""
        CREATE TABLE z_allowed (id int PRIMARY KEY);
        CREATE FUNCTION public.allowed(v int) RETURNS boolean LANGUAGE sql
            AS $$ SELECT exists(SELECT 1 FROM public.z_allowed WHERE id = v) $$;
        CREATE TABLE a_items (v int CHECK (public.allowed(v)));
        INSERT INTO z_allowed VALUES (1), (2);
        INSERT INTO a_items VALUES (1), (2);
    """)
    backup = project.backup()
    project.db.execute("DELETE FROM orders")
    before = project.data_fingerprint()
    result, doc = project.run_json(
        *bin_dir,
        "rollback",
        "data",
        "--backup-file",
        backup,
        "--jobs",
        "1",
        "--strategy",
        strategy,
    )
    assert result.exit_code == 5, result.stderr
    assert doc["outcome"] == "failed_unchanged"
    assert "a_items" in doc["message"] or "check constraint" in doc["message"]
    assert project.data_fingerprint() == before
    assert project.databases() == [project.db.name], "the scratch database was dropped"


def test_undo_swaps_the_previous_database_back(project15: Project) -> None:
    project = project15
    backup = project.backup()
    project.db.execute("INSERT INTO customers (name, email) VALUES ('after', 'after@x')")
    after_deploy = project.data_fingerprint()
    assert project.run("rollback", "data", "--backup-file", backup).exit_code == 0
    assert project.data_fingerprint() != after_deploy
    # What undo would swap back is listed with the backups, and by status.
    _, listed = project.run_json("backup", "list")
    [kept] = listed["kept_databases"]
    assert kept["name"].startswith(f"{project.db.name}_pre_")
    assert kept["name"] in project.run("backup", "list").stdout
    _, status = project.run_json("status")
    assert kept["name"] in json.dumps(status)

    result, _doc = project.run_json("rollback", "undo")
    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == after_deploy
    # Undo is itself reversible.
    rolled_back = project.run("rollback", "undo")
    assert rolled_back.exit_code == 0, rolled_back.stderr
    assert project.data_fingerprint() != after_deploy


def test_sessions_are_terminated_only_at_the_swap(project15: Project) -> None:
    project = project15
    backup = project.backup()
    app_session = project.db.connect()
    result = project.run("rollback", "data", "--backup-file", backup)
    assert result.exit_code == 0, result.stderr
    with pytest.raises(psycopg2.OperationalError):
        app_session.cursor().execute("SELECT 1")
    events = log_events(project)
    steps = [e.get("step") for e in events if e["event"] == "step started"]
    assert steps.index("restore") < steps.index("swap")
    swapped = next(e for e in events if e["event"] == "databases swapped")
    assert swapped["sessions_terminated"] == 1
    assert swapped["step"] == "swap"


def test_settings_and_grants_survive_the_swap(project: Project) -> None:
    db = project.db
    role = f"{db.name}_reader"
    db.server.query(f'DROP ROLE IF EXISTS "{role}"')
    db.server.query(f'CREATE ROLE "{role}" LOGIN')
    try:
        db.execute(f"ALTER DATABASE \"{db.name}\" SET work_mem = '12MB'")
        db.execute(f'ALTER ROLE "{role}" IN DATABASE "{db.name}" SET statement_timeout = \'7s\'')
        db.execute(f'REVOKE ALL ON DATABASE "{db.name}" FROM PUBLIC')
        db.execute(f'GRANT CONNECT ON DATABASE "{db.name}" TO "{role}"')
        db.execute(f'ALTER DATABASE "{db.name}" CONNECTION LIMIT 40')
        backup = project.backup()
        settings_before = db.server.query(
            "SELECT coalesce(r.rolname, ''), s.setconfig FROM pg_db_role_setting s "
            "JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE d.datname = %s ORDER BY 1",
            (db.name,),
        )
        result = project.run("rollback", "data", "--backup-file", backup)
        assert result.exit_code == 0, result.stderr
        settings_after = db.server.query(
            "SELECT coalesce(r.rolname, ''), s.setconfig FROM pg_db_role_setting s "
            "JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE d.datname = %s ORDER BY 1",
            (db.name,),
        )
        assert settings_after == settings_before
        privileges = db.server.query(
            "SELECT has_database_privilege(%s, %s, 'CONNECT'), "
            "has_database_privilege('public', %s, 'CONNECT'), datconnlimit "
            "FROM pg_database WHERE datname = %s",
            (role, db.name, db.name, db.name),
        )
        assert privileges == [(True, False, 40)]
    finally:
        db.drop_all()
        db.server.query(f'DROP ROLE IF EXISTS "{role}"')
        db.server.create_database(db.name)


# --- schema rollback -------------------------------------------------------------------------


def test_schema_rollback_with_partial_revision(project: Project) -> None:
    project.upgrade(REV_DROP_EMAIL)
    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_SEED[:5])
    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_SEED
    assert doc["revision_after"] == REV_SEED
    assert [s["revision"] for s in doc["reverted"]] == [REV_DROP_EMAIL, REV_TIER]
    assert doc["backup_file"] and Path(doc["backup_file"]).exists()


@pytest.mark.parametrize(
    ("target", "expected", "code"),
    [
        ("ffffffffffff", "unknown revision", 2),  # a typo is a usage error
        ("zz@head", "unknown revision", 2),
        (REV_DROP_EMAIL, "not an ancestor", 7),  # going forward is refused
    ],
)
def test_schema_rollback_refuses_bad_targets(
    project15: Project, target: str, expected: str, code: int
) -> None:
    project = project15
    result = project.run("rollback", "schema", "--to-revision", target)
    assert result.exit_code == code, result.stderr
    assert expected in result.stderr
    assert REV_TIER in result.stderr  # the message names the current revision
    assert project.revision() == REV_TIER


def test_schema_rollback_gives_up_on_lock_timeout(project15: Project) -> None:
    project = project15
    blocker = project.db.connect(autocommit=False)
    blocker.cursor().execute("LOCK TABLE customers IN ACCESS SHARE MODE")
    try:
        result = project.run(
            "rollback",
            "schema",
            "--to-revision",
            REV_SEED,
            "--lock-timeout",
            "500ms",
            "--no-safety-backup",
        )
    finally:
        blocker.rollback()
        blocker.close()
    assert result.exit_code == 5, result.stderr
    assert "lock_timeout" in result.stderr
    assert project.revision() == REV_TIER


# --- validate and cleanup-artifacts ---------------------------------------------------------------


def test_validate_with_checks_file(project15: Project, tmp_path: Path) -> None:
    project = project15
    checks = tmp_path / "checks.sql"
    checks.write_text(
        "-- name: customers present\nSELECT count(*) = 20 FROM customers;\n"
        "-- name: no negative orders\nSELECT bool_and(amount >= 0) FROM orders;\n"
    )
    result = project.run("validate", "--expect-revision", REV_TIER, "--checks", str(checks))
    assert result.exit_code == 0, result.stderr
    checks.write_text("SELECT count(*) = 0 FROM customers;")
    result = project.run("validate", "--checks", str(checks))
    assert result.exit_code == 5
    assert "returned false" in result.stderr


def test_cleanup_artifacts_drops_only_old_kept_databases(project15: Project) -> None:
    project = project15
    backup = project.backup()
    assert project.run("rollback", "data", "--backup-file", backup).exit_code == 0
    kept = [n for n in project.databases() if "_pre_" in n]
    assert len(kept) == 1
    project.db.execute("CREATE TABLE _alembic_tmp_customers (id int)")
    dry = project.run("--dry-run", "cleanup-artifacts", "--keep-days", "0")
    assert dry.exit_code == 0 and kept[0] in dry.stdout
    assert kept[0] in project.databases()
    assert project.run("cleanup-artifacts").exit_code == 0  # within 7 days: kept
    assert kept[0] in project.databases()
    result = project.run("cleanup-artifacts", "--keep-days", "0")
    assert result.exit_code == 0, result.stderr
    assert project.databases() == [project.db.name]
    leftovers = "SELECT 1 FROM pg_tables WHERE tablename LIKE '\\_alembic\\_tmp\\_%'"
    assert not project.db.query(leftovers)


# --- legacy command lines ---------------------------------------------------------------------


def test_legacy_rollback_command_lines(project15: Project) -> None:
    project = project15
    backup = project.backup()
    project.upgrade(REV_DROP_EMAIL)
    dry = project.run("--type", "schema", "--to-revision", REV_TIER, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert project.revision() == REV_DROP_EMAIL
    full = project.run(
        "--type",
        "full",
        "--to-revision",
        REV_TIER,
        "--backup-file",
        backup,
        "--environment",
        "staging",
    )
    assert full.exit_code == 0, full.stderr
    assert project.revision() == REV_TIER
    refused = project.run("--type", "data", "--backup-file", backup, environment="production")
    assert refused.exit_code == 7
    data = project.run(
        "--type",
        "data",
        "--backup-file",
        backup,
        "--yes",
        "--allow-cross-environment",
        environment="production",
    )
    assert data.exit_code == 0, data.stderr
    schema = project.run("--type", "schema", "--to-revision", REV_CREATE)
    assert schema.exit_code == 0, schema.stderr
    assert project.revision() == REV_CREATE


def _break_downgrade(alembic_ini: Path, revision_file: str, per_migration: bool) -> None:
    """Make one downgrade fail; optionally commit each migration on its own."""
    versions = alembic_ini.parent / "migrations" / "versions"
    path = next(versions.glob(f"{revision_file}_*.py"))
    text = path.read_text()
    text = text.replace(
        "def downgrade() -> None:\n", "def downgrade() -> None:\n    op.execute('SELECT 1/0')\n"
    )
    path.write_text(text)
    if per_migration:
        env = alembic_ini.parent / "migrations" / "env.py"
        env.write_text(
            env.read_text().replace(
                "context.configure(connection=connection, target_metadata=target_metadata)",
                "context.configure(connection=connection, target_metadata=target_metadata, "
                "transaction_per_migration=True)",
            )
        )


def test_failing_downgrade_in_one_transaction_leaves_schema_unchanged(
    project15: Project,
) -> None:
    project = project15
    project.upgrade(REV_DROP_EMAIL)
    schema = project.schema_dump()
    _break_downgrade(project.alembic_ini, REV_TIER, per_migration=False)

    # The rehearsal on a copy of the schema meets the failure before the live database.
    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_SEED)
    assert result.exit_code == 5, result.stderr
    assert "rehearsal" in doc["message"] and "live database was not touched" in doc["message"]
    assert project.revision() == REV_DROP_EMAIL
    assert project.schema_dump() == schema

    # Without the rehearsal, the live downgrade fails in its one transaction.
    result, doc = project.run_json(
        "rollback", "schema", "--to-revision", REV_SEED, "--no-rehearsal"
    )
    assert result.exit_code == 5, result.stderr
    assert "database unchanged" in doc["message"]
    assert "division by zero" in doc["message"]
    assert project.revision() == REV_DROP_EMAIL
    assert project.schema_dump() == schema


def test_downgrade_failing_after_a_committed_step_needs_manual_attention(
    project15: Project,
) -> None:
    project = project15
    project.upgrade(REV_DROP_EMAIL)
    _break_downgrade(project.alembic_ini, REV_TIER, per_migration=True)

    # The rehearsal stops it before any live change ...
    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_SEED)
    assert result.exit_code == 5, result.stderr
    assert project.revision() == REV_DROP_EMAIL

    # ... and without it, a failure after a committed step needs manual attention.
    result, doc = project.run_json(
        "rollback", "schema", "--to-revision", REV_SEED, "--no-rehearsal"
    )
    assert result.exit_code == 6, result.stderr
    # The message names where the database is now, where it was and the way back.
    assert f"now at revision {REV_TIER}" in doc["message"]
    assert f"was {REV_DROP_EMAIL}" in doc["message"]
    assert "safety backup" in doc["message"]
    assert project.revision() == REV_TIER
    events = log_events(project)
    assert events[-1]["event"] == "audit"
    assert events[-1]["exit_code"] == 6


@pytest.mark.parametrize("strategy", ["swap", "in-place"])
def test_data_rollback_as_the_usual_ci_role(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict, strategy: str
) -> None:
    """Owner of the database with CREATEDB and pg_signal_backend, not superuser."""
    server = database.server
    role = f"ci_{uuid.uuid4().hex[:8]}"
    password = "ci-Pa55:w/rd"
    server.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'")
    server.execute(f"GRANT pg_signal_backend TO {role}")
    server.execute(f"ALTER DATABASE {database.name} OWNER TO {role}")
    try:
        db = RoleDatabase(name=database.name, server=server, role=role, password=password)
        project = Project(db, alembic_project, tmp_path / "work")
        project.workdir.mkdir()
        project.upgrade(REV_TIER)  # the tables belong to the role, as in a real deployment
        before = project.data_fingerprint()
        backup = project.backup()
        project.db.execute("DELETE FROM orders")

        result, doc = project.run_json(
            "rollback", "data", "--backup-file", backup, "--strategy", strategy
        )
        assert result.exit_code == 0, result.stderr
        assert project.data_fingerprint() == before
        owners = server.query(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'",
            dbname=database.name,
        )
        assert owners == [(role,)]
        if strategy == "swap":
            assert doc["kept_database"] in project.databases()
    finally:
        database.drop_all()
        server.execute(f"DROP OWNED BY {role}")
        server.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("strategy", ["swap", "in-place"])
def test_data_rollback_on_15_with_the_newer_client(project15: Project, strategy: str) -> None:
    """Only a PostgreSQL 18 client at hand: backups and both restore strategies still work."""
    project = project15
    newer = ["--pg-bin-dir", str(embedded_bin_dir())]
    before = project.data_fingerprint()
    result, doc = project.run_json(*newer, "backup", "create")
    assert result.exit_code == 0, result.stderr
    project.db.execute("DELETE FROM orders")

    result, doc = project.run_json(
        *newer, "rollback", "data", "--backup-file", doc["backup_file"], "--strategy", strategy
    )
    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == before


def test_schema_rollback_with_a_malformed_alembic_ini_is_a_config_error(
    project15: Project,
) -> None:
    project = project15
    project.alembic_ini.write_text("this is [not an ini file\n")
    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_SEED)
    assert result.exit_code == 3, result.stderr
    assert "cannot be read" in doc["message"]
    assert project.revision() == REV_TIER
