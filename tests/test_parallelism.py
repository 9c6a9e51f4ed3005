"""Cores, tables, connection slots and planner statistics: what the tool picks by itself.

``--jobs auto`` (the default of ``backup create`` and of the restoring rollbacks): one job
per core, no more than the tables (holding rows, for a restore), at most 8, and never more
connections than half the server's free slots. A full backup from PostgreSQL 18 carries the
planner statistics, so the copy a rollback swaps in plans well without an ANALYZE.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psycopg2.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollback_cli.backups.dump import MAX_AUTO_JOBS, auto_jobs, machine_cores
from rollback_cli.backups.scratch import parallel_row_counts
from rollback_cli.errors import ExitCode
from rollback_cli.postgres.catalog import table_row_counts, user_tables
from rollback_cli.postgres.connection import connect, lock_timeout
from rollback_cli.settings import parse_database_url
from tests.rollback_helpers import Project, log_events, tier_project
from tests.servers import TestDatabase


@pytest.fixture
def project18(
    database18: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> Project:
    return tier_project(database18, alembic_project, tmp_path)


@given(
    tables=st.integers(min_value=0, max_value=10_000),
    cores=st.integers(min_value=1, max_value=512),
)
def test_auto_jobs_is_bounded_by_cores_tables_and_the_cap(tables: int, cores: int) -> None:
    jobs = auto_jobs(tables, cores)
    assert 1 <= jobs <= MAX_AUTO_JOBS
    assert jobs <= cores
    assert jobs <= max(1, tables)
    assert jobs == max(1, min(cores, tables, MAX_AUTO_JOBS))


def _plan(project: Project, *args: str) -> dict[str, str]:
    result, doc = project.run_json(*args, "--dry-run")
    assert result.exit_code == 0, result.stderr
    return {step["step"]: step["detail"] for step in doc["plan"]}


def test_a_directory_backup_dumps_with_one_job_per_core_and_table(project15: Project) -> None:
    """Two user tables with rows (customers, orders) besides alembic_version."""
    tables = len(
        project15.db.query(
            "SELECT 1 FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
    )
    plan = _plan(project15, "backup", "create", "--format", "directory")
    expected = max(1, min(machine_cores(), tables, MAX_AUTO_JOBS))
    dump = next(detail for detail in plan.values() if "pg_dump" in detail)
    assert f"--jobs={expected}" in dump

    backup = project15.backup("--format", "directory")
    manifest = json.loads(Path(f"{backup}.json").read_text())
    assert manifest["row_counts"]["public.orders"] > 0
    # An explicit number is kept; the single-file formats dump with one job.
    explicit = _plan(project15, "backup", "create", "--format", "directory", "--jobs", "3")
    assert any("--jobs=3" in detail for detail in explicit.values())
    custom = _plan(project15, "backup", "create")
    assert not any("--jobs" in detail for detail in custom.values())


def test_a_rollback_restores_with_one_job_per_core_and_table_holding_rows(
    project15: Project,
) -> None:
    backup = project15.backup()
    manifest = json.loads(Path(f"{backup}.json").read_text())
    holding_rows = sum(1 for rows in manifest["row_counts"].values() if rows)
    expected = max(1, min(machine_cores(), holding_rows, MAX_AUTO_JOBS))

    plan = _plan(project15, "rollback", "data", "--backup-file", backup)
    assert f"-j {expected}" in plan["restore"]
    assert (
        "-j 3"
        in _plan(project15, "rollback", "data", "--backup-file", backup, "-j", "3")["restore"]
    )
    auto = _plan(project15, "rollback", "data", "--backup-file", backup, "--jobs", "auto")
    assert f"-j {expected}" in auto["restore"]

    result = project15.run("rollback", "data", "--backup-file", backup)
    assert result.exit_code == 0, result.stderr
    restoring = [e for e in log_events(project15) if e["event"] == "restoring"]
    assert restoring[-1]["jobs"] == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "2.5", "", "auto2"])
def test_jobs_takes_auto_or_a_whole_number(project15: Project, value: str) -> None:
    for command in (["backup", "create"], ["rollback", "data", "--backup-file", "x"]):
        result = project15.run(*command, "--jobs", value)
        assert result.exit_code == ExitCode.USAGE, (command, value, result.output)
        assert "auto" in result.stderr
    assert not project15.backup_dir.exists() or not list(project15.backup_dir.iterdir())


def test_directory_jobs_never_take_more_than_half_the_free_connection_slots(
    project15: Project,
) -> None:
    result = project15.run("backup", "create", "--format", "directory", "--jobs", "500")
    assert result.exit_code == 0, result.stderr
    capped = [e for e in log_events(project15) if e["event"] == "parallel dump jobs capped"]
    assert capped and capped[0]["asked"] == 500 and 1 <= capped[0]["jobs"] < 100


def _archive_list(project: Project, backup: str) -> str:
    env = {**os.environ, **project.db.conninfo_env()}
    return subprocess.run(
        [str(project.db.server.bin_dir / "pg_restore"), "--list", backup],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_a_full_backup_from_postgresql_18_carries_the_planner_statistics(
    project18: Project,
) -> None:
    project = project18
    project.db.execute("ANALYZE")
    backup = project.backup()
    assert "STATISTICS DATA public orders" in _archive_list(project, backup)
    # A schema-only backup has no data, so no statistics either.
    schema = project.backup("--type", "schema")
    assert "STATISTICS DATA" not in _archive_list(project, schema)

    project.db.execute("DELETE FROM orders WHERE id % 2 = 0")
    result = project.run("rollback", "data", "--backup-file", backup)
    assert result.exit_code == 0, result.stderr
    # The restored copy is live with the statistics of the backup: no ANALYZE ran.
    analyzed = project.db.query(
        "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables WHERE relname = 'orders'"
    )
    assert analyzed == [(None, None)]
    stats = project.db.query(
        "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = 'orders'"
    )
    assert stats[0][0] > 0
    reltuples = project.db.query("SELECT reltuples FROM pg_class WHERE relname = 'orders'")
    assert reltuples[0][0] > 0


def test_a_backup_from_postgresql_15_has_no_statistics(project15: Project) -> None:
    backup = project15.backup()
    assert "STATISTICS DATA" not in _archive_list(project15, backup)


def _many_tables(db: TestDatabase) -> None:
    """Tables of different sizes, a partitioned one, names that need quoting."""
    db.execute('CREATE SCHEMA "odd ""schema"""')
    for index in range(12):
        db.execute(
            f"CREATE TABLE t{index} AS SELECT g AS id FROM generate_series(1, {index * 1000}) g"
        )
    db.execute('CREATE TABLE "odd ""schema"""."Mixed Case" AS SELECT 1 AS x')
    db.execute("CREATE TABLE parted (id int) PARTITION BY RANGE (id)")
    db.execute("CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (500)")
    db.execute("CREATE TABLE parted_b PARTITION OF parted FOR VALUES FROM (500) TO (1000)")
    db.execute("INSERT INTO parted SELECT g FROM generate_series(0, 999) g")


