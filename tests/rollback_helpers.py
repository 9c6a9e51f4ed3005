"""Helpers for the rollback tests: an example-project database and CLI invocation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from click.testing import CliRunner, Result

from devtools.data import SEED_BULK, bulk_orders_sql
from devtools.project import (
    REV_CREATE,
    REV_DROP_EMAIL,
    REV_SEED,
    REV_TIER,
    alembic_upgrade,
    sqlalchemy_url,
)
from rollback_cli.cli import cli
from rollback_cli.storage.base import sha256_artifact, tree_size
from tests.servers import TestDatabase

# The revisions and bulk_orders_sql live in devtools (the benchmarks use them too).
__all__ = [
    "REV_CREATE",
    "REV_DROP_EMAIL",
    "REV_SEED",
    "REV_TIER",
    "SEED_BULK",
    "Project",
    "RoleDatabase",
    "bulk_orders_sql",
    "log_events",
    "reseal",
    "tier_project",
]


@dataclass
class Project:
    """A test database managed by the example Alembic project, with its own dirs."""

    db: TestDatabase
    alembic_ini: Path
    workdir: Path

    @property
    def backup_dir(self) -> Path:
        return self.workdir / "backups"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def alembic_url(self) -> str:
        return sqlalchemy_url(self.db.url)

    def upgrade(self, revision: str) -> None:
        alembic_upgrade(self.db.url, revision, self.alembic_ini)

    def base_args(self, environment: str = "staging") -> list[str]:
        return [
            "--database-url",
            self.db.url,
            "--environment",
            environment,
            "--backup-dir",
            str(self.backup_dir),
            "--log-dir",
            str(self.log_dir),
            "--alembic-config",
            str(self.alembic_ini),
            "--pg-bin-dir",
            str(self.db.server.bin_dir),
            "--log-format",
            "json",
        ]

    def run(self, *args: str, environment: str = "staging", input: str | None = None) -> Result:
        return CliRunner().invoke(cli, [*self.base_args(environment), *args], input=input)

    def run_json(self, *args: str, environment: str = "staging") -> tuple[Result, dict[str, Any]]:
        result = self.run("--json", *args, environment=environment)
        return result, json.loads(result.stdout)

    def backup(self, *extra: str) -> str:
        result, doc = self.run_json("backup", "create", *extra)
        assert result.exit_code == 0, result.stderr
        return str(doc["backup_file"])

    def revision(self) -> str | None:
        rows = self.db.query("SELECT version_num FROM alembic_version")
        return rows[0][0] if rows else None

    def schema_dump(self) -> str:
        """pg_dump --schema-only, the schema compared before and after."""
        env = {**os.environ, **self.db.conninfo_env()}
        out = subprocess.run(
            [str(self.db.server.bin_dir / "pg_dump"), "--schema-only", "--no-owner"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        # pg_dump 18 adds \restrict lines with a random key to plain output.
        return "\n".join(line for line in out.splitlines() if not line.startswith("\\"))

    def data_fingerprint(self) -> dict[str, str]:
        """A hash of every user table's rows, ordered, for before/after comparisons."""
        tables = [
            r[0]
            for r in self.db.query(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
            )
        ]
        prints = {}
        for table in tables:
            rows = self.db.query(f"SELECT t::text FROM {table} t ORDER BY t::text")
            prints[table] = hashlib.sha256("\n".join(r[0] for r in rows).encode()).hexdigest()
        return prints

    def databases(self) -> list[str]:
        return self.db.related_databases()

    def files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.workdir))
            for p in self.workdir.rglob("*")
            if "logs" not in p.parts
        )


@dataclass
class RoleDatabase(TestDatabase):
    """The same database, reached as ``role`` instead of the superuser."""

    role: str = ""
    password: str = ""

    @property
    def url(self) -> str:
        server = self.server
        return (
            f"postgresql://{self.role}:{quote(self.password, safe='')}"
            f"@{server.host}:{server.port}/{quote(self.name, safe='')}"
        )


def reseal(backup: Path) -> None:
    """Recompute size and sha256 in the manifest (of a file or a directory), as someone
    with write access to the storage would; a signature, if any, is left as it was."""
    manifest_path = Path(f"{backup}.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["size"] = tree_size(backup)
    manifest["sha256"] = sha256_artifact(backup)
    manifest_path.write_text(json.dumps(manifest))


def tier_project(db: TestDatabase, alembic_ini: Path, tmp_path: Path) -> Project:
    """The example project on ``db``, upgraded to the tier revision (before the bad one)."""
    project = Project(db, alembic_ini, tmp_path / "work")
    project.workdir.mkdir()
    project.upgrade(REV_TIER)
    return project


def log_events(project: Project) -> list[dict[str, Any]]:
    events = []
    for path in sorted(project.log_dir.glob("*.log")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return events
