"""When a swap rollback takes its safety backup (``--safety-backup-timing``).

after-swap dumps the kept database once the restored copy is live (tests/test_recovery.py);
during-restore dumps the live database in a thread while the backup is restored into the
scratch copy, and stores it before the swap: a dump that fails then changes nothing (exit 5,
the scratch copy dropped), and an interrupt of the restore cancels the dump, leaving no
partial file and no server session. auto picks during-restore only for a server on this
machine with enough cores.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollback_cli.backups.dump import DumpCancel, RowCounter, counting_workers, machine_cores
from rollback_cli.errors import ExitCode
from rollback_cli.rollback.lifecycle import (
    DURING_RESTORE_MIN_CORES,
    SAFETY_TIMINGS,
    RollbackOptions,
    safety_timing,
)
from rollback_cli.settings import ConnInfo
from tests.rollback_helpers import REV_DROP_EMAIL, REV_TIER, Project
from tests.test_recovery import _after_deploy, _fingerprint_of, _order, _run_pausing_at

DURING = ("--safety-backup-timing", "during-restore")
APP_PREFIX = "db-rollback"


def _leftovers(project: Project) -> list[str]:
    """Safety backups and partial files in the project's directories."""
    return [f for f in project.files() if "_safety" in f or ".tmp-" in f]


def _database_comment(project: Project) -> str | None:
    rows = project.db.server.query(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (project.db.name,),
    )
    comment: str | None = rows[0][0]
    return comment


def _run_sessions(project: Project, run_id: str) -> list[tuple[Any, ...]]:
    """Server sessions of the run ``run_id`` (its own, pg_dump's, pg_restore's: all carry
    ``db-rollback <run id>`` as their application_name)."""
    return project.db.server.query(
        "SELECT pid, datname, application_name, state, wait_event_type FROM pg_stat_activity "
        "WHERE starts_with(application_name, %s)",
        (f"{APP_PREFIX} {run_id}",),
    )


def _wait_for(probe: Callable[[], list[Any]], *, want: bool, seconds: float) -> list[Any]:
    """Poll ``probe`` until it returns something (``want``) or nothing; its last value."""
    deadline = time.monotonic() + seconds
    while True:
        found = probe()
        if bool(found) == want or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# --- during-restore on a real server ------------------------------------------------------


def test_a_safety_backup_during_the_restore_is_stored_before_the_swap(
    project15: Project,
) -> None:
    """The live database is dumped beside the restore, stored before the swap: recorded as
    a backup of the live database itself (not dumped from the kept one), of its state when
    the rollback started; the swap, validation and undo work as after-swap."""
    project = project15
    restored = project.data_fingerprint()
    backup = project.backup()
    changed = _after_deploy(project)

    result, doc = project.run_json("rollback", "data", "--backup-file", backup, *DURING)

    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == restored
    kept = doc["kept_database"]
    assert kept in project.databases()
    assert _fingerprint_of(project, kept) == changed
    # The live database was dumped, not the kept one.
    assert doc["safety_backup_source"] is None
    assert doc["safety_backup_ms"] > 0
    assert 0 < doc["time_to_recovery_ms"] <= doc["total_ms"]
    safety = Path(doc["backup_file"])
    assert safety.is_file() and safety.parent == project.backup_dir
    assert safety.name.endswith("_safety.dump")
    # One safety backup: the lifecycle does not take a deferred one as well.
    assert [f for f in project.files() if "_safety" in f] == sorted(
        [f"backups/{safety.name}", f"backups/{safety.name}.json"]
    )

    manifest = json.loads(Path(f"{safety}.json").read_text())
    assert manifest["database"] == project.db.name
    assert manifest["environment"] == "staging"
    assert manifest["type"] == "full"
    assert "dumped_from" not in manifest["extra"]
    # Nothing wrote meanwhile: the kept database holds the state that was dumped.
    assert manifest["row_counts"], manifest
    for table, count in manifest["row_counts"].items():
        in_kept = project.db.server.query(f"SELECT count(*) FROM {table}", dbname=kept)[0][0]
        assert count == in_kept, table
    assert (
        manifest["row_counts"]["public.orders"]
        < json.loads(Path(f"{backup}.json").read_text())["row_counts"]["public.orders"]
    )  # the changed state, not the backup's

    order = _order(project, "rollback data")
    assert order.index("safety-backup started") < order.index("swap started")
    assert order.index("safety-backup finished") < order.index("swap started")
    assert order.index("swap finished") < order.index("recovered")
    assert "safety-backup" not in " ".join(order[order.index("recovered") :])

    verified, report = project.run_json("backup", "verify", str(safety), "--restore-test")
    assert verified.exit_code == 0, verified.stderr
    assert report["outcome"] == "success"

    undone, _ = project.run_json("rollback", "undo")
    assert undone.exit_code == 0, undone.stderr
    assert project.data_fingerprint() == changed