def test_row_counts_on_several_connections_equal_the_counts_on_one(
    database15: TestDatabase,
) -> None:
    db = database15
    _many_tables(db)
    conninfo = parse_database_url(db.url)
    conn = connect(conninfo)
    try:
        one_by_one = table_row_counts(conn)
        side_by_side = parallel_row_counts(conninfo, db.name, conn)
        # the largest first; partitioned parents before them (their size is their parts')
        order = user_tables(conn, largest_first=True)
    finally:
        conn.close()
    assert side_by_side == one_by_one
    assert side_by_side["public.parted"] == 1000
    assert side_by_side['odd "schema".Mixed Case'] == 1
    assert side_by_side["public.t11"] == 11000
    assert order[0] == ("public", "parted") and order[1] == ("public", "t11")


def test_a_count_waiting_for_a_lock_fails_them_all_and_leaves_no_session(
    database15: TestDatabase,
) -> None:
    """A table another session holds: its count reaches the lock timeout; the counts on the
    other connections are cancelled, their connections closed."""
    db = database15
    _many_tables(db)
    holder = db.server.connect(db.name, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE t5 IN ACCESS EXCLUSIVE MODE")
        conninfo = parse_database_url(db.url)
        with lock_timeout(300):
            conn = connect(conninfo)
            try:
                started = time.monotonic()
                with pytest.raises(psycopg2.errors.LockNotAvailable):
                    parallel_row_counts(conninfo, db.name, conn)
                assert time.monotonic() - started < 5
            finally:
                conn.close()
    finally:
        holder.rollback()
        holder.close()
    left = db.server.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (db.name,),
        dbname="postgres",
    )
    assert left[0][0] == 0
