"""The test servers and fixtures themselves, and the example Alembic project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import EXAMPLES_DIR
from tests.servers import PostgresCluster, TestDatabase, temporary_database

EXPECTED_MAJOR = {"pg15": 15, "pg18": 18}

REV_TABLES = "3f9c1e7a2b40"
REV_SEED = "8d4b6a0c9e12"
REV_TIER = "b7e2f5a91c38"
REV_DROP_EMAIL = "e41c0d7f6a95"


# --------------------------------------------------------------------------- servers


def test_server_major(pg_server: PostgresCluster, request: pytest.FixtureRequest) -> None:
    expected = EXPECTED_MAJOR[request.node.callspec.params["pg_server"]]
    assert pg_server.major == expected
    version = pg_server.query("SHOW server_version")[0][0]
    assert version.split(".")[0] == str(expected)
    assert int(pg_server.query("SHOW server_version_num")[0][0]) // 10000 == expected


def test_listens_on_loopback_only(pg_server: PostgresCluster) -> None:
    assert pg_server.host == "127.0.0.1"
    assert pg_server.query("SHOW listen_addresses") == [("127.0.0.1",)]
    assert pg_server.query("SHOW port") == [(str(pg_server.port),)]


def test_tcp_requires_the_password(pg_server: PostgresCluster) -> None:
    common = {
        "host": pg_server.host,
        "port": pg_server.port,
        "user": pg_server.user,
        "dbname": "postgres",
        "connect_timeout": 5,
    }
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(password="not-the-password", **common)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(password="", **common)
    conn = psycopg2.connect(password=pg_server.password, **common)
    conn.close()
    assert pg_server.query("SHOW password_encryption") == [("scram-sha-256",)]


def test_url_carries_the_quoted_password(pg_server: PostgresCluster) -> None:
    url = pg_server.url("some db")
    assert url.startswith(f"postgresql://postgres:s3cr3t-Pa55w0rd%21@127.0.0.1:{pg_server.port}/")
    assert url.endswith("/some%20db")
    conn = psycopg2.connect(pg_server.url())
    conn.close()


def test_psql_helper_passes_no_password_in_argv(pg_server: PostgresCluster) -> None:
    assert pg_server.psql("SELECT 40 + 2").strip() == "42"


# --------------------------------------------------------------------------- databases


def test_database_fixture_is_fresh_and_empty(database: TestDatabase) -> None:
    assert database.name.startswith("t_")
    assert database.exists()
    tables = database.query(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    assert tables == [(0,)]
    assert database.query("SELECT current_database()") == [(database.name,)]
    env = database.conninfo_env()
    assert env == {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(database.server.port),
        "PGUSER": "postgres",
        "PGPASSWORD": database.server.password,
        "PGDATABASE": database.name,
    }
    assert database.url == database.server.url(database.name)


def test_database_fixtures_pinned(database15: TestDatabase, database18: TestDatabase) -> None:
    assert database15.server.major == 15
    assert database18.server.major == 18


def test_temporary_database_drops_itself_and_its_copies(pg_server: PostgresCluster) -> None:
    with temporary_database(pg_server) as db:
        db.execute("CREATE TABLE t (x int)")
        db.execute("INSERT INTO t VALUES (1), (2)")
        assert db.query("SELECT count(*) FROM t") == [(2,)]
        pg_server.create_database(f"{db.name}_rb_20250101_000000")
        pg_server.create_database(f"{db.name}_pre_20250101_000000")
        # An open session must not prevent the cleanup.
        held = db.connect()
        assert len(db.related_databases()) == 3
    assert not any(name.startswith(db.name) for name in pg_server.databases())
    held.close()


def test_cli_env_is_clean(cli_env: dict[str, str]) -> None:
    prefixes = ("DATABASE_URL", "PG", "DB_ROLLBACK_", "AWS_", "GITHUB_")
    assert not [key for key in cli_env if key.startswith(prefixes)]
    assert not [key for key in os.environ if key.startswith(prefixes)]


def test_persistent_cluster_script(pg18: PostgresCluster) -> None:
    """`python -m devtools.postgres` starts a cluster in DIR, reuses it, and stops it."""
    # pytest's tmp_path sits below a 0700 directory the postgres OS user cannot traverse.
    parent = Path(tempfile.mkdtemp(prefix="pgscript-", dir="/tmp"))
    parent.chmod(0o755)
    try:
        _check_persistent_cluster_script(parent / "pg")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _check_persistent_cluster_script(base: Path) -> None:
    cmd = [sys.executable, "-m", "devtools.postgres"]
    cwd = Path(__file__).resolve().parent.parent
    first = subprocess.run(
        [*cmd, "postgres", "--embedded", "--dir", str(base)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    url = first.stdout.strip()
    try:
        assert url.startswith("postgresql://postgres:")
        conn = psycopg2.connect(url)
        conn.close()
        again = subprocess.run(
            [*cmd, "postgres", "--embedded", "--dir", str(base)],
            capture_output=True,
            text=True,
            cwd=cwd,
            check=True,
        )
        assert again.stdout.strip() == url
    finally:
        stop = subprocess.run(
            [*cmd, "stop", "--dir", str(base)], capture_output=True, text=True, cwd=cwd, check=False
        )
    assert stop.returncode == 0, stop.stderr
    assert (base / "data" / "PG_VERSION").is_file()
    assert not (base / "data" / "postmaster.pid").exists()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=3)
    subprocess.run(
        [*cmd, "stop", "--dir", str(base), "--remove"], cwd=cwd, check=True, capture_output=True
    )
    assert not base.exists()


# --------------------------------------------------------------------------- examples/


def alembic(ini: Path, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    if url is not None:
        env["DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ini.parent,
        check=False,
    )


def columns(db: TestDatabase, table: str) -> list[str]:
    rows = db.query(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    return [row[0] for row in rows]


def test_example_revisions_form_a_linear_chain(alembic_project: Path) -> None:
    history = alembic(alembic_project, "history")
    assert history.returncode == 0, history.stderr
    lines = history.stdout.strip().splitlines()
    assert lines == [
        f'{REV_TIER} -> {REV_DROP_EMAIL} (head), Drop customers.email -- the "bad migration" '
        "of the demo.",
        f"{REV_SEED} -> {REV_TIER}, Add customers.tier ('standard' or 'gold'); customers who "
        "spent 650 or more become gold.",
        f"{REV_TABLES} -> {REV_SEED}, Seed 20 customers and 50 orders (data migration).",
        f"<base> -> {REV_TABLES}, Create the customers and orders tables.",
    ]


def test_example_upgrade_and_downgrade(database: TestDatabase, alembic_project: Path) -> None:
    up = alembic(alembic_project, "upgrade", "head", url=database.url)
    assert up.returncode == 0, up.stderr
    assert database.query("SELECT version_num FROM alembic_version") == [(REV_DROP_EMAIL,)]
    assert database.query("SELECT count(*) FROM customers") == [(20,)]
    assert database.query("SELECT count(*) FROM orders") == [(50,)]
    assert database.query("SELECT tier, count(*) FROM customers GROUP BY 1 ORDER BY 1") == [
        ("gold", 4),
        ("standard", 16),
    ]
    assert "email" not in columns(database, "customers")

    # Back to revision 3 by partial id: the column returns, its data does not.
    down = alembic(alembic_project, "downgrade", REV_TIER[:6], url=database.url)
    assert down.returncode == 0, down.stderr
    assert database.query("SELECT version_num FROM alembic_version") == [(REV_TIER,)]
    assert "email" in columns(database, "customers")
    assert database.query("SELECT count(*), count(email) FROM customers") == [(20, 0)]

    base = alembic(alembic_project, "downgrade", "base", url=database.url)
    assert base.returncode == 0, base.stderr
    assert database.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    ) == [("alembic_version",)]
    assert database.query("SELECT count(*) FROM alembic_version") == [(0,)]

    # And up again: the chain is repeatable on the same database.
    again = alembic(alembic_project, "upgrade", REV_TIER, url=database.url)
    assert again.returncode == 0, again.stderr
    assert database.query("SELECT count(*), count(email) FROM customers") == [(20, 20)]
    assert database.query("SELECT count(*), sum(amount) FROM orders")[0][0] == 50


def test_example_downgrade_of_seed_removes_seeded_rows(
    database18: TestDatabase, alembic_project: Path
) -> None:
    assert alembic(alembic_project, "upgrade", REV_SEED, url=database18.url).returncode == 0
    database18.execute("INSERT INTO customers (name, email) VALUES ('Own Row', 'own@example.org')")
    down = alembic(alembic_project, "downgrade", REV_TABLES, url=database18.url)
    assert down.returncode == 0, down.stderr
    assert database18.query("SELECT name FROM customers") == [("Own Row",)]
    assert database18.query("SELECT count(*) FROM orders") == [(0,)]


def test_example_bare_scheme_and_ini_url(database15: TestDatabase, alembic_project: Path) -> None:
    """env.py accepts postgres:// and prefers sqlalchemy.url over DATABASE_URL."""
    bare = database15.url.replace("postgresql://", "postgres://", 1)
    ini = alembic_project.read_text().replace(
        "sqlalchemy.url =", "sqlalchemy.url = " + bare.replace("%", "%%")
    )
    alembic_project.write_text(ini)
    result = alembic(alembic_project, "upgrade", REV_TABLES, url="postgresql://nobody@invalid/x")
    assert result.returncode == 0, result.stderr
    assert database15.query("SELECT version_num FROM alembic_version") == [(REV_TABLES,)]


