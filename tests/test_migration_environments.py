"""Application env.py files and revisions the tool does not write, against real servers.

Each test patches the copied example project (``alembic_project``) into a shape real
applications have: an env.py that builds its own engine from its own setting, one that
reconfigures logging and prints, an async one; downgrades that look at the live connection
or drop constraints. The tool must keep its guarantees through all of them: the downgrade
reaches the target database only, with the run's timeouts; stdout stays one JSON document;
the plan tells what the downgrade does; refusals say what is actually missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from rollback_cli.cli import cli
from tests.cli_helpers import Run, run_subprocess
from tests.rollback_helpers import (
    REV_DROP_EMAIL,
    REV_SEED,
    REV_TIER,
    Project,
    RoleDatabase,
    log_events,
    tier_project,
)
from tests.servers import TestDatabase, temporary_database

# --------------------------------------------------------------------------- helpers


def head_project(db: TestDatabase, alembic_ini: Path, tmp_path: Path) -> Project:
    """The example project on ``db`` at head (customers.email dropped)."""
    project = tier_project(db, alembic_ini, tmp_path)
    project.upgrade("head")
    assert project.revision() == REV_DROP_EMAIL
    return project


def migrations_dir(alembic_ini: Path) -> Path:
    return alembic_ini.parent / "migrations"


def _forget_bytecode(alembic_ini: Path) -> None:
    """Patched sources must be what runs, not bytecode compiled by the set-up's upgrades."""
    for cache in migrations_dir(alembic_ini).rglob("__pycache__"):
        shutil.rmtree(cache)


def write_env_py(alembic_ini: Path, source: str) -> None:
    (migrations_dir(alembic_ini) / "env.py").write_text(textwrap.dedent(source))
    _forget_bytecode(alembic_ini)


def replace_downgrade(alembic_ini: Path, revision: str, body: str) -> None:
    """Replace the ``downgrade()`` of ``revision`` (the last function of each file)."""
    (path,) = (migrations_dir(alembic_ini) / "versions").glob(f"{revision}_*.py")
    head, marker, _ = path.read_text().partition("def downgrade() -> None:")
    assert marker, f"no downgrade() in {path}"
    path.write_text(head + marker + "\n" + textwrap.indent(textwrap.dedent(body), "    "))
    _forget_bytecode(alembic_ini)


def columns(project: Project, table: str = "customers") -> list[str]:
    rows = project.db.query(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum",
        (table,),
    )
    return [r[0] for r in rows]


def snapshot(project: Project) -> tuple[str | None, str, dict[str, str]]:
    """Revision, schema and data of the project's database: what "unchanged" compares."""
    return project.revision(), project.schema_dump(), project.data_fingerprint()


def as_run(result: object) -> Run:
    return Run(result.exit_code, result.stdout, result.stderr)  # type: ignore[attr-defined]


def sa_url(db: TestDatabase) -> str:
    return db.url.replace("postgresql://", "postgresql+psycopg2://", 1)


# An env.py that ignores the URL it is given and builds its own engine from its own setting.
OWN_ENGINE_ENV_PY = """
    import os

    from alembic import context
    from sqlalchemy import create_engine, pool

    config = context.config


    def run_migrations_offline() -> None:
        context.configure(
            url=os.environ["APP_DB_URL"],
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()


    def run_migrations_online() -> None:
        engine = create_engine(os.environ["APP_DB_URL"], poolclass=pool.NullPool)
        try:
            with engine.connect() as connection:
                context.configure(connection=connection)
                with context.begin_transaction():
                    context.run_migrations()
        finally:
            engine.dispose()


    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()
"""

# An env.py that takes the process's logging over and writes to stdout.
LOGGING_ENV_PY = """
    import logging
    import logging.config
    import sys

    from alembic import context
    from sqlalchemy import engine_from_config, pool

    config = context.config
    logging.config.fileConfig(config.config_file_name)  # disable_existing_loggers=True
    logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, force=True)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
    print("env.py loaded")


    def run_migrations_offline() -> None:
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()


    def run_migrations_online() -> None:
        engine = engine_from_config(
            config.get_section(config.config_ini_section, {}),
            prefix="sqlalchemy.",
            poolclass=pool.NullPool,
        )
        try:
            with engine.connect() as connection:
                context.configure(connection=connection)
                with context.begin_transaction():
                    context.run_migrations()
        finally:
            engine.dispose()


    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()
"""

