"""Migration environments that try to make a schema or full rollback worse, on real
servers (PostgreSQL 15 and 18).

The tool reads a project's setup by running its env.py once on the live database before
anything else (read-only, like ``alembic current``), rehearses on copies, and in a full
rollback downgrades the restored copy before the swap. None of that may write to the live
database before the real change, or run the copy's downgrade on the live one.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.alembic_shapes import Revision, Shape, alembic_command
from tests.rollback_helpers import REV_DROP_EMAIL, REV_TIER, Project
from tests.servers import TestDatabase, temporary_database
from tests.test_migration_environments import (
    OWN_ENGINE_ENV_PY,
    columns,
    head_project,
    sa_url,
    snapshot,
    write_env_py,
)

# The template env.py with a write of the application's own: before Alembic's work (right
# after configure) or after it.
WRITING_ENV_PY = """
    from alembic import context
    from sqlalchemy import engine_from_config, pool, text

    config = context.config


    def run_migrations_offline() -> None:
        context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()


    def run_migrations_online() -> None:
        engine = engine_from_config(
            config.get_section(config.config_ini_section, {{}}),
            prefix="sqlalchemy.",
            poolclass=pool.NullPool,
        )
        with engine.connect() as connection:
            context.configure(connection=connection)
            with context.begin_transaction():
                {before}
                context.run_migrations()
                {after}


    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()
"""
WRITE = 'connection.execute(text("CREATE TABLE app_audit (at timestamptz DEFAULT now())"))'


@pytest.fixture
def project(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Project:
    return head_project(database, alembic_project, tmp_path)


def audit_tables(project: Project) -> list[str]:
    return [
        r[0]
        for r in project.db.query("SELECT tablename FROM pg_tables WHERE tablename = 'app_audit'")
    ]


def test_an_env_py_writing_after_the_migrations_leaves_a_dry_run_without_change(
    project: Project,
) -> None:
    write_env_py(project.alembic_ini, WRITING_ENV_PY.format(before="pass", after=WRITE))
    before = snapshot(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER, "--dry-run")

    assert result.exit_code == 0, result.stderr
    assert audit_tables(project) == []  # the live database: read only while it was read
    assert snapshot(project) == before
    assert [r["revision"] for r in doc["reverted"]] == [REV_DROP_EMAIL]


def test_an_env_py_writing_before_the_migrations_is_refused_read_only(project: Project) -> None:
    write_env_py(project.alembic_ini, WRITING_ENV_PY.format(before=WRITE, after="pass"))
    before = snapshot(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", REV_TIER, "--dry-run")

    assert result.exit_code == 3, result.stderr
    assert "read-only" in doc["message"] and "env.py" in doc["message"]
    assert audit_tables(project) == []
    assert snapshot(project) == before


def test_full_rollback_with_an_env_py_pointing_at_the_live_database_downgrades_only_the_copy(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env.py builds its own engine on the live database: the downgrade of the restored
    copy is redirected to the copy, and the database that was live (kept after the swap)
    is exactly as it was."""
    backup = project.backup()
    write_env_py(project.alembic_ini, OWN_ENGINE_ENV_PY)
    monkeypatch.setenv("APP_DB_URL", sa_url(project.db))
    before = snapshot(project)

    result, doc = project.run_json(
        "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup
    )

    assert result.exit_code == 0, result.stderr
    assert project.revision() == REV_TIER and "email" in columns(project)
    kept = TestDatabase(name=doc["kept_database"], server=project.db.server)
    assert kept.query("SELECT version_num FROM alembic_version") == [(REV_DROP_EMAIL,)]
    kept_project = Project(kept, project.alembic_ini, project.workdir)
    assert snapshot(kept_project) == before


def test_full_rollback_with_an_env_py_pointing_elsewhere_is_refused(
    project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    backup = project.backup()
    with temporary_database(project.db.server, prefix="other") as other_db:
        (tmp_path / "other").mkdir()
        other = head_project(other_db, project.alembic_ini, tmp_path / "other")
        write_env_py(project.alembic_ini, OWN_ENGINE_ENV_PY)
        monkeypatch.setenv("APP_DB_URL", sa_url(other_db))
        before, other_before = snapshot(project), snapshot(other)
        databases = sorted(project.databases())

        result, doc = project.run_json(
            "rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup
        )

        assert result.exit_code == 7, result.stderr
        assert other_db.name in doc["message"]
        assert snapshot(project) == before and snapshot(other) == other_before
        assert sorted(project.databases()) == databases


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        ("meta", "app_version"),
        ("Odd Schema", 'ver"sion; DROP TABLE items; --'),
        ("meta", "x" * 59),  # Alembic's own primary key name must stay within 63 bytes
    ],
)
def test_hostile_version_table_names_are_identifiers(
    database: TestDatabase, tmp_path: Path, cli_env: dict[str, str], schema: str, table: str
) -> None:
    database.execute(f'CREATE SCHEMA "{schema}"')
    shape = Shape(
        tmp_path / "proj",
        [
            Revision(
                "a1000000c0de",
                None,
                'op.create_table("items", sa.Column("id", sa.Integer))',
                'op.drop_table("items")',
            ),
            Revision(
                "b2000000c0de",
                "a1000000c0de",
                'op.add_column("items", sa.Column("note", sa.Text))',
                'op.drop_column("items", "note")',
            ),
        ],
        options={"version_table": table, "version_table_schema": schema},
    )
    ini = shape.write()
    url = sa_url(database)
    alembic_command(ini, url, "upgrade", "head")
    (tmp_path / "work").mkdir()
    project = Project(database, ini, tmp_path / "work")

    result, _ = project.run_json("rollback", "schema", "--to-revision", "a1000000c0de")

    assert result.exit_code == 0, result.stderr
    quoted = '"{}"."{}"'.format(schema, table.replace('"', '""'))
    assert database.query(f"SELECT version_num FROM {quoted}") == [("a1000000c0de",)]
    assert database.query("SELECT count(*) FROM items") == [(0,)]  # still there
    alembic_command(ini, url, "upgrade", "head")
    assert database.query(f"SELECT version_num FROM {quoted}") == [("b2000000c0de",)]


def test_textwrap_keeps_env_py_valid() -> None:
    source = textwrap.dedent(WRITING_ENV_PY.format(before="pass", after="pass"))
    compile(source, "env.py", "exec")