def test_example_offline_sql(alembic_project: Path) -> None:
    up = alembic(alembic_project, "upgrade", "head", "--sql")
    assert up.returncode == 0, up.stderr
    sql = up.stdout
    assert "CREATE TABLE customers" in sql
    assert "CREATE TABLE orders" in sql
    assert "INSERT INTO customers" in sql
    assert "ALTER TABLE customers DROP COLUMN email" in sql
    assert sql.rstrip().endswith("COMMIT;")

    down = alembic(alembic_project, "downgrade", f"{REV_DROP_EMAIL}:{REV_TIER}", "--sql")
    assert down.returncode == 0, down.stderr
    assert "ALTER TABLE customers ADD COLUMN email TEXT" in down.stdout
    assert f"version_num='{REV_TIER}'" in down.stdout


def test_example_seed_bulk(database: TestDatabase, alembic_project: Path) -> None:
    assert alembic(alembic_project, "upgrade", "head", url=database.url).returncode == 0
    database.psql(file=alembic_project.parent / "seed_bulk.sql", variables={"rows": "1000"})
    assert database.query("SELECT count(*) FROM orders") == [(1050,)]
    database.psql(file=EXAMPLES_DIR / "seed_bulk.sql")
    assert database.query("SELECT count(*) FROM orders") == [(101050,)]
