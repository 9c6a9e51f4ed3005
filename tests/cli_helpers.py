"""Helpers for the foundation tests: a workspace around one test database, CLI runs in-process
(click's CliRunner) or as a real subprocess, log and manifest readers, and small fixtures of
data and files."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from click.testing import CliRunner, Result

from rollback_cli.cli import cli
from tests.servers import DEFAULT_PASSWORD, TestDatabase, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = DEFAULT_PASSWORD
# Every spelling of the password that could end up somewhere it should not.
PASSWORD_FORMS = (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD))
BACKUP_NAME = re.compile(
    r"^backup_(?P<env>[A-Za-z0-9_.-]+?)_(?P<stamp>\d{8}_\d{6})(?:_(?P<type>schema|data))?"
    r"(?:_(?P<n>\d+))?\.(?P<ext>dump|sql|dir)$"
)
LOG_NAME = re.compile(r"^rollback_(?P<env>[A-Za-z0-9_.-]+)_(?P<stamp>\d{8}_\d{6})(?:_\d+)?\.log$")


@dataclass
class Run:
    """The outcome of one CLI run, the same shape for in-process and subprocess runs."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc

    def stderr_events(self) -> list[dict[str, Any]]:
        """The JSON log lines on stderr (other lines are skipped)."""
        events = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def plain_stderr(self) -> list[str]:
        """Lines of stderr that are not JSON log events: what a person reads."""
        return [ln for ln in self.stderr.splitlines() if ln.strip() and not ln.startswith("{")]

    def error_line(self) -> str:
        """The single ``db-rollback: error: ...`` (or Click ``Error: ...``) line."""
        lines = [ln for ln in self.plain_stderr() if "rror:" in ln]
        assert len(lines) == 1, f"expected one error line, got {lines!r}\n{self.stderr}"
        return lines[0]

    def __str__(self) -> str:
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def _from_result(result: Result) -> Run:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Run(result.exit_code, result.stdout, result.stderr)


def invoke(args: list[str], env: dict[str, str] | None = None, input: str | None = None) -> Run:
    """Run the CLI in-process; ``env`` entries are set (None values unset) for the run."""
    return _from_result(CliRunner().invoke(cli, args, env=env, input=input))


def run_subprocess(
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    module: bool = True,
    cwd: Path | None = None,
    timeout: float = 120,
) -> Run:
    """Run ``python -m rollback_cli ARGS`` (or the console script) as a real process."""
    argv = (
        [sys.executable, "-m", "rollback_cli", *args]
        if module
        else [str(Path(sys.executable).parent / "db-rollback"), *args]
    )
    proc = subprocess.run(
        argv,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        cwd=str(cwd) if cwd else None,
        timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Workspace:
    """One test database plus its own backup and log directories."""

    db: TestDatabase
    workdir: Path
    alembic_ini: Path | None = None
    pg_bin_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def backup_dir(self) -> Path:
        return self.workdir / "backups"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def url(self) -> str:
        return self.db.url

    def args(self, environment: str = "staging", *, url: str | None = None) -> list[str]:
        # Without a project, no --alembic-config: one named and missing fails `status`.
        alembic = ["--alembic-config", str(self.alembic_ini)] if self.alembic_ini else []
        return [
            "--database-url",
            url or self.db.url,
            "--environment",
            environment,
            "--backup-dir",
            str(self.backup_dir),
            "--log-dir",
            str(self.log_dir),
            "--log-format",
            "json",
            "--pg-bin-dir",
            str(self.pg_bin_dir or self.db.server.bin_dir),
            *alembic,
        ]

    def run(
        self,
        *args: str,
        environment: str = "staging",
        url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Run:
        return invoke(
            [*self.args(environment, url=url), *args], env={**self.extra_env, **(env or {})}
        )

    def run_json(self, *args: str, **kwargs: Any) -> tuple[Run, dict[str, Any]]:
        run = self.run("--json", *args, **kwargs)
        return run, run.json

    def backup(self, *extra: str, environment: str = "staging") -> Path:
        run, doc = self.run_json("backup", "create", *extra, environment=environment)
        assert run.exit_code == 0, str(run)
        return Path(doc["backup_file"])

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []

    def last_log_events(self) -> list[dict[str, Any]]:
        files = sorted(self.log_files(), key=lambda p: p.stat().st_mtime_ns)
        assert files, f"no log file in {self.log_dir}"
        return read_events(files[-1])

    def backups(self) -> list[str]:
        """Names in the backup directory (temp files included), sorted."""
        if not self.backup_dir.is_dir():
            return []
        return sorted(p.name for p in self.backup_dir.iterdir())


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_manifest(backup: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(f"{backup}.json").read_text())
    return doc


def write_manifest(backup: Path, doc: dict[str, Any]) -> None:
    Path(f"{backup}.json").write_text(json.dumps(doc, indent=2))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unused_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    return free_port()


def seed_shop(db: TestDatabase, customers: int = 50, orders: int = 500) -> dict[str, int]:
    """Two small related tables; returns their row counts keyed like manifests do."""
    db.execute(
        """
        CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text);
        CREATE TABLE orders (
            id bigserial PRIMARY KEY,
            customer_id int NOT NULL REFERENCES customers(id),
            amount numeric(10, 2) NOT NULL
        );
        """
    )
    db.execute(
        "INSERT INTO customers (name, email) "
        "SELECT 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, %s) g",
        (customers,),
    )
    db.execute(
        "INSERT INTO orders (customer_id, amount) "
        "SELECT 1 + g %% %s, (g %% 1000) / 10.0 FROM generate_series(1, %s) g",
        (customers, orders),
    )
    return {"public.customers": customers, "public.orders": orders}


def table_counts(db: TestDatabase, dbname: str | None = None) -> dict[str, int]:
    rows = db.server.query(
        "SELECT format('%s.%s', schemaname, relname) FROM pg_stat_user_tables ORDER BY 1",
        dbname=dbname or db.name,
    )
    counts = {}
    for (table,) in rows:
        schema, name = table.split(".", 1)
        counted = db.server.query(
            f'SELECT count(*) FROM "{schema}"."{name}"', dbname=dbname or db.name
        )
        counts[table] = int(counted[0][0])
    return counts


def write_executable(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def wrapper_bin_dir(
    target: Path,
    real_bin_dir: Path,
    record: Path,
    *,
    tools: tuple[str, ...] = ("pg_dump", "pg_restore", "psql"),
) -> Path:
    """A bin dir whose pg_dump/pg_restore/psql record their argv and the names of their
    environment variables (one JSON line each in ``record``), then exec the real binary."""
    target.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        write_executable(
            target / tool,
            f"""
            #!{sys.executable}
            import json, os, sys
            passfile = os.environ.get("PGPASSFILE")
            present = bool(passfile) and os.path.exists(passfile)
            entry = {{
                "tool": {tool!r},
                "argv": sys.argv,
                "env_names": sorted(os.environ),
                "pgpassfile": passfile,
                "passfile_mode": oct(os.stat(passfile).st_mode & 0o777) if present else None,
            }}
            with open({str(record)!r}, "a") as out:
                out.write(json.dumps(entry) + "\\n")
            os.execv({str(real_bin_dir / tool)!r}, [{str(real_bin_dir / tool)!r}, *sys.argv[1:]])
            """,
        )
    return target


def recorded_calls(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs mounted at ``path`` (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted read-only onto itself: not writable even for root."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def assert_no_password(*texts: str, where: str = "") -> None:
    for text in texts:
        for form in PASSWORD_FORMS:
            at = text.find(form)
            assert at < 0, f"password found {where}: ...{text[max(0, at - 80) : at + 40]}..."
