"""Waits without bound, on real PostgreSQL 15 and 18: a table another session holds in
ACCESS EXCLUSIVE mode must make ``backup create`` fail within ``--lock-timeout`` (exit 5, one
line naming the table, nothing left behind), and SIGINT/SIGTERM must end a backup that waits
for such a lock within 5 s, whatever ``--lock-timeout`` says. Ordinary writers (ROW
EXCLUSIVE) must not make a backup fail."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rollback_cli import api
from rollback_cli.backups.dump import (
    BackupRequest,
    format_ms,
    is_lock_timeout,
    locked_table,
    pg_dump_lock_tables,
)
from rollback_cli.errors import ExitCode, OperationFailed
from rollback_cli.settings import StorageConfig, Target
from tests.cli_helpers import Workspace, read_manifest, seed_shop
from tests.servers import TestDatabase

EXCLUSIVE = "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"
# The error of a backup that gave up on the lock: the table is named by pg_dump (15: one
# LOCK TABLE per table) or by the row count that waited on the same lock (18: pg_dump locks
# all tables in one statement).
LOCKED_ORDERS = "could not lock table public.orders within 1s: another session holds it"
# Generous bounds for a slow CI machine; the measured times are printed (pytest -s).
FAIL_WITHIN = 6.0  # seconds, for a 1s lock timeout
EXIT_WITHIN = 5.0  # seconds from the signal to the process's exit (the requirement)
FORMATS = ["custom", "directory", "plain"]


@pytest.fixture
def ws(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database)
    return Workspace(database, tmp_path / "work")


@contextmanager
def holding(db: TestDatabase, statement: str = EXCLUSIVE) -> Iterator[Any]:
    """Another session that ran ``statement`` in a transaction it keeps open."""
    conn = db.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
        yield conn
    finally:
        conn.rollback()
        conn.close()


def lock_waiters(db: TestDatabase, holder: Any = None) -> list[tuple[int, str]]:
    """(pid, application_name) of the sessions in ``db`` waiting for a lock."""
    rows = db.query(
        "SELECT pid, application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND pid <> pg_backend_pid()"
    )
    skip = holder.get_backend_pid() if holder is not None else None
    return [(int(pid), str(name)) for pid, name in rows if pid != skip]


def no_lock_waiters_soon(db: TestDatabase, holder: Any, within: float = 3.0) -> bool:
    """Whether every lock request of the run has left the server's queue within ``within``
    seconds (pg_dump's backend and our own count are gone, not queued behind the holder)."""
    deadline = time.monotonic() + within
    while lock_waiters(db, holder):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def assert_nothing_left(ws: Workspace) -> None:
    """No backup, manifest or temp file (or directory) in the backup directory."""
    assert ws.backups() == [], ws.backups()


# --- a held table makes the backup fail within --lock-timeout -------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_held_table_fails_the_backup_within_the_lock_timeout(ws: Workspace, fmt: str) -> None:
    with holding(ws.db) as holder:
        started = time.monotonic()
        run = ws.run("backup", "create", "--format", fmt, "--lock-timeout", "1s")
        took = time.monotonic() - started
        print(f"\n{ws.db.server.major} {fmt}: lock-timeout failure after {took:.2f}s")
        assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
        assert took < FAIL_WITHIN, f"took {took:.1f}s"
        line = run.error_line()
        assert LOCKED_ORDERS in line, line
        assert "retry or raise --lock-timeout" in line
        assert "Traceback" not in run.stderr
        assert_nothing_left(ws)
        assert no_lock_waiters_soon(ws.db, holder), lock_waiters(ws.db, holder)
        events = [e for e in ws.last_log_events() if e.get("event") == "audit"]
        assert events and events[-1]["outcome"] == "failed_unchanged"
    # The lock released, the same command succeeds, with the rows of the live tables.
    run = ws.run("--json", "backup", "create", "--format", fmt, "--lock-timeout", "1s")
    assert run.exit_code == 0, str(run)
    manifest = read_manifest(Path(run.json["backup_file"]))
    assert manifest["row_counts"] == {"public.customers": 50, "public.orders": 500}


def test_a_schema_backup_fails_within_the_lock_timeout(ws: Workspace) -> None:
    """No row count runs for a schema backup: the error is pg_dump's alone."""
    with holding(ws.db):
        started = time.monotonic()
        run = ws.run("backup", "create", "--type", "schema", "--lock-timeout", "1s")
        took = time.monotonic() - started
    assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
    assert took < FAIL_WITHIN, f"took {took:.1f}s"
    line = run.error_line()
    assert "pg_dump could not lock" in line and "within 1s" in line, line
    assert "public.orders" in line, line  # alone (pg_dump 15) or among the tables (18)
    assert_nothing_left(ws)


def test_the_default_lock_timeout_is_five_seconds(ws: Workspace) -> None:
    with holding(ws.db):
        started = time.monotonic()
        run = ws.run("backup", "create")
        took = time.monotonic() - started
    assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
    assert "within 5s" in run.error_line()
    assert 4.5 < took < 5 + FAIL_WITHIN, f"took {took:.1f}s"
    assert_nothing_left(ws)


def test_a_held_alembic_version_table_fails_cleanly(ws: Workspace) -> None:
    """The revision is read on the snapshot connection before pg_dump starts: bounded too."""
    ws.db.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    ws.db.execute("INSERT INTO alembic_version VALUES ('abc123')")
    with holding(ws.db, "LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE"):
        started = time.monotonic()
        run = ws.run("backup", "create", "--lock-timeout", "500ms")
        took = time.monotonic() - started
    assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
    assert took < FAIL_WITHIN
    assert "could not lock table alembic_version within 500ms" in run.error_line()
    assert_nothing_left(ws)


def test_the_api_and_safety_backups_are_bounded_too(ws: Workspace) -> None:
    """``create_backup`` (also behind the rollbacks' safety backup) takes the bound from
    ``BackupRequest.lock_timeout_ms`` and raises OperationFailed."""
    assert BackupRequest().lock_timeout_ms == 5000
    target = Target.resolve(ws.url, environment="staging", pg_bin_dir=ws.db.server.bin_dir)
    storage = StorageConfig(backup_dir=ws.backup_dir)
    with holding(ws.db):
        started = time.monotonic()
        with pytest.raises(OperationFailed, match=r"could not lock table public\.orders"):
            api.backup_create(target, storage, BackupRequest(kind="safety", lock_timeout_ms=1000))
        assert time.monotonic() - started < FAIL_WITHIN
    assert_nothing_left(ws)


def test_lock_timeout_reaches_pg_dump_and_is_validated(ws: Workspace) -> None:
    run = ws.run("backup", "create", "--lock-timeout", "1500ms", "--dry-run")
    assert run.exit_code == 0, str(run)
    assert "--lock-wait-timeout=1500ms" in run.stdout
    run = ws.run("backup", "create", "--lock-timeout", "0", "--dry-run")
    assert run.exit_code == 0, str(run)
    assert "--lock-wait-timeout" not in run.stdout  # 0: wait forever, as PostgreSQL
    for bad in ("soon", "-1s", "5 weeks"):
        run = ws.run("backup", "create", "--lock-timeout", bad)
        assert run.exit_code == ExitCode.USAGE, str(run)
        assert "--lock-timeout" in run.error_line()
    assert_nothing_left(ws)


# --- SIGINT/SIGTERM end a backup that waits forever -----------------------------------------


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """CLI processes started by a test, killed at teardown if one is still running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("fmt", ["custom", "directory"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_ends_a_backup_waiting_forever(
    ws: Workspace,
    cli_env: dict[str, str],
    started: list[subprocess.Popen[str]],
    signum: signal.Signals,
    fmt: str,
) -> None:
    with holding(ws.db) as holder:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rollback_cli",
                *ws.args(),
                "backup",
                "create",
                "--format",
                fmt,
                "--lock-timeout",
                "0",
            ],
            env=cli_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        launched = time.monotonic()
        # Both pg_dump and our row count queue behind the holder (two lock waiters).
        deadline = launched + 30
        while len(lock_waiters(ws.db, holder)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert len(lock_waiters(ws.db, holder)) >= 2, lock_waiters(ws.db, holder)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - launched)))
        assert proc.poll() is None, "the backup ended although it waits forever"
        signalled = time.monotonic()
        proc.send_signal(signum)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after {signum.name}")
        took = time.monotonic() - signalled
        print(f"\n{ws.db.server.major} {fmt} {signum.name}: exited {took:.2f}s after the signal")
        assert proc.returncode == ExitCode.INTERRUPTED, stderr
        assert took < EXIT_WITHIN, f"exited {took:.1f}s after {signum.name}"
        assert "interrupted" in stderr.splitlines()[-1]
        assert_nothing_left(ws)
        # pg_dump cancelled its LOCK TABLE and our count was cancelled: nothing of the run
        # stays queued behind the holder.
        assert no_lock_waiters_soon(ws.db, holder), lock_waiters(ws.db, holder)


# --- no false positives ---------------------------------------------------------------------


def test_ordinary_writers_do_not_fail_the_backup(ws: Workspace) -> None:
    """ROW EXCLUSIVE (INSERT) does not conflict with pg_dump's ACCESS SHARE: an open writing
    transaction and a stream of committed INSERTs never make the backup wait or fail."""
    stop = threading.Event()
    inserted = [0]

    def writer() -> None:
        conn = ws.db.connect(autocommit=True)
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 1.5)")
                    inserted[0] += 1
        finally:
            conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    with holding(ws.db, "INSERT INTO orders (customer_id, amount) VALUES (2, 9.99)"):
        thread.start()
        try:
            for fmt in FORMATS:
                began = time.monotonic()
                run = ws.run("--json", "backup", "create", "--format", fmt, "--lock-timeout", "1s")
                assert run.exit_code == 0, str(run)
                assert time.monotonic() - began < 30
                counts = read_manifest(Path(run.json["backup_file"]))["row_counts"]
                # The snapshot's count: the committed rows at that moment, never the open
                # transaction's uncommitted one.
                assert 500 <= counts["public.orders"] <= 500 + inserted[0]
        finally:
            stop.set()
            thread.join(10)
    assert inserted[0] > 0


# --- what pg_dump and PostgreSQL say --------------------------------------------------------


def test_the_busy_table_is_read_from_pg_dump_and_from_the_count() -> None:
    pg15 = (
        "pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout\n"
        'pg_dump: detail: Query was: LOCK TABLE public."Odd, ""Tab""" IN ACCESS SHARE MODE\n'
    )
    pg18 = (
        "pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout\n"
        'pg_dump: detail: Query was: LOCK TABLE public.orders, public."Odd Tab", s.a '
        "IN ACCESS SHARE MODE\n"
    )
    assert pg_dump_lock_tables(pg15) == ['public."Odd, ""Tab"""']
    assert pg_dump_lock_tables(pg18) == ["public.orders", 'public."Odd Tab"', "s.a"]
    assert pg_dump_lock_tables("pg_dump: error: connection to server lost") is None

    class Cursor:
        query = b'SELECT count(*) FROM "public"."Odd ""x"""'

    class LockNotAvailable(Exception):
        pgcode = "55P03"
        cursor = Cursor()

    exc = LockNotAvailable("canceling statement due to lock timeout")
    assert is_lock_timeout(exc) and not is_lock_timeout(ValueError())
    assert locked_table(exc) == 'public.Odd "x"'
    assert [format_ms(ms) for ms in (500, 1000, 5000, 90_000, 120_000)] == [
        "500ms",
        "1s",
        "5s",
        "90s",
        "2min",
    ]
