"""Schema rollbacks of Alembic projects shaped like real applications, on PostgreSQL 15
and 18: each runs the dry run (nothing changes, the real SQL shown), the rehearsal, the
real rollback, and the application's own ``alembic upgrade head`` afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.alembic_shapes import Revision, Shape, alembic_command
from tests.rollback_helpers import Project
from tests.servers import TestDatabase
from tests.test_migration_environments import sa_url

CREATE_ITEMS = Revision(
    "a1000000c0de",
    None,
    'op.create_table("items", sa.Column("id", sa.Integer, primary_key=True), schema=SCHEMA)',
    'op.drop_table("items", schema=SCHEMA)',
)
ADD_NOTE = Revision(
    "b2000000c0de",
    "a1000000c0de",
    'op.add_column("items", sa.Column("note", sa.Text), schema=SCHEMA)\n'
    "op.execute(\"INSERT INTO {} (note) VALUES ('kept')\".format(TABLE))",
    'op.drop_column("items", "note", schema=SCHEMA)',
)


def in_schema(revision: Revision, schema: str | None) -> Revision:
    table = f"{schema}.items" if schema else "items"
    prefix = f"SCHEMA = {schema!r}\nTABLE = {table!r}\n"
    return Revision(
        revision.revision,
        revision.down,
        prefix + revision.upgrade,
        prefix + revision.downgrade,
        labels=revision.labels,
        location=revision.location,
    )


def project_for(db: TestDatabase, ini: Path, tmp_path: Path, name: str = "work") -> Project:
    workdir = tmp_path / name
    workdir.mkdir()
    return Project(db, ini, workdir)


def version_rows(db: TestDatabase, table: str) -> list[str]:
    return sorted(r[0] for r in db.query(f"SELECT version_num FROM {table}"))


def state(project: Project) -> tuple[str, dict[str, str]]:
    return project.schema_dump(), project.data_fingerprint()


@pytest.fixture
def shape_db(database: TestDatabase, cli_env: dict[str, str]) -> TestDatabase:
    database.execute("CREATE SCHEMA meta")
    database.execute("CREATE SCHEMA app")
    return database


# --------------------------------------------------------------------------- version tables


def test_own_version_table_in_its_own_schema_and_tables_outside_public(
    shape_db: TestDatabase, tmp_path: Path
) -> None:
    shape = Shape(
        tmp_path / "proj",
        [in_schema(CREATE_ITEMS, "app"), in_schema(ADD_NOTE, "app")],
        options={"version_table": "app_version", "version_table_schema": "meta"},
    )
    ini = shape.write()
    alembic_command(ini, sa_url(shape_db), "upgrade", "head")
    project = project_for(shape_db, ini, tmp_path)
    assert version_rows(shape_db, "meta.app_version") == ["b2000000c0de"]
    before = state(project)

    plan, doc = project.run_json("rollback", "schema", "--to-revision", "a1000000c0de", "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    assert doc["revision_before"] == "b2000000c0de"
    assert any(
        s["step"] == "version-table" and "meta.app_version" in s["detail"] for s in doc["plan"]
    )
    (reverted,) = doc["reverted"]
    assert [(d["schema"], d["table"], d["column"]) for d in reverted["dropped"]] == [
        ("app", "items", "note")
    ]
    assert reverted["rows_at_risk"] == 1
    assert "ACCESS EXCLUSIVE on app.items" in reverted["locks"], reverted["locks"]
    assert state(project) == before

    result, doc = project.run_json("rollback", "schema", "--to-revision", "a1000000c0de")
    assert result.exit_code == 0, result.stderr
    assert version_rows(shape_db, "meta.app_version") == ["a1000000c0de"]
    assert doc["revision_after"] == "a1000000c0de"
    assert "alembic_version" not in [
        r[0] for r in shape_db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    ]

    alembic_command(ini, sa_url(shape_db), "upgrade", "head")
    assert version_rows(shape_db, "meta.app_version") == ["b2000000c0de"]


def test_two_script_trees_in_one_database_each_rolled_back_on_its_own(
    shape_db: TestDatabase, tmp_path: Path
) -> None:
    url = sa_url(shape_db)
    main = Shape(tmp_path / "main", [in_schema(CREATE_ITEMS, None), in_schema(ADD_NOTE, None)])
    plugin_create = Revision(
        "f1000000fab0",
        None,
        'op.create_table("ab_user", sa.Column("id", sa.Integer, primary_key=True))',
        'op.drop_table("ab_user")',
    )
    plugin_add = Revision(
        "f2000000fab0",
        "f1000000fab0",
        'op.add_column("ab_user", sa.Column("email", sa.Text))',
        'op.drop_column("ab_user", "email")',
    )
    plugin = Shape(
        tmp_path / "plugin",
        [plugin_create, plugin_add],
        options={"version_table": "alembic_version_fab"},
    )
    main_ini, plugin_ini = main.write(), plugin.write()
    alembic_command(main_ini, url, "upgrade", "head")
    alembic_command(plugin_ini, url, "upgrade", "head")
    plugin_project = project_for(shape_db, plugin_ini, tmp_path)

    result, doc = plugin_project.run_json("rollback", "schema", "--to-revision", "f1000000fab0")

    assert result.exit_code == 0, result.stderr
    assert version_rows(shape_db, "alembic_version_fab") == ["f1000000fab0"]
    assert version_rows(shape_db, "alembic_version") == ["b2000000c0de"]  # the other tree
    assert [d["revision"] for d in doc["reverted"]] == ["f2000000fab0"]
    alembic_command(plugin_ini, url, "upgrade", "head")
    assert version_rows(shape_db, "alembic_version_fab") == ["f2000000fab0"]


def test_version_locations_env_py_adds_at_run_time(shape_db: TestDatabase, tmp_path: Path) -> None:
    """The revisions live in a directory only env.py knows about."""
    hidden = in_schema(ADD_NOTE, None)
    hidden.location = "plugins"
    shape = Shape(
        tmp_path / "proj",
        [in_schema(CREATE_ITEMS, None), hidden],
        preamble="""
        from pathlib import Path
        context.script.version_locations = [
            str(Path(__file__).parent / "versions"),
            str(Path(__file__).parent / "plugins"),
        ]
        """,
    )
    ini = shape.write()
    url = sa_url(shape_db)
    alembic_command(ini, url, "upgrade", "head")
    project = project_for(shape_db, ini, tmp_path)

    plan, doc = project.run_json("rollback", "schema", "--to-revision", "a1000000c0de", "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    assert [r["revision"] for r in doc["reverted"]] == ["b2000000c0de"]

    result, _ = project.run_json("rollback", "schema", "--to-revision", "a1000000c0de")
    assert result.exit_code == 0, result.stderr
    assert project.revision() == "a1000000c0de"
    alembic_command(ini, url, "upgrade", "head")
    assert project.revision() == "b2000000c0de"


# --------------------------------------------------------------------------- branches


def branched(tmp_path: Path) -> Shape:
    """base ← billing1 ← billing2 (branch billing) and base ← search1 (branch search)."""
    return Shape(
        tmp_path / "proj",
        [
            Revision(
                "0000base0000",
                None,
                'op.create_table("t0", sa.Column("id", sa.Integer))',
                'op.drop_table("t0")',
            ),
            Revision(
                "b111billing1",
                "0000base0000",
                'op.create_table("bills", sa.Column("id", sa.Integer))',
                'op.drop_table("bills")',
                labels=("billing",),
            ),
            Revision(
                "b222billing2",
                "b111billing1",
                'op.add_column("bills", sa.Column("total", sa.Integer))',
                'op.drop_column("bills", "total")',
            ),
            Revision(
                "5111search01",
                "0000base0000",
                'op.create_table("docs", sa.Column("id", sa.Integer))',
                'op.drop_table("docs")',
                labels=("search",),
            ),
        ],
    )


@pytest.mark.parametrize("target", ["b111billing1", "billing@b111billing1", "b111"])
def test_rolling_back_one_branch_keeps_the_other_head(
    shape_db: TestDatabase, tmp_path: Path, target: str
) -> None:
    ini = branched(tmp_path).write()
    url = sa_url(shape_db)
    alembic_command(ini, url, "upgrade", "heads")
    project = project_for(shape_db, ini, tmp_path)
    assert version_rows(shape_db, "alembic_version") == ["5111search01", "b222billing2"]
    before = state(project)

    plan, doc = project.run_json("rollback", "schema", "--to-revision", target, "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    assert [r["revision"] for r in doc["reverted"]] == ["b222billing2"]
    assert doc["rehearsal"]["heads_after"] == ["5111search01", "b111billing1"]
    assert state(project) == before

    result, doc = project.run_json("rollback", "schema", "--to-revision", target)
    assert result.exit_code == 0, result.stderr
    assert version_rows(shape_db, "alembic_version") == ["5111search01", "b111billing1"]
    alembic_command(ini, url, "upgrade", "heads")
    assert version_rows(shape_db, "alembic_version") == ["5111search01", "b222billing2"]


@pytest.mark.parametrize(
    ("target", "words"), [("heads", "name one of them"), ("nope@head", "unknown")]
)
def test_targets_naming_several_revisions_or_none_are_usage_errors(
    shape_db: TestDatabase, tmp_path: Path, target: str, words: str
) -> None:
    ini = branched(tmp_path).write()
    alembic_command(ini, sa_url(shape_db), "upgrade", "heads")
    project = project_for(shape_db, ini, tmp_path)
    before = state(project)

    result, doc = project.run_json("rollback", "schema", "--to-revision", target)

    assert result.exit_code == 2, result.stderr
    assert words in doc["message"]
    assert state(project) == before


# --------------------------------------------------------------------------- non-transactional


def test_a_downgrade_outside_a_transaction_is_planned_as_not_atomic(
    shape_db: TestDatabase, tmp_path: Path
) -> None:
    concurrently = Revision(
        "c3000000c0de",
        "b2000000c0de",
        'op.create_index("ix_items_note", "items", ["note"])',
        """
        with op.get_context().autocommit_block():
            op.drop_index("ix_items_note", table_name="items", postgresql_concurrently=True)
            op.create_index(
                "ix_items_id_note", "items", ["id", "note"], postgresql_concurrently=True
            )
        """,
    )
    batch = Revision(
        "d4000000c0de",
        "c3000000c0de",
        'op.add_column("items", sa.Column("flag", sa.Boolean))',
        """
        with op.batch_alter_table("items") as batch_op:
            batch_op.drop_column("flag")
        """,
    )
    shape = Shape(
        tmp_path / "proj",
        [in_schema(CREATE_ITEMS, None), in_schema(ADD_NOTE, None), concurrently, batch],
    )
    ini = shape.write()
    url = sa_url(shape_db)
    alembic_command(ini, url, "upgrade", "head")
    project = project_for(shape_db, ini, tmp_path)
    before = state(project)

    plan, doc = project.run_json("rollback", "schema", "--to-revision", "b2000000c0de", "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    reverted = {r["revision"]: r for r in doc["reverted"]}
    assert any("CONCURRENTLY" in sql for sql in reverted["c3000000c0de"]["executed_sql"])
    assert any("not atomic" in w and "c3000000c0de" in w for w in doc["warnings"]), doc["warnings"]
    assert [d["column"] for d in reverted["d4000000c0de"]["dropped"]] == ["flag"]
    assert state(project) == before

    result, _ = project.run_json("rollback", "schema", "--to-revision", "b2000000c0de")
    assert result.exit_code == 0, result.stderr
    assert project.revision() == "b2000000c0de"
    indexes = [
        r[0] for r in shape_db.query("SELECT indexname FROM pg_indexes WHERE tablename = 'items'")
    ]
    assert "ix_items_id_note" in indexes and "ix_items_note" not in indexes
    alembic_command(ini, url, "upgrade", "head")
    assert project.revision() == "d4000000c0de"


def test_a_revision_that_depends_on_a_reverted_one_is_reverted_too(
    shape_db: TestDatabase, tmp_path: Path
) -> None:
    """search2 depends_on billing2: rolling billing back to billing1 reverts search2 first,
    as Alembic's own downgrade does."""
    shape = branched(tmp_path)
    shape.revisions.append(
        Revision(
            "5222search02",
            "5111search01",
            'op.add_column("docs", sa.Column("bill_id", sa.Integer))',
            'op.drop_column("docs", "bill_id")',
            depends="b222billing2",
        )
    )
    ini = shape.write()
    url = sa_url(shape_db)
    alembic_command(ini, url, "upgrade", "heads")
    project = project_for(shape_db, ini, tmp_path)
    # Alembic keeps only heads: billing2 is implied by search2, which depends on it.
    assert version_rows(shape_db, "alembic_version") == ["5222search02"]

    plan, doc = project.run_json("rollback", "schema", "--to-revision", "b111billing1", "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    assert [r["revision"] for r in doc["reverted"]] == ["5222search02", "b222billing2"]

    result, _ = project.run_json("rollback", "schema", "--to-revision", "b111billing1")
    assert result.exit_code == 0, result.stderr
    assert version_rows(shape_db, "alembic_version") == ["5111search01", "b111billing1"]
    alembic_command(ini, url, "upgrade", "heads")
    assert version_rows(shape_db, "alembic_version") == ["5222search02"]
