"""Adversarial suite: the in-place strategy loses no committed write, keeps nothing the
backup lacks, and never waits without bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from rollback_cli.errors import ExitCode
from tests.rollback_helpers import Project
from tests.servers import TestDatabase


def in_place(project: Project, backup: str, *extra: str) -> tuple[int, dict]:
    result, doc = project.run_json(
        "rollback", "data", "--backup-file", backup, "--strategy", "in-place", *extra
    )
    return result.exit_code, doc


def rows_in_backup(project: Project, backup: str, table: str) -> set[str]:
    """The rows of ``table`` in a custom-format backup, as pg_restore prints them."""
    out = subprocess.run(
        [
            str(project.db.server.bin_dir / "pg_restore"),
            "--data-only",
            f"--table={table}",
            "--file=-",
            backup,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"COPY public.{table}"))
    end = lines.index("\\.", start)
    return set(lines[start + 1 : end])


class Writer(threading.Thread):
    """Commits one row every few milliseconds, reconnecting when its session is ended;
    remembers every id whose COMMIT succeeded."""

    def __init__(self, db: TestDatabase) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.committed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        next_id = 1_000_000
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.db.url, connect_timeout=2)
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute("SET lock_timeout = '20s'")
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO events (id) VALUES (%s)", (next_id,))
                self.committed.append(next_id)
                next_id += 1
            except psycopg2.Error:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
            time.sleep(0.005)
        if conn is not None:
            conn.close()


def test_no_committed_write_is_lost_during_an_in_place_rollback(project15: Project) -> None:
    db = project15.db
    db.execute("CREATE TABLE events (id int PRIMARY KEY)")
    db.execute("INSERT INTO events SELECT g FROM generate_series(1, 10) g")
    backup = project15.backup()
    writer = Writer(db)
    writer.start()
    time.sleep(0.5)
    try:
        code, doc = in_place(project15, backup)
        time.sleep(0.3)
    finally:
        writer.stop.set()
        writer.join(10)
    assert code == 0, doc
    safety = doc["backup_file"]
    in_safety = rows_in_backup(project15, safety, "events")
    after = {str(r[0]) for r in db.query("SELECT id FROM events")}
    written_before_restore = [i for i in writer.committed if str(i) not in after]
    missing = [i for i in written_before_restore if str(i) not in in_safety]
    assert writer.committed, "the writer committed nothing: the test proves nothing"
    assert missing == [], f"{len(missing)} committed rows are in neither place"


def test_objects_the_backup_lacks_are_gone_and_foreign_keys_do_not_block(
    project15: Project,
) -> None:
    backup = project15.backup()
    schema_before = project15.schema_dump()
    db = project15.db
    db.execute("CREATE TABLE added_later (id int PRIMARY KEY)")
    db.execute("CREATE TABLE refs (id int PRIMARY KEY, customer_id int REFERENCES customers (id))")
    db.execute("CREATE SCHEMA extra; CREATE TABLE extra.t (id int)")
    db.execute("INSERT INTO refs SELECT 1, min(id) FROM customers")

    code, doc = in_place(project15, backup)

    assert code == 0, doc
    assert project15.schema_dump() == schema_before


@pytest.mark.parametrize("mode", ["reader", "writer"])
def test_an_idle_in_transaction_session_does_not_block_in_place(
    project15: Project, mode: str
) -> None:
    backup = project15.backup()
    idle = psycopg2.connect(project15.db.url)
    with idle.cursor() as cur:
        if mode == "reader":
            cur.execute("SELECT count(*) FROM orders")
        else:
            cur.execute(
                "UPDATE customers SET name = name || '!' WHERE id = (SELECT min(id) FROM customers)"
            )
    started = time.monotonic()
    try:
        code, doc = in_place(project15, backup, "--lock-timeout", "2s")
    finally:
        idle.close()
    assert code == 0, doc
    assert time.monotonic() - started < 60


def test_a_table_held_exclusively_ends_in_place_within_the_lock_timeout(
    project15: Project,
) -> None:
    """A lock no session termination releases (a prepared transaction's): the run gives up
    after --lock-timeout with the database unchanged and accepting connections."""
    backup = project15.backup()
    project15.db.execute("DELETE FROM orders")
    before = project15.data_fingerprint()
    holder = psycopg2.connect(project15.db.url)
    holder.autocommit = True
    blocker = psycopg2.connect(project15.db.server.url("postgres"))
    blocker.autocommit = True
    try:
        with holder.cursor() as cur:
            cur.execute("SHOW max_prepared_transactions")
            if int(cur.fetchone()[0]) == 0:
                pytest.fail("the test cluster needs max_prepared_transactions > 0")
            cur.execute("BEGIN")
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            cur.execute("PREPARE TRANSACTION 'hold_orders'")
        started = time.monotonic()
        code, doc = in_place(project15, backup, "--lock-timeout", "1s")
        elapsed = time.monotonic() - started
    finally:
        holder.close()
        blocker.close()
        # The run ended the holder's session; the prepared transaction outlives it.
        with contextlib.suppress(psycopg2.Error):
            project15.db.execute("ROLLBACK PREPARED 'hold_orders'")
    assert code == ExitCode.FAILED_UNCHANGED, doc
    assert elapsed < 30
    assert project15.data_fingerprint() == before
    rows = project15.db.server.query(
        "SELECT datallowconn FROM pg_database WHERE datname = %s", (project15.db.name,)
    )
    assert rows == [(True,)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_in_place_leaves_no_session_and_the_database_open(
    project15: Project, sig: signal.Signals
) -> None:
    db = project15.db
    db.execute("INSERT INTO orders (customer_id, amount) SELECT min(id), 1 FROM customers")
    backup = project15.backup()
    db.execute("DELETE FROM orders")
    before = project15.data_fingerprint()
    env = {**os.environ}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rollback_cli",
            *project15.base_args(),
            "rollback",
            "data",
            "--backup-file",
            backup,
            "--strategy",
            "in-place",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if '"step": "restore-in-place"' in line and "step started" in line:
            break
    process.send_signal(sig)
    started = time.monotonic()
    process.wait(30)
    assert time.monotonic() - started < 10
    assert process.returncode in (ExitCode.INTERRUPTED, 0)
    if process.returncode == ExitCode.INTERRUPTED:
        assert project15.data_fingerprint() == before
    rows = db.server.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'db-rollback %%'"
    )
    assert rows == [(0,)]
    allow = db.server.query("SELECT datallowconn FROM pg_database WHERE datname = %s", (db.name,))
    assert allow == [(True,)]