# An async env.py (the shape of Alembic's "async" template), on the given URL with the
# async driver DRIVER.
ASYNC_ENV_PY = """
    import asyncio

    from alembic import context
    from sqlalchemy import pool
    from sqlalchemy.engine import Connection, make_url
    from sqlalchemy.ext.asyncio import async_engine_from_config

    config = context.config
    DRIVER = "{driver}"


    def async_url():
        url = make_url(config.get_main_option("sqlalchemy.url"))
        return url.set(drivername="postgresql+" + DRIVER)


    def run_migrations_offline() -> None:
        context.configure(
            url=async_url(), literal_binds=True, dialect_opts={{"paramstyle": "named"}}
        )
        with context.begin_transaction():
            context.run_migrations()


    def do_run_migrations(connection: Connection) -> None:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()


    async def run_async_migrations() -> None:
        section = dict(config.get_section(config.config_ini_section, {{}}))
        section["sqlalchemy.url"] = async_url()
        connectable = async_engine_from_config(
            section, prefix="sqlalchemy.", poolclass=pool.NullPool
        )
        async with connectable.connect() as connection:
            await connection.run_sync(do_run_migrations)
        await connectable.dispose()


    if context.is_offline_mode():
        run_migrations_offline()
    else:
        asyncio.run(run_async_migrations())
"""


# --------------------------------------------------------------------------- 1-3: own engine