@pytest.mark.parametrize("timing", SAFETY_TIMINGS)
def test_the_dry_run_says_when_the_safety_backup_is_taken(project15: Project, timing: str) -> None:
    """The plan's safety-backup step says when: during the restore (before the swap), or
    after the swap (after validation); auto shows what this machine picks. Nothing changes."""
    project = project15
    backup = project.backup()
    changed = _after_deploy(project)
    files_before = project.files()
    picked = (
        timing
        if timing != "auto"
        else safety_timing(RollbackOptions(), ConnInfo("x", host="127.0.0.1"), machine_cores())
    )

    result, doc = project.run_json(
        "--dry-run",
        "rollback",
        "data",
        "--backup-file",
        backup,
        "--safety-backup-timing",
        timing,
    )

    assert result.exit_code == 0, result.stderr
    assert doc["outcome"] == "dry_run"
    steps = [s["step"] for s in doc["plan"]]
    safety = [s["detail"] for s in doc["plan"] if s["step"] == "safety-backup"]
    assert len(safety) == 1, doc["plan"]
    if picked == "during-restore":
        assert "during the restore" in safety[0]
        assert steps.index("safety-backup") < steps.index("restore") < steps.index("swap")
    else:
        assert "after the swap" in safety[0]
        assert steps.index("swap") < steps.index("validate") < steps.index("safety-backup")
    assert project.files() == files_before
    assert project.databases() == [project.db.name]
    assert project.data_fingerprint() == changed


