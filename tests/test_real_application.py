"""A published application's own migrations: Optuna (installed from PyPI with the test
dependencies), on PostgreSQL 15 and 18.

Optuna keeps its studies in a database whose schema its own code creates and stamps; its
Alembic scripts ship inside the package with a packaged ``alembic.ini`` whose
``script_location = alembic`` is relative to the ini, and several downgrades open an ORM
session on the bind and rewrite rows. The tool rolls its schema back several revisions,
rolls its data back and does a full rollback, and Optuna's own upgrade brings it back to
head each time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from tests.rollback_helpers import Project
from tests.servers import TestDatabase

HEAD = "v3.2.0.a"
# Reverts v3.2.0.a and v3.0.0.d (an ORM session on the bind rewriting rows). Optuna's own
# downgrades further back fail on PostgreSQL with psycopg2 (v3.0.0.c hands numpy floats to
# the driver, then names an attribute its model lacks), with its own commands too.
SEVERAL_BACK = "v3.0.0.c"


def optuna_ini() -> Path:
    return Path(optuna.__file__).parent / "storages" / "_rdb" / "alembic.ini"


def storage_url(db: TestDatabase) -> str:
    return db.url.replace("postgresql://", "postgresql+psycopg2://", 1)


def optuna_alembic(db: TestDatabase, *args: str) -> None:
    """Optuna's Alembic scripts run the way its RDBStorage.upgrade() runs them."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(optuna_ini()))
    config.set_main_option("script_location", str(optuna_ini().parent / "alembic"))
    config.set_main_option("sqlalchemy.url", storage_url(db).replace("%", "%%"))
    getattr(command, args[0])(config, *args[1:])


def write_studies(db: TestDatabase) -> None:
    """Studies written through Optuna's API: trials, parameters, values, user attributes
    and intermediate values, infinite ones included (a downgrade rewrites those)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_url(db), study_name="pricing")

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10, 10)
        trial.report(math.inf if trial.number % 2 else x, step=1)
        trial.set_user_attr("note", f"trial {trial.number}")
        return x * x

    study.optimize(objective, n_trials=6)
    study.set_user_attr("owner", "pricing-team")


def trials(db: TestDatabase) -> int:
    return len(optuna.load_study(study_name="pricing", storage=storage_url(db)).trials)


def upgrade_with_optuna(db: TestDatabase) -> None:
    """The application's own upgrade (what `optuna storage upgrade` runs)."""
    storage = optuna.storages.RDBStorage(storage_url(db), skip_compatibility_check=True)
    try:
        storage.upgrade()
    finally:
        storage.remove_session()
        storage.engine.dispose()


@pytest.fixture
def app(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Project]:
    """A storage whose schema Optuna's migrations made, with studies written through its API."""
    optuna_alembic(database, "upgrade", "head")
    write_studies(database)
    workdir = tmp_path / "work"
    workdir.mkdir()
    project = Project(database, optuna_ini(), workdir)
    assert project.revision() == HEAD
    yield project


def test_schema_rollback_of_several_revisions_then_optunas_own_upgrade(app: Project) -> None:
    before = app.schema_dump(), app.data_fingerprint()

    plan, doc = app.run_json("rollback", "schema", "--to-revision", SEVERAL_BACK, "--dry-run")
    assert plan.exit_code == 0, plan.stderr
    assert [r["revision"] for r in doc["reverted"]] == ["v3.2.0.a", "v3.0.0.d"]
    assert all(not r["irreversible"] for r in doc["reverted"])
    # The ORM-session downgrade shows what it really ran.
    (orm,) = [r for r in doc["reverted"] if r["revision"] == "v3.0.0.d"]
    assert any("trial_values" in sql for sql in orm["executed_sql"]), orm
    assert (app.schema_dump(), app.data_fingerprint()) == before

    result, doc = app.run_json("rollback", "schema", "--to-revision", SEVERAL_BACK)
    assert result.exit_code == 0, result.stderr
    assert app.revision() == SEVERAL_BACK
    assert doc["revision_after"] == SEVERAL_BACK

    upgrade_with_optuna(app.db)
    assert app.revision() == HEAD
    assert trials(app.db) == 6


def test_data_rollback_brings_a_deleted_study_back(app: Project) -> None:
    backup = app.backup()
    optuna.delete_study(study_name="pricing", storage=storage_url(app.db))

    result = app.run("rollback", "data", "--backup-file", backup)

    assert result.exit_code == 0, result.stderr
    assert trials(app.db) == 6
    assert app.revision() == HEAD
    upgrade_with_optuna(app.db)  # already at head: nothing to do, no error


def test_full_rollback_then_optunas_own_upgrade(app: Project) -> None:
    backup = app.backup()
    optuna.delete_study(study_name="pricing", storage=storage_url(app.db))

    result, doc = app.run_json(
        "rollback", "full", "--to-revision", "v3.0.0.d", "--backup-file", backup
    )

    assert result.exit_code == 0, result.stderr
    assert app.revision() == "v3.0.0.d"
    assert [r["revision"] for r in doc["reverted"]] == ["v3.2.0.a"]
    upgrade_with_optuna(app.db)
    assert app.revision() == HEAD
    assert trials(app.db) == 6


def test_a_downgrade_that_fails_on_the_applications_own_schema_is_caught_in_rehearsal(
    database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A storage Optuna created with create_all() names the study_id index differently
    from its migrations, so its own v3.2.0.a downgrade fails there. The rehearsal finds
    that on the copy: exit 5, the live storage untouched; Optuna's own downgrade fails the
    same way (the application's, not the tool's)."""
    write_studies(database)  # RDBStorage on an empty database: create_all() and stamp head
    workdir = tmp_path / "work"
    workdir.mkdir()
    project = Project(database, optuna_ini(), workdir)
    before = project.revision(), project.schema_dump(), project.data_fingerprint()

    result, doc = project.run_json("rollback", "schema", "--to-revision", SEVERAL_BACK)

    assert result.exit_code == 5, result.stderr
    assert "rehearsal" in doc["message"] and "trials_study_id_key" in doc["message"]
    assert (project.revision(), project.schema_dump(), project.data_fingerprint()) == before
    with pytest.raises(Exception, match="trials_study_id_key"):
        optuna_alembic(database, "downgrade", SEVERAL_BACK)
