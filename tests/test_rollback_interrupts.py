"""Interrupted rollbacks: kill -9, SIGINT and SIGTERM while the restore runs.

The CLI runs as a real child process on a database big enough that the restore phase lasts
a few seconds; the signal arrives once the scratch database exists.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rollback_helpers import Project, bulk_orders_sql, tier_project
from tests.servers import TestDatabase

BULK_ROWS = 400_000


@pytest.fixture
def big_project(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> Project:
    project = tier_project(database15, alembic_project, tmp_path)
    database15.execute(bulk_orders_sql(BULK_ROWS))
    database15.execute("ANALYZE orders")
    return project


@pytest.fixture
def cli_process(big_project: Project, cli_env: dict) -> Iterator[list[subprocess.Popen[str]]]:
    """Started CLI processes, killed at teardown if a test left one running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start_rollback(project: Project, backup: str, env: dict) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "rollback_cli",
        *project.base_args(),
        "--json",
        "rollback",
        "data",
        "--backup-file",
        backup,
        "--jobs",
        "1",
    ]
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _scratch_databases(project: Project) -> list[str]:
    return [name for name in project.databases() if "_rb_" in name]


def _children(pid: int, name: str) -> list[int]:
    """Live child processes of ``pid`` called ``name`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if comm == name and int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2] == "Z"


def _freeze_restore(project: Project, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    """Wait until pg_restore is loading the scratch database, then SIGSTOP it there, so the
    signal under test lands mid-restore however fast the machine is. Its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        restores = _children(proc.pid, "pg_restore")
        if restores and _scratch_databases(project):
            os.kill(restores[0], signal.SIGSTOP)
            return restores[0]
        time.sleep(0.01)
    raise AssertionError("the restore did not start in time")


def _after_deploy(project: Project) -> dict[str, str]:
    """Change the live data after the backup so a restore would be visible."""
    project.db.execute("DELETE FROM orders WHERE id % 10 = 0")
    project.db.execute("UPDATE customers SET name = name || ' (changed)'")
    return project.data_fingerprint()


def _lock_is_free(project: Project) -> bool:
    rows = project.db.server.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    return rows[0][0] == 0


def test_kill_9_during_restore_leaves_live_database_and_cleanup_removes_leftovers(
    big_project: Project, cli_process: list[subprocess.Popen[str]], cli_env: dict
) -> None:
    project = big_project
    backup = project.backup()
    live = _after_deploy(project)
    schema = project.schema_dump()

    proc = _start_rollback(project, backup, cli_env)
    cli_process.append(proc)
    restore_pid = _freeze_restore(project, proc)
    scratch = _scratch_databases(project)[0]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    # pg_restore outlives the CLI (an orphan, stopped halfway through its load).
    assert not _gone(restore_pid)

    # The live database is exactly as it was: same data, same schema, still accepting
    # connections; the half-restored scratch database is the only trace.
    assert project.data_fingerprint() == live
    assert project.schema_dump() == schema
    assert project.db.server.query(
        "SELECT datallowconn FROM pg_database WHERE datname = %s", (project.db.name,)
    ) == [(True,)]
    assert scratch in project.databases()

    # The killed run's session is gone, so its lock is free; cleanup drops the scratch copy.
    deadline = time.monotonic() + 10
    while not _lock_is_free(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    dry, dry_doc = project.run_json("cleanup-artifacts", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert scratch in dry_doc["databases"]
    assert scratch in project.databases()

    result, doc = project.run_json("cleanup-artifacts", "--temp-older-than", "0s")
    assert result.exit_code == 0, result.stderr
    assert doc["databases"] == [scratch]
    assert project.databases() == [project.db.name]
    assert project.data_fingerprint() == live
    os.kill(restore_pid, signal.SIGKILL)
    # The run can be repeated after the cleanup and now completes.
    again, _ = project.run_json("rollback", "data", "--backup-file", backup)
    assert again.exit_code == 0, again.stderr
    assert project.data_fingerprint() != live


def test_kill_9_during_safety_backup_leaves_a_temp_file_that_cleanup_removes(
    big_project: Project, cli_process: list[subprocess.Popen[str]], cli_env: dict
) -> None:
    """The swap's safety backup is a dump of the kept database, taken once the backup is
    live and validated: a kill during it leaves the rolled-back database live and the
    previous state whole in the kept database."""
    project = big_project
    backup = project.backup()
    restored = project.data_fingerprint()
    live = _after_deploy(project)
    before = set(project.backup_dir.iterdir())

    proc = _start_rollback(project, backup, cli_env)
    cli_process.append(proc)
    deadline = time.monotonic() + 60
    partial: list[Path] = []
    while not partial and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        temps = [p for p in project.backup_dir.iterdir() if p.name.startswith(".tmp-")]
        partial = [p for p in temps if p.stat().st_size]
        time.sleep(0.02)
    assert partial, "the safety backup did not start writing in time"
    dumps = _children(proc.pid, "pg_dump")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The orphaned pg_dump finishes its file, which nobody renames or describes.
    deadline = time.monotonic() + 60
    while not all(_gone(pid) for pid in dumps) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert project.data_fingerprint() == restored
    kept = [name for name in project.databases() if "_pre_" in name]
    assert len(kept) == 1
    kept_db = TestDatabase(name=kept[0], server=project.db.server)
    assert Project(kept_db, project.alembic_ini, project.workdir).data_fingerprint() == live
    listed = project.run_json("backup", "list")[1]["backups"]
    # Nothing half-written is listed as a backup.
    assert [b["name"] for b in listed] == [Path(backup).name]

    result, doc = project.run_json("cleanup-artifacts", "--temp-older-than", "0s")
    assert result.exit_code == 0, result.stderr
    assert doc["files"]
    assert set(project.backup_dir.iterdir()) == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_restore_exits_130_and_cleans_up(
    big_project: Project,
    cli_process: list[subprocess.Popen[str]],
    cli_env: dict,
    signum: signal.Signals,
) -> None:
    project = big_project
    backup = project.backup()
    live = _after_deploy(project)

    proc = _start_rollback(project, backup, cli_env)
    cli_process.append(proc)
    restore_pid = _freeze_restore(project, proc)
    scratch = _scratch_databases(project)[0]
    os.kill(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    doc = json.loads(stdout)
    assert doc["outcome"] == "interrupted"
    assert doc["exit_code"] == 130
    assert project.data_fingerprint() == live
    assert scratch not in project.databases()
    assert _scratch_databases(project) == []
    assert _lock_is_free(project)
    # The CLI stopped its pg_restore; nothing is left writing into anything.
    assert _gone(restore_pid)
    assert not project.db.server.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_restore'"
    )