def test_a_safety_dump_failing_during_the_restore_changes_nothing(
    project15: Project,
) -> None:
    """A session holding a table of the live database makes the dump beside the restore
    time out: the command fails before the swap (exit 5, the database unchanged), the
    restored scratch copy is dropped and no file is left."""
    project = project15
    db = project.db.name
    backup = project.backup()
    changed = _after_deploy(project)
    comment = _database_comment(project)
    files_before = project.files()

    holder = project.db.server.connect(db, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        result, doc = project.run_json(
            "rollback", "data", "--backup-file", backup, "--lock-timeout", "300ms", *DURING
        )
    finally:
        holder.rollback()
        holder.close()

    assert result.exit_code == ExitCode.FAILED_UNCHANGED, result.stderr
    assert doc["exit_code"] == ExitCode.FAILED_UNCHANGED
    assert doc["outcome"] == "failed_unchanged"
    message = doc["message"]
    assert f"the safety backup of {db} failed before the swap" in message
    assert "orders" in message
    assert f"{db} is unchanged" in message
    assert project.data_fingerprint() == changed
    assert project.databases() == [db]  # the scratch copy is dropped
    assert _database_comment(project) == comment  # the run's busy record is gone
    assert project.files() == files_before
    assert not _leftovers(project)
    order = _order(project, "rollback data")
    assert "restore finished" in order  # the restore itself went through ...
    assert "swap started" not in order  # ... and nothing was swapped


def test_an_interrupted_restore_cancels_the_safety_dump_beside_it(
    project15: Project, cli_env: dict[str, str]
) -> None:
    """SIGINT while pg_restore runs, with the dump beside it provably in flight (waiting
    for a table lock another session holds): exit 130, the live database unchanged, no
    scratch copy, no partial file, no session of the run left on the server."""
    project = project15
    db = project.db.name
    backup = project.backup()
    changed = _after_deploy(project)
    comment = _database_comment(project)
    files_before = project.files()
    dumping: list[list[Any]] = []

    def waiting_dump() -> list[Any]:
        # pg_dump (or the row count of its snapshot) of this run, queued behind the lock.
        return project.db.server.query(
            "SELECT pid, application_name, backend_type FROM pg_stat_activity "
            "WHERE datname = %s AND starts_with(application_name, %s) "
            "AND wait_event_type = 'Lock'",
            (db, f"{APP_PREFIX} "),
        )

    def interrupt_with_the_dump_in_flight(event: dict[str, Any], pid: int) -> None:
        # pg_dump runs on while the CLI is stopped; if the CLI was stopped before it
        # started pg_dump, let it go on until it has (the dump cannot finish: the lock is
        # held, and the swap waits for the dump).
        found = _wait_for(waiting_dump, want=True, seconds=3)
        if not found:
            os.kill(pid, signal.SIGCONT)
            found = _wait_for(waiting_dump, want=True, seconds=30)
            os.kill(pid, signal.SIGSTOP)
        dumping.append(found)
        os.kill(pid, signal.SIGINT)  # delivered when it continues

    holder = project.db.server.connect(db, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        returncode, doc, events = _run_pausing_at(
            project,
            ["rollback", "data", "--backup-file", backup, "--lock-timeout", "2min", *DURING],
            cli_env,
            "restoring",
            interrupt_with_the_dump_in_flight,
            step="restore",
        )
    finally:
        holder.rollback()
        holder.close()

    assert dumping and dumping[0], "the safety dump never waited for the lock"
    assert returncode == ExitCode.INTERRUPTED, doc
    assert doc["exit_code"] == ExitCode.INTERRUPTED and doc["outcome"] == "interrupted"
    assert "before any change" in doc["message"]
    assert not [e for e in events if e.get("step") == "swap"]
    run_id = events[0]["run_id"]
    left = _wait_for(lambda: _run_sessions(project, run_id), want=False, seconds=10)
    assert not left, f"sessions of the run left on the server: {left}"
    assert project.data_fingerprint() == changed
    assert project.databases() == [db]
    assert _database_comment(project) == comment
    assert project.files() == files_before
    assert not _leftovers(project)


# --- safety_timing, same_machine, counting_workers: no server -----------------------------


@pytest.mark.parametrize("timing", ["after-swap", "during-restore"])
@pytest.mark.parametrize("host", [None, "127.0.0.1", "db.example.com"])
@pytest.mark.parametrize("cores", [1, 2, 4, 64])
def test_an_explicit_timing_is_kept_whatever_the_machine(
    timing: str, host: str | None, cores: int
) -> None:
    options = RollbackOptions(safety_timing=timing)
    assert safety_timing(options, ConnInfo("app", host=host), cores) == timing


@pytest.mark.parametrize(
    ("host", "cores", "expected"),
    [
        (None, 2, "after-swap"),
        (None, 3, "after-swap"),
        (None, 4, "during-restore"),
        (None, 8, "during-restore"),
        ("localhost", 4, "during-restore"),
        ("/var/run/postgresql", 8, "during-restore"),
        ("127.0.0.1", 3, "after-swap"),
        ("db.example.com", 2, "after-swap"),
        ("db.example.com", 3, "after-swap"),
        ("db.example.com", 4, "after-swap"),
        ("10.0.0.5", 8, "after-swap"),
    ],
)
def test_auto_dumps_during_the_restore_only_beside_a_local_server_with_4_cores(
    host: str | None, cores: int, expected: str
) -> None:
    assert DURING_RESTORE_MIN_CORES == 4
    assert safety_timing(RollbackOptions(), ConnInfo("app", host=host), cores) == expected


remote_hosts = st.one_of(
    st.ip_addresses().filter(lambda a: not a.is_loopback).map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}\.(example\.com|internal|amazonaws\.com)", fullmatch=True),
)


@given(host=remote_hosts, cores=st.integers(min_value=1, max_value=1024))
def test_auto_never_dumps_during_the_restore_of_a_remote_server(host: str, cores: int) -> None:
    """A remote server's cores are unknown: time to recovery comes first."""
    conninfo = ConnInfo("app", host=host)
    assert not conninfo.same_machine
    assert safety_timing(RollbackOptions(), conninfo, cores) == "after-swap"


@given(
    host=st.one_of(
        st.none(),
        st.just("localhost"),
        st.ip_addresses(network="127.0.0.0/8").map(str),
        st.just("::1"),
    ),
    cores=st.integers(min_value=1, max_value=1024),
)
def test_auto_beside_a_local_server_follows_the_cores(host: str | None, cores: int) -> None:
    expected = "during-restore" if cores >= DURING_RESTORE_MIN_CORES else "after-swap"
    assert safety_timing(RollbackOptions(), ConnInfo("app", host=host), cores) == expected


@pytest.mark.parametrize(
    ("host", "same"),
    [
        (None, True),
        ("", True),
        ("/var/run/postgresql", True),
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("db.example.com", False),
        ("10.0.0.5", False),
        ("host1,host2", False),  # libpq's multi-host list: which one answers is unknown
    ],
)
def test_same_machine(host: str | None, same: bool) -> None:
    assert ConnInfo("app", host=host).same_machine is same


@given(st.ip_addresses())
def test_same_machine_for_an_address_is_whether_it_is_a_loopback(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert ConnInfo("app", host=str(address)).same_machine is address.is_loopback


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 1), (8, 6)])
def test_counting_workers(cores: int, workers: int) -> None:
    assert counting_workers(cores) == workers


