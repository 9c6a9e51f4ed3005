"""Adversarial suite: database names are never expanded as connection strings, and no file
holding a secret outlives the process, even under SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from rollback_cli.postgres import registry
from tests.rollback_helpers import REV_TIER, Project
from tests.servers import DEFAULT_PASSWORD, PostgresCluster, TestDatabase


class Listener(threading.Thread):
    """A TCP listener on loopback that counts the connections it receives."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.socket.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(2)
        self.socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    listening = Listener()
    listening.start()
    yield listening
    listening.stop()


@pytest.fixture
def odd_project(
    pg15: PostgresCluster, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> Iterator[Callable[[str], Project]]:
    made: list[TestDatabase] = []

    def make(name: str) -> Project:
        pg15.create_database(name)
        db = TestDatabase(name=name, server=pg15)
        made.append(db)
        project = Project(db, alembic_project, tmp_path / "work")
        project.workdir.mkdir(exist_ok=True)
        project.upgrade(REV_TIER)
        return project

    yield make
    for db in made:
        conn = psycopg2.connect(pg15.url("postgres"))
        conn.autocommit = True
        try:
            names = [a.name for a in registry.artifacts_of(conn, db.name)]
        finally:
            conn.close()
        for name in [*names, db.name]:
            pg15.drop_database(name)


@pytest.mark.parametrize("strategy", ["swap", "in-place"])
def test_a_database_name_that_looks_like_a_connection_string_connects_nowhere_else(
    odd_project: Callable[[str], Project], listener: Listener, strategy: str
) -> None:
    name = f"host=127.0.0.1 port={listener.port} dbname=x{uuid.uuid4().hex[:4]}"
    project = odd_project(name)
    before = project.data_fingerprint()
    backup = project.backup()
    verified = project.run("backup", "verify", backup, "--restore-test")
    project.db.execute("DELETE FROM orders")
    rolled = project.run("rollback", "data", "--backup-file", backup, "--strategy", strategy)

    assert listener.connections == 0
    assert verified.exit_code == 0, verified.stderr
    assert rolled.exit_code == 0, rolled.stderr
    assert project.data_fingerprint() == before


def test_no_password_file_survives_a_kill_9_mid_dump(
    odd_project: Callable[[str], Project], tmp_path: Path
) -> None:
    project = odd_project(f"t_{uuid.uuid4().hex[:8]}")
    project.db.execute(
        "INSERT INTO orders (customer_id, amount) SELECT c.id, g FROM customers c, "
        "generate_series(1, 20000) g"
    )
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    for delay in (0.0, 0.2, 0.5):  # kill at different points of the dump
        process = subprocess.Popen(
            [sys.executable, "-m", "rollback_cli", *project.base_args(), "backup", "create"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stderr is not None
        for line in process.stderr:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "step started" and event.get("step") == "dump":
                break
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    leftovers = [
        path
        for path in private_tmp.rglob("*")
        if path.is_file() and DEFAULT_PASSWORD.encode() in path.read_bytes()
    ]
    assert leftovers == []
    assert not list(private_tmp.glob("db-rollback-*.pgpass"))
