"""Time to recovery: a swap rollback puts the backup live first and dumps the database it
kept afterwards, under the same lock.

The kept database holds the pre-rollback state whole, so it is the first safety copy; its
dump is the safety backup of the live database (same name and environment in the
manifest), taken once the restored copy is swapped in and validated. A dump that fails
then loses nothing: the command exits 6 naming the kept database, which stays intact.
These tests pin ``--safety-backup-timing after-swap`` (``auto`` may pick during-restore on a
machine with 4 cores or more); during-restore is tested in tests/test_safety_timing.py.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from rollback_cli.cli import cli
from rollback_cli.errors import ExitCode
from tests.kill_helpers import cli_argv
from tests.rollback_helpers import Project, log_events
from tests.servers import TestDatabase


def _after_deploy(project: Project) -> dict[str, str]:
    """Change the live data after the backup; the fingerprint of the changed state."""
    project.db.execute("DELETE FROM orders WHERE id % 10 = 0")
    project.db.execute("UPDATE customers SET name = name || ' (changed)'")
    return project.data_fingerprint()


def _fingerprint_of(project: Project, dbname: str) -> dict[str, str]:
    other = TestDatabase(name=dbname, server=project.db.server)
    return Project(other, project.alembic_ini, project.workdir).data_fingerprint()


def _order(project: Project, command: str) -> list[str]:
    events = [e for e in log_events(project) if e["command"] == command]
    return [
        f"{e['step']} {e['event'].split()[1]}" if e["event"].startswith("step ") else e["event"]
        for e in events
    ]


def test_swap_rollback_is_live_and_validated_before_its_safety_backup(
    project15: Project,
) -> None:
    project = project15
    restored = project.data_fingerprint()
    backup = project.backup()
    changed = _after_deploy(project)

    result, doc = project.run_json(
        "rollback", "data", "--backup-file", backup, "--safety-backup-timing", "after-swap"
    )

    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == restored
    kept = doc["kept_database"]
    assert _fingerprint_of(project, kept) == changed
    # Time to recovery and total time, reported apart; the dump is outside the first.
    assert 0 < doc["time_to_recovery_ms"] <= doc["total_ms"]
    assert doc["safety_backup_ms"] > 0
    assert doc["time_to_recovery_ms"] + doc["safety_backup_ms"] <= doc["total_ms"]
    assert doc["safety_backup_source"] == kept
    order = _order(project, "rollback data")
    assert (
        order.index("restore finished")
        < order.index("swap finished")
        < order.index("validate finished")
        < order.index("recovered")
        < order.index("safety-backup started")
        < order.index("safety-backup finished")
        < order.index("lock released")
    )


def test_the_safety_backup_of_a_swap_is_a_restorable_backup_of_the_live_database(
    project15: Project,
) -> None:
    project = project15
    restored = project.data_fingerprint()
    backup = project.backup()
    changed = _after_deploy(project)

    result, doc = project.run_json(
        "rollback", "data", "--backup-file", backup, "--safety-backup-timing", "after-swap"
    )
    assert result.exit_code == 0, result.stderr
    kept = doc["kept_database"]
    safety = Path(doc["backup_file"])
    assert safety.name.endswith("_safety.dump") and safety.parent == project.backup_dir

    # Recorded as a backup of the live database, in this environment, of the old state.
    manifest = json.loads(Path(f"{safety}.json").read_text())
    assert manifest["database"] == project.db.name
    assert manifest["environment"] == "staging"
    assert manifest["type"] == "full"
    assert manifest["extra"] == {"dumped_from": kept}
    assert manifest["alembic_revisions"] == [project.revision()]
    assert (
        manifest["row_counts"]["public.orders"]
        == project.db.server.query("SELECT count(*) FROM orders", dbname=kept)[0][0]
    )

    listed, listing = project.run_json("backup", "list")
    assert listed.exit_code == 0, listed.stderr
    entry = next(b for b in listing["backups"] if b["name"] == safety.name)
    assert entry["valid"]

    verified, report = project.run_json("backup", "verify", str(safety), "--restore-test")
    assert verified.exit_code == 0, verified.stderr
    assert report["outcome"] == "success"

    # Undo still swaps the kept database back ...
    undone, undo_doc = project.run_json("rollback", "undo")
    assert undone.exit_code == 0, undone.stderr
    assert project.data_fingerprint() == changed
    assert undo_doc["backup_file"] is None  # undo keeps a database, takes no dump
    # ... and the safety backup restores that same state with no --allow-other-database.
    again, _ = project.run_json("rollback", "data", "--backup-file", backup)
    assert again.exit_code == 0, again.stderr
    assert project.data_fingerprint() == restored
    back, _ = project.run_json("rollback", "data", "--backup-file", str(safety))
    assert back.exit_code == 0, back.stderr
    assert project.data_fingerprint() == changed


def test_no_safety_backup_still_reports_time_to_recovery(project15: Project) -> None:
    project = project15
    backup = project.backup()
    _after_deploy(project)
    files_before = project.files()

    result, doc = project.run_json(
        "rollback", "data", "--backup-file", backup, "--no-safety-backup"
    )

    assert result.exit_code == 0, result.stderr
    assert project.files() == files_before
    assert doc["backup_file"] is None and doc["safety_backup_ms"] is None
    assert doc["kept_database"] in project.databases()
    assert 0 < doc["time_to_recovery_ms"] <= doc["total_ms"]


def _run_pausing_at(
    project: Project,
    args: list[str],
    env: dict[str, str],
    event_name: str,
    while_paused: Any,
    step: str | None = None,
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Run the CLI; when ``event_name`` is logged (in ``step``, if given), SIGSTOP it, call
    ``while_paused(event, pid)``, SIGCONT it; return its exit status, its --json document
    and its events.

    The CLI stays in the test's process group: in a session of its own, its group would be
    orphaned, and a child of it ending while it is stopped would get it a SIGHUP."""
    proc = subprocess.Popen(
        cli_argv(project, "--json", *args),
        env=env,
        cwd=str(project.workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    events: list[dict[str, Any]] = []
    try:
        while (line := lines.get(timeout=120)) is not None:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events.append(event)
            if event.get("event") == event_name and step in (None, event.get("step")):
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    while_paused(event, proc.pid)
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stdout, f"exit {returncode}, no result; last events: {events[-5:]}"
    return returncode, json.loads(stdout), events


def test_a_safety_dump_failing_after_the_swap_exits_6_and_keeps_the_old_database(
    project15: Project, cli_env: dict[str, str]
) -> None:
    """A session holding a table of the kept database makes its dump time out: the live
    database is already rolled back and validated, the kept one still holds everything."""
    project = project15
    restored = project.data_fingerprint()
    backup = project.backup()
    changed = _after_deploy(project)
    holders: list[Any] = []

    def hold_a_table(event: dict[str, Any], pid: int) -> None:
        conn = project.db.server.connect(event["kept_as"], autocommit=False)
        holders.append(conn)
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")

    try:
        returncode, doc, events = _run_pausing_at(
            project,
            [
                "rollback",
                "data",
                "--backup-file",
                backup,
                "--lock-timeout",
                "300ms",
                "--safety-backup-timing",
                "after-swap",
            ],
            cli_env,
            "databases swapped",
            hold_a_table,
        )
    finally:
        for conn in holders:
            conn.rollback()
            conn.close()

    assert returncode == 6, doc
    assert doc["exit_code"] == 6 and doc["outcome"] == "manual_attention"
    kept = next(e["kept_as"] for e in events if e.get("event") == "databases swapped")
    message = doc["message"]
    assert "rolled back and validated" in message
    assert f"kept database {kept}" in message and "orders" in message
    # The live database serves the backup; the kept one is whole, and still undoable.
    assert project.data_fingerprint() == restored
    assert kept in project.databases()
    assert _fingerprint_of(project, kept) == changed
    assert not [f for f in project.files() if "_safety" in f or ".tmp-" in f]
    assert events[-1]["event"] == "audit" and events[-1]["exit_code"] == 6
    undone, _ = project.run_json("rollback", "undo")
    assert undone.exit_code == 0, undone.stderr
    assert project.data_fingerprint() == changed


def test_a_safety_backup_that_could_not_be_stored_is_refused_before_the_swap(
    project15: Project, tmp_path: Path
) -> None:
    """The dump comes after the swap, so where it goes is checked first: nothing changes."""
    project = project15
    backup = project.backup()
    changed = _after_deploy(project)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    args = project.base_args()
    args[args.index("--backup-dir") + 1] = str(blocker / "backups")

    result = CliRunner().invoke(cli, [*args, "rollback", "data", "--backup-file", backup])

    assert result.exit_code == ExitCode.CONFIG, result.stderr
    assert "not a directory" in result.stderr
    assert project.data_fingerprint() == changed
    assert project.databases() == [project.db.name]


def test_an_interrupted_safety_backup_says_the_rollback_is_done(
    project15: Project, cli_env: dict[str, str]
) -> None:
    project = project15
    restored = project.data_fingerprint()
    backup = project.backup()
    changed = _after_deploy(project)

    returncode, doc, events = _run_pausing_at(
        project,
        ["rollback", "data", "--backup-file", backup, "--safety-backup-timing", "after-swap"],
        cli_env,
        "step started",
        lambda event, pid: os.kill(pid, signal.SIGINT),  # delivered when it continues
        step="safety-backup",
    )

    assert returncode == 130, doc
    kept = next(e["kept_as"] for e in events if e.get("event") == "databases swapped")
    assert "rolled back and validated" in doc["message"]
    assert f"kept database {kept}" in doc["message"]
    assert project.data_fingerprint() == restored
    assert _fingerprint_of(project, kept) == changed