@given(st.integers(min_value=1, max_value=4096))
def test_counting_workers_leave_two_cores_to_pg_dump_and_its_session(cores: int) -> None:
    assert counting_workers(cores) == max(0, cores - 2)


# --- DumpCancel ----------------------------------------------------------------------------


class _Counter:
    """Stands in for a RowCounter: records that it was stopped."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


@contextmanager
def _sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for pg_dump; killed at the end if still running."""
    process = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def _ends_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_dump_cancelled_before_it_started_is_stopped_when_it_starts() -> None:
    """cancel() before attach(): the process attached later is stopped at once, its row
    count too (the dump thread may start pg_dump after the restore failed)."""
    cancel = DumpCancel()
    cancel.cancel()
    assert cancel.cancelled
    counter = _Counter()
    with _sleeper() as process:
        started = time.monotonic()
        cancel.attach(process, cast(RowCounter, counter))
        assert _ends_within(process, 5)
        assert time.monotonic() - started < 5
        assert process.returncode == -signal.SIGTERM
        assert counter.stopped


def test_a_running_dump_is_stopped_by_cancel() -> None:
    """attach() alone leaves the process running; cancel() from another thread ends it."""
    cancel = DumpCancel()
    counter = _Counter()
    with _sleeper() as process:
        cancel.attach(process, cast(RowCounter, counter))
        assert not _ends_within(process, 0.3)
        assert not counter.stopped
        cancel.cancel()
        assert _ends_within(process, 5)
        assert counter.stopped


@pytest.mark.parametrize("timing", ["after-swap", "during-restore"])
def test_a_timing_with_the_in_place_strategy_is_a_usage_error(
    project15: Project, timing: str
) -> None:
    """In place the safety backup is always first (writers stopped): a timing asked for
    there is refused before anything happens, not silently ignored."""
    project = project15
    backup = project.backup()
    changed = _after_deploy(project)
    files = project.files()

    result = project.run(
        "rollback",
        "data",
        "--backup-file",
        backup,
        "--strategy",
        "in-place",
        "--safety-backup-timing",
        timing,
    )

    assert result.exit_code == ExitCode.USAGE, result.output
    assert "swap strategy" in result.stderr
    assert project.data_fingerprint() == changed
    assert project.files() == files
    assert project.databases() == [project.db.name]
    # auto is the default and stays accepted in place.
    auto = project.run(
        "rollback", "data", "--backup-file", backup, "--strategy", "in-place", "--dry-run"
    )
    assert auto.exit_code == 0, auto.stderr


def test_a_full_rollback_dumps_the_live_database_while_it_restores_and_downgrades(
    project15: Project,
) -> None:
    """rollback full with during-restore: the live database is dumped while the backup is
    restored and the copy downgraded; the swap waits for the dump; the result is the
    backup's data at the target revision, and the safety backup the state at the start."""
    project = project15
    project.upgrade(REV_DROP_EMAIL)
    backup = project.backup()
    changed = _after_deploy(project)

    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup, "--yes", *DURING
    )

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER
    kept = doc["kept_database"]
    assert _fingerprint_of(project, kept) == changed
    assert doc["safety_backup_source"] is None
    manifest = json.loads(Path(f"{doc['backup_file']}.json").read_text())
    assert manifest["database"] == project.db.name
    assert manifest["alembic_revisions"] == [REV_DROP_EMAIL]  # the state at the start
    order = _order(project, "rollback full")
    assert order.index("downgrade-copy started") < order.index("swap started")
    assert order.index("safety-backup finished") < order.index("swap started")
    assert order.count("safety-backup started") == 1
