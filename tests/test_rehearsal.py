"""The rehearsal of schema downgrades on real servers (PostgreSQL 15 and 18).

A schema or full rollback first runs the project's real downgrade, through its own env.py,
on a copy: the live schema (default), the live data too (--rehearse-with-data), or the
backup a full rollback restores. The plan shows, per reverted revision, the SQL that ran,
its time, the locks it takes and the live rows each drop destroys; a downgrade that fails
there stops the run before the live database is touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rollback_cli import api
from rollback_cli.settings import RunOptions, StorageConfig, Target
from tests.rollback_helpers import REV_DROP_EMAIL, REV_SEED, REV_TIER, Project
from tests.servers import TestDatabase
from tests.test_migration_environments import (
    columns,
    head_project,
    replace_downgrade,
    snapshot,
    write_env_py,
)

# A downgrade that works on an empty table and fails on one with rows.
NOT_NULL_WITHOUT_DEFAULT = """
    op.add_column("customers", sa.Column("email", sa.Text, nullable=False))
"""

FAILING_DOWNGRADE = """
    raise RuntimeError("the downgrade cannot run here")
"""


@pytest.fixture
def project(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Project:
    """The example project at head (customers.email dropped), on each server."""
    return head_project(database, alembic_project, tmp_path)


def rehearsal_databases(project: Project) -> list[str]:
    return [name for name in project.databases() if "_rh_" in name]


# --------------------------------------------------------------------------- schema rollbacks


def test_the_plan_shows_each_revisions_real_sql_locks_and_rows_at_risk(project: Project) -> None:
    before = snapshot(project)
    tiers = project.db.query("SELECT count(tier) FROM customers")[0][0]
    assert tiers > 0

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_SEED, "--dry-run")

    assert result.exit_code == 0, result.stderr
    reverted = {r["revision"]: r for r in doc["reverted"]}
    assert list(reverted) == [REV_DROP_EMAIL, REV_TIER]
    email = reverted[REV_DROP_EMAIL]
    assert any("ADD COLUMN email" in sql for sql in email["executed_sql"]), email
    assert "ADD COLUMN email" in email["sql"]  # the real SQL, not only the offline preview
    assert email["offline_sql"]
    assert "ACCESS EXCLUSIVE on public.customers" in email["locks"]
    assert email["rows_at_risk"] == 0
    tier = reverted[REV_TIER]
    assert [(d["table"], d["column"], d["revision"]) for d in tier["dropped"]] == [
        ("customers", "tier", REV_TIER)
    ]
    assert tier["rows_at_risk"] == tiers
    assert all(r["duration_ms"] >= 0 for r in doc["reverted"])
    assert doc["rehearsal"]["copy"] == "schema"
    assert doc["rehearsal"]["heads_after"] == [REV_SEED]
    catalog = {(c["kind"], c["name"], c["change"]) for c in doc["rehearsal"]["catalog"]}
    assert {
        ("column", "public.customers.email", "created"),
        ("constraint", "public.customers.customers_email_key", "created"),
        ("index", "public.customers_email_key", "created"),
        ("column", "public.customers.tier", "dropped"),
        ("constraint", "public.customers.customers_tier_check", "dropped"),
    } <= catalog, catalog
    lines = [s["detail"] for s in doc["plan"] if s["step"] == "rehearsed"]
    assert len(lines) == 2 and lines[0].startswith(REV_DROP_EMAIL), lines
    assert snapshot(project) == before
    assert rehearsal_databases(project) == []


def test_rehearsal_with_data_catches_a_downgrade_that_fails_on_existing_rows(
    project: Project,
) -> None:
    """NOT NULL without a default passes on an empty copy of the schema; on a copy of the
    data it fails, before the live database is touched."""
    replace_downgrade(project.alembic_ini, REV_DROP_EMAIL, NOT_NULL_WITHOUT_DEFAULT)
    before = snapshot(project)

    schema_only, doc = project.run_json(
        "rollback", "schema", "--to-revision", REV_TIER, "--dry-run"
    )
    assert schema_only.exit_code == 0, schema_only.stderr  # the schema copy has no rows

    with_data, doc = project.run_json(
        "rollback", "schema", "--to-revision", REV_TIER, "--rehearse-with-data"
    )
    assert with_data.exit_code == 5, with_data.stderr
    message = doc["message"]
    assert "rehearsal" in message and "not touched" in message, message
    assert "email" in message and "null" in message.lower(), message
    # The failing revision, the statement and the error, in one line.
    assert f"while reverting {REV_DROP_EMAIL} -> {REV_TIER}" in message, message
    assert "(statement: ALTER TABLE customers ADD COLUMN email" in message, message
    assert "\n" not in message and "Background on this error" not in message
    assert snapshot(project) == before
    assert rehearsal_databases(project) == []
    assert not list(project.backup_dir.glob("*.dump"))  # refused before the safety backup


def test_rehearsal_with_data_then_the_real_rollback(project: Project) -> None:
    result, doc = project.run_json(
        "rollback", "schema", "--to-revision", REV_TIER, "--rehearse-with-data"
    )
    assert result.exit_code == 0, result.stderr
    assert doc["rehearsal"]["copy"] == "data"
    assert project.revision() == REV_TIER
    assert "email" in columns(project)
    assert rehearsal_databases(project) == []


# --------------------------------------------------------------------------- full rollbacks


def test_full_dry_run_rehearses_on_the_backup(project: Project) -> None:
    backup = project.backup()
    before = snapshot(project)

    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup, "--dry-run"
    )

    assert result.exit_code == 0, result.stderr
    assert doc["rehearsal"]["copy"] == "backup"
    (reverted,) = doc["reverted"]
    assert reverted["revision"] == REV_DROP_EMAIL
    assert any("ADD COLUMN email" in sql for sql in reverted["executed_sql"])
    assert snapshot(project) == before
    assert rehearsal_databases(project) == []


def test_full_swap_downgrades_the_restored_copy_before_the_swap(project: Project) -> None:
    backup = project.backup()
    project.db.execute("DELETE FROM orders")  # the incident the full rollback repairs

    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup
    )

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER
    assert "email" in columns(project)
    assert project.db.query("SELECT count(*) FROM orders")[0][0] > 0
    (reverted,) = doc["reverted"]
    assert any("ADD COLUMN email" in sql for sql in reverted["executed_sql"])
    steps = [s["detail"] for s in doc["plan"] if s["step"] == "rehearsal"]
    assert steps and "before the swap" in steps[0]
    project.upgrade("head")  # the application's own upgrade works afterwards
    assert project.revision() == REV_DROP_EMAIL


def test_full_swap_whose_downgrade_fails_leaves_the_live_database_untouched(
    project: Project,
) -> None:
    backup = project.backup()
    replace_downgrade(project.alembic_ini, REV_DROP_EMAIL, FAILING_DOWNGRADE)
    before = snapshot(project)
    databases = sorted(project.databases())

    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup
    )

    assert result.exit_code == 5, result.stderr
    assert "the downgrade cannot run here" in doc["message"]
    assert "not touched" in doc["message"]
    assert snapshot(project) == before
    # The restored copy is gone; only the safety backup was added (files, not databases).
    assert sorted(project.databases()) == databases


def test_full_in_place_rehearses_first(project: Project) -> None:
    backup = project.backup()
    replace_downgrade(project.alembic_ini, REV_DROP_EMAIL, FAILING_DOWNGRADE)
    before = snapshot(project)

    result, doc = project.run_json(
        "rollback",
        "full",
        "--to-revision",
        REV_TIER,
        "--backup-file",
        backup,
        "--strategy",
        "in-place",
    )

    assert result.exit_code == 5, result.stderr
    assert "rehearsal" in doc["message"]
    assert snapshot(project) == before


# --------------------------------------------------------------------------- configurations


def test_script_location_relative_to_the_ini_directory(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packaged ini says ``script_location = migrations``: relative to the ini, not to
    where the tool runs."""
    ini = project.alembic_ini
    ini.write_text(ini.read_text().replace("%(here)s/migrations", "migrations"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    result, _doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER


def test_script_location_of_an_installed_package_without_an_ini(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``package:path`` of an importable package, no ini file at all."""
    package = tmp_path / "site" / "shopapp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copytree(project.alembic_ini.parent / "migrations", package / "migrations")
    monkeypatch.syspath_prepend(str(package.parent))
    target = Target.resolve(
        project.db.url,
        pg_bin_dir=project.db.server.bin_dir,
        alembic_config=tmp_path / "no-such.ini",
        alembic_script_location="shopapp:migrations",
    )
    storage = StorageConfig(backup_dir=project.backup_dir)

    plan = api.rollback_schema(target, storage, REV_TIER, run=RunOptions(dry_run=True))
    assert [r["revision"] for r in plan.reverted] == [REV_DROP_EMAIL]
    assert project.revision() == REV_DROP_EMAIL

    done = api.rollback_schema(target, storage, REV_TIER)
    assert done.revision_after == REV_TIER
    assert project.revision() == REV_TIER


def test_an_env_py_whose_async_driver_is_missing_is_named(project: Project) -> None:
    from tests.test_migration_environments import ASYNC_ENV_PY

    write_env_py(project.alembic_ini, ASYNC_ENV_PY.format(driver="pg8000"))
    before = snapshot(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

    assert result.exit_code == 3, result.stderr  # configuration: the driver is not installed
    assert "pg8000" in doc["message"] and "\n" not in doc["message"]
    assert snapshot(project) == before


def test_a_database_stamped_at_a_revision_the_scripts_do_not_know(project: Project) -> None:
    project.db.execute("UPDATE alembic_version SET version_num = 'f00dfeed1234'")
    before = snapshot(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

    assert result.exit_code == 7, result.stderr
    assert "f00dfeed1234" in doc["message"] and "do not know" in doc["message"]
    assert "--alembic-config" in doc["message"]
    assert snapshot(project) == before


def test_script_location_option_on_the_command_line(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "shopapp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copytree(project.alembic_ini.parent / "migrations", package / "migrations")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.chdir(tmp_path)  # no alembic.ini here
    project.alembic_ini.unlink()
    location = ("--alembic-script-location", "shopapp:migrations")

    status, doc = project.run_json(*location, "status")
    assert status.exit_code == 0, status.stderr
    assert doc["head_revision"] == REV_DROP_EMAIL

    result, doc = project.run_json(*location, "rollback", "schema", "--to-revision", REV_TIER)
    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER


# Offline, only instructions; online, the real conversion (both shapes real projects have).
PRINTS_OFFLINE = """
    from alembic import context

    if context.is_offline_mode():
        print("-- run scripts/restore_emails.sql by hand")
        return
    op.add_column("customers", sa.Column("email", sa.Text, nullable=True))
    op.execute("UPDATE customers SET email = lower(name) || '@example.com'")
"""


def test_a_downgrade_that_only_prints_offline_shows_what_it_runs_online(
    project: Project,
) -> None:
    replace_downgrade(project.alembic_ini, REV_DROP_EMAIL, PRINTS_OFFLINE)
    before = snapshot(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER, "--dry-run")

    assert result.exit_code == 0, result.stderr
    (reverted,) = doc["reverted"]
    assert not reverted["empty"]
    assert any("UPDATE customers SET email" in sql for sql in reverted["executed_sql"])
    # The locks as the server reported them, statement by statement.
    assert {"ACCESS EXCLUSIVE on public.customers", "ROW EXCLUSIVE on public.customers"} <= set(
        reverted["locks"]
    ), reverted["locks"]
    assert not any("empty" in w for w in doc["warnings"]), doc["warnings"]
    assert snapshot(project) == before


@pytest.mark.parametrize("command", ["schema", "full"])
def test_a_downgrade_that_runs_nothing_after_an_upgrade_that_did_is_irreversible(
    project: Project, command: str
) -> None:
    """The upgrade dropped customers.email; a downgrade of ``pass`` would leave it dropped."""
    args = ["--backup-file", project.backup()] if command == "full" else []
    replace_downgrade(project.alembic_ini, REV_DROP_EMAIL, "pass")
    before = snapshot(project)
    databases = sorted(project.databases())

    result, doc = project.run_json("rollback", command, "--to-revision", REV_TIER, *args)

    assert result.exit_code == 7, result.stderr
    assert "irreversible" in doc["message"] and REV_DROP_EMAIL in doc["message"]
    assert snapshot(project) == before
    assert sorted(project.databases()) == databases


def test_sigterm_while_the_restored_copy_is_downgraded_says_nothing_changed(
    project: Project, cli_env: dict[str, str]
) -> None:
    """A full rollback interrupted while its restored copy is being downgraded: exit 130,
    the message says the live database is as it was, and it is."""
    import os
    import signal
    import subprocess
    import sys
    import time

    backup = project.backup()
    replace_downgrade(
        project.alembic_ini,
        REV_DROP_EMAIL,
        'op.execute("SELECT pg_sleep(30)")\n'
        'op.add_column("customers", sa.Column("email", sa.Text))',
    )
    before = snapshot(project)
    argv = [sys.executable, "-m", "rollback_cli", *project.base_args()]
    argv += ["rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup]
    proc = subprocess.Popen(
        argv, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not any(
        "pg_sleep" in row[0]
        for row in project.db.query("SELECT query FROM pg_stat_activity WHERE state = 'active'")
    ):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert "before any change" in last and "as it was" in last, last
    assert snapshot(project) == before