def test_env_py_with_its_own_engine_on_the_target_rolls_back(
    database: TestDatabase,
    alembic_project: Path,
    tmp_path: Path,
    cli_env: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = head_project(database, alembic_project, tmp_path)
    assert "email" not in columns(project)
    write_env_py(alembic_project, OWN_ENGINE_ENV_PY)
    monkeypatch.setenv("APP_DB_URL", sa_url(database))

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER
    assert doc["revision_after"] == REV_TIER
    assert "email" in columns(project)


def test_env_py_with_its_own_engine_on_another_database_is_refused(
    database: TestDatabase,
    alembic_project: Path,
    tmp_path: Path,
    cli_env: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = head_project(database, alembic_project, tmp_path)
    with temporary_database(database.server, prefix="other") as other_db:
        (tmp_path / "other").mkdir()
        other = head_project(other_db, alembic_project, tmp_path / "other")
        write_env_py(alembic_project, OWN_ENGINE_ENV_PY)
        monkeypatch.setenv("APP_DB_URL", sa_url(other_db))
        before, other_before = snapshot(project), snapshot(other)

        result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

        # Neither database changed, whatever the exit code says.
        assert snapshot(project) == before
        assert snapshot(other) == other_before
        assert project.revision() == other.revision() == REV_DROP_EMAIL
        # A connection elsewhere is a safety guard's refusal (7), naming env.py and where
        # it connects.
        assert result.exit_code == 7, doc["message"]
        assert "env.py" in doc["message"], doc["message"]
        assert other_db.name in doc["message"], doc["message"]


def _schema_rollback_flags() -> set[str]:
    """The options ``rollback schema`` has (--no-rehearsal is newer than this file)."""
    result = CliRunner().invoke(cli, ["rollback", "schema", "--help"])
    return set(re.findall(r"--[a-z][a-z-]+", result.output))


def _run_watched(args: list[str], env: dict[str, str], db: TestDatabase, limit: float) -> Run:
    """The CLI as a process of its own; past ``limit`` seconds, what its sessions wait on
    is recorded, the process group is killed and the test fails with both."""
    argv = [sys.executable, "-m", "rollback_cli", *args]
    with subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            waiting = db.server.query(
                "SELECT application_name, wait_event_type, left(query, 120) "
                "FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                (db.name,),
            )
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            steps = [line for line in stderr.splitlines() if '"step' in line][-3:]
            pytest.fail(
                f"still running after {limit:.0f}s; sessions waiting on a lock: {waiting!r}; "
                "last step events:\n" + "\n".join(steps)
            )
    return Run(proc.returncode, stdout, stderr)


@pytest.mark.parametrize("scope", ["as-given", "downgrade-only"])
def test_timeouts_reach_the_engine_env_py_builds(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict, scope: str
) -> None:
    """``as-given``: the command as an operator types it, every wait bounded.
    ``downgrade-only``: no safety backup, no rehearsal: only env.py's own engine can meet
    the lock, so only the run's timeouts on that engine can end the wait."""
    project = head_project(database, alembic_project, tmp_path)
    write_env_py(alembic_project, OWN_ENGINE_ENV_PY)
    env = {**cli_env, "APP_DB_URL": sa_url(database)}  # no timeouts of its own in the URL
    extra: list[str] = []
    if scope == "downgrade-only":
        extra = ["--no-safety-backup"]
        if "--no-rehearsal" in _schema_rollback_flags():
            extra.append("--no-rehearsal")
    args = [*project.base_args(), "--json", "rollback", "schema", "--to-revision", REV_TIER]
    holder = database.connect(autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        run = _run_watched([*args, "--lock-timeout", "1s", *extra], env, database, limit=20)
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()

    assert elapsed < 15, f"took {elapsed:.1f}s\n{run}"
    assert run.exit_code == 5, str(run)
    message = run.json["message"]
    assert "unchanged" in message, message
    if scope == "downgrade-only":
        assert "lock_timeout" in message, message
    assert project.revision() == REV_DROP_EMAIL
    assert "email" not in columns(project)


# --------------------------------------------------------------------------- 4: logging, stdout


def test_env_py_taking_over_logging_and_stdout_leaves_json_and_log_intact(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> None:
    project = head_project(database, alembic_project, tmp_path)
    write_env_py(alembic_project, LOGGING_ENV_PY)
    replace_downgrade(
        alembic_project,
        REV_DROP_EMAIL,
        """
        print("manual step: tell support the email column is back, empty")
        op.add_column("customers", sa.Column("email", sa.Text, nullable=True))
        op.create_unique_constraint("customers_email_key", "customers", ["email"])
        """,
    )
    args = project.base_args()

    run = run_subprocess(
        [*args, "--json", "rollback", "schema", "--to-revision", REV_TIER], cli_env
    )

    assert run.exit_code == 0, str(run)
    doc = json.loads(run.stdout)  # one JSON document, nothing else
    assert doc["revision_after"] == REV_TIER
    assert "manual step" not in run.stdout and "env.py loaded" not in run.stdout
    assert project.revision() == REV_TIER
    assert "email" in columns(project)
    (log_file,) = sorted(project.log_dir.glob("*.log"))
    events = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    assert events[-1]["event"] == "audit", events[-1]
    assert events[-1]["exit_code"] == 0
    assert any(e["event"] == "downgrade ran" for e in events)
    assert run.stderr_events()[-1]["event"] == "audit"

    status = run_subprocess([*args, "status", "--json"], cli_env)
    assert status.exit_code in (0, 7), str(status)  # whatever the verdict: parseable
    status_doc = json.loads(status.stdout)
    assert status_doc["revision_after"] == REV_TIER, status_doc
    assert log_events(project)[-1]["event"] == "audit"


# --------------------------------------------------------------------------- 5: online only

ONLINE_DOWNGRADES = {
    # the downgrade inspects the live table before it acts
    "inspect": """
        bind = op.get_bind()
        names = [c["name"] for c in sa.inspect(bind).get_columns("customers")]
        if "email" not in names:
            op.add_column("customers", sa.Column("email", sa.Text, nullable=True))
            op.create_unique_constraint("customers_email_key", "customers", ["email"])
        op.execute(f"COMMENT ON TABLE customers IS 'had {len(names)} columns'")
        """,
    # the downgrade counts the rows it is about to touch
    "count": """
        count = op.get_bind().execute(sa.text("SELECT count(*) FROM customers")).scalar()
        op.add_column("customers", sa.Column("email", sa.Text, nullable=True))
        op.create_unique_constraint("customers_email_key", "customers", ["email"])
        op.execute(f"COMMENT ON TABLE customers IS 'had {int(count)} rows'")
        """,
}


@pytest.mark.parametrize("kind", sorted(ONLINE_DOWNGRADES))
def test_downgrade_reading_the_live_connection_is_online_only_not_irreversible(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict, kind: str
) -> None:
    project = head_project(database, alembic_project, tmp_path)
    replace_downgrade(alembic_project, REV_DROP_EMAIL, ONLINE_DOWNGRADES[kind])
    before = snapshot(project)

    result, doc = project.run_json("--dry-run", "rollback", "schema", "--to-revision", REV_TIER)

    assert result.exit_code == 0, result.stderr
    (step,) = doc["reverted"]
    assert step["revision"] == REV_DROP_EMAIL
    assert step["irreversible"] is None, step
    assert step["online_only"], step
    assert any("online only" in w for w in doc["warnings"]), doc["warnings"]
    plan_text = json.dumps(doc["plan"])
    assert "online only" in plan_text, plan_text
    assert snapshot(project) == before

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER
    assert "email" in columns(project)
    comment = project.db.query("SELECT obj_description('customers'::regclass, 'pg_class')")
    # what the downgrade read from the live database: 4 columns at head, 20 seeded rows
    assert comment == [("had 4 columns" if kind == "inspect" else "had 20 rows",)]


# --------------------------------------------------------------------------- 6: DROP CONSTRAINT


def test_drop_constraint_is_not_reported_as_a_column_drop(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> None:
    project = head_project(database, alembic_project, tmp_path)
    replace_downgrade(
        alembic_project,
        REV_DROP_EMAIL,
        """
        op.add_column("customers", sa.Column("email", sa.Text, nullable=True))
        op.create_unique_constraint("customers_email_key", "customers", ["email"])
        op.execute('ALTER TABLE "orders" DROP CONSTRAINT "orders_amount_check"')
        """,
    )
    replace_downgrade(
        alembic_project,
        REV_TIER,
        """
        op.drop_constraint("customers_tier_check", "customers", type_="check")
        op.execute("alter table customers drop constraint if exists customers_tier_check")
        op.drop_column("customers", "tier")
        """,
    )

    result, doc = project.run_json("--dry-run", "rollback", "schema", "--to-revision", REV_SEED)

    assert result.exit_code == 0, result.stderr
    drops = {step["revision"]: step["drops"] for step in doc["reverted"]}
    assert drops == {REV_DROP_EMAIL: [], REV_TIER: ["column customers.tier"]}, drops
    assert "DROP CONSTRAINT" in "".join(s["sql"] for s in doc["reverted"]).upper()
    assert not any("constraint" in w.lower() for w in doc["warnings"]), doc["warnings"]

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_SEED)

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_SEED
    assert "tier" not in columns(project) and "email" in columns(project)


# --------------------------------------------------------------------------- 7: privileges


def test_swap_without_pg_signal_backend_names_it_not_createdb(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> None:
    server = database.server
    role = f"ci_{uuid.uuid4().hex[:8]}"
    password = "ci-Pa55:w/rd"
    server.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'")
    server.execute(f"ALTER DATABASE {database.name} OWNER TO {role}")
    try:
        db = RoleDatabase(name=database.name, server=server, role=role, password=password)
        project = tier_project(db, alembic_project, tmp_path)
        backup = project.backup()
        before, databases = snapshot(project), project.databases()

        result, doc = project.run_json(
            "rollback", "data", "--backup-file", backup, "--strategy", "swap"
        )

        assert result.exit_code == 7, result.stderr
        message = doc["message"]
        assert "pg_signal_backend" in message, message
        assert f'GRANT pg_signal_backend TO "{role}"' in message, message
        # The role has CREATEDB: no advice about lacking it (such as in-place "for roles
        # without CREATEDB" / "which needs no CREATEDB") belongs in the message.
        assert "without CREATEDB" not in message, message
        assert "CREATEDB" not in message, f"advice about CREATEDB to a role that has it: {message}"
        assert as_run(result).error_line().endswith(message)
        assert snapshot(project) == before
        assert project.databases() == databases
    finally:
        database.drop_all()
        server.execute(f"DROP OWNED BY {role}")
        server.execute(f"DROP ROLE {role}")


# --------------------------------------------------------------------------- 8: async env.py


def _async_driver() -> str | None:
    for name in ("asyncpg", "psycopg"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


ASYNC_DRIVER = _async_driver()


# The test id says which case ran: the async driver's name, or "no-async-driver".
@pytest.mark.parametrize("driver", [ASYNC_DRIVER or "no-async-driver"])
def test_async_env_py(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict, driver: str
) -> None:
    """With an async driver installed the downgrade runs through ``run_sync``; without one
    (nothing is installed for this test) the tool says which driver is missing, in one
    line, and changes nothing."""
    project = head_project(database, alembic_project, tmp_path)
    write_env_py(alembic_project, ASYNC_ENV_PY.format(driver=ASYNC_DRIVER or "asyncpg"))
    before = snapshot(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER)

    if ASYNC_DRIVER is not None:
        assert result.exit_code == 0, result.stderr
        assert project.revision() == REV_TIER
        assert "email" in columns(project)
        return
    assert result.exit_code not in (0, 1), result.stderr  # a documented failure, not a crash
    message = doc["message"]
    assert "asyncpg" in message, message
    assert "\n" not in message and "Traceback" not in result.stderr, result.stderr
    assert as_run(result).error_line().endswith(message)
    assert snapshot(project) == before
