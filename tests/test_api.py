"""The Python API (rollback_cli.api) called directly, with no command line involved, on real
PostgreSQL 15 and 18 with the example Alembic project.

Each test reads like a runbook line written as a script: build a Target and a StorageConfig,
call one function, look at the database and at the typed result it returned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from rollback_cli import api
from rollback_cli.errors import ExitCode, Refused
from rollback_cli.postgres import registry
from rollback_cli.postgres.names import SCRATCH_MARK, derived_name
from rollback_cli.settings import RunOptions, StorageConfig, Target
from tests.rollback_helpers import (
    REV_DROP_EMAIL,
    REV_SEED,
    REV_TIER,
    Project,
    tier_project,
)
from tests.servers import TestDatabase

CHECK_KEYS = {"check", "ok", "name", "status", "detail"}


@pytest.fixture
def project(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Project:
    """The example project at the tier revision, on each server; no DATABASE_URL/PG* leak in."""
    return tier_project(database, alembic_project, tmp_path)


def plant_stray_scratch(db: TestDatabase) -> str:
    """A scratch database with our record, left by a run whose session has ended."""
    stray = derived_name(db.name, SCRATCH_MARK)
    db.server.create_database(stray)
    conn = psycopg2.connect(db.server.url("postgres"))
    conn.autocommit = True
    try:
        record = registry.new_record(conn, registry.SCRATCH, db.name, "deadrun")
        registry.write(conn, stray, record)
    finally:
        conn.close()  # the recorded session is gone: the run has ended
    return stray


def target_of(project: Project, environment: str = "staging") -> Target:
    return Target.resolve(
        project.db.url,
        environment=environment,
        pg_bin_dir=project.db.server.bin_dir,
        alembic_config=project.alembic_ini,
    )


def storage_of(project: Project) -> StorageConfig:
    return StorageConfig(backup_dir=project.backup_dir)


def round_trips_as_json(doc: dict[str, Any]) -> bool:
    return bool(json.loads(json.dumps(doc)) == doc)


def run_python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (no pytest, no click loaded by other tests)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def project_args(project: Project) -> list[str]:
    return [
        project.db.url,
        str(project.backup_dir),
        str(project.db.server.bin_dir),
        str(project.alembic_ini),
    ]


# A backup and a data rollback through the lazily re-exported names of the package.
_NO_CLICK_SCENARIO = """
    import json, sys
    from pathlib import Path

    import rollback_cli

    url, backup_dir, bin_dir, ini = sys.argv[1:5]
    target = rollback_cli.Target.resolve(
        url, environment="staging", pg_bin_dir=Path(bin_dir), alembic_config=Path(ini)
    )
    storage = rollback_cli.StorageConfig(backup_dir=Path(backup_dir))
    created = rollback_cli.backup_create(target, storage)
    result = rollback_cli.rollback_data(target, storage, created.backup.key)
    print(json.dumps({
        "click": sorted(m for m in sys.modules if m.split(".")[0] == "click"),
        "kept_database": result.kept_database,
    }))
"""


def test_backup_then_data_rollback_from_python(project: Project, cli_env: dict[str, str]) -> None:
    target, storage = target_of(project), storage_of(project)
    data_before = project.data_fingerprint()

    created = api.backup_create(target, storage)
    assert created.backup is not None and created.plan is None
    backup_doc = created.to_document()
    assert round_trips_as_json(backup_doc)
    assert backup_doc["backup_key"] == created.backup.key
    assert Path(backup_doc["backup_file"]).is_file()
    assert backup_doc["revision_before"] == backup_doc["revision_after"] == REV_TIER
    counts = backup_doc["row_counts"]
    assert counts["public.customers"] == 20 and counts["public.orders"] == 50

    project.db.execute("DELETE FROM orders WHERE id % 2 = 0; UPDATE customers SET name = 'x'")
    assert project.data_fingerprint() != data_before

    result = api.rollback_data(target, storage, created.backup.key)
    assert project.data_fingerprint() == data_before
    assert result.kind == "data"
    assert result.kept_database is not None
    assert result.kept_database in project.databases()
    assert result.safety_backup is not None
    assert result.revision_before == result.revision_after == REV_TIER
    assert project.revision() == REV_TIER

    doc = result.to_document()
    assert round_trips_as_json(doc)
    assert doc["revision_before"] == REV_TIER and doc["revision_after"] == REV_TIER
    assert doc["kept_database"] == result.kept_database
    assert doc["backup_used"] and doc["backup_file"]
    assert doc["validation"] and all(c["ok"] for c in doc["validation"])

    # The same scenario in a fresh interpreter: the API works without click ever loaded.
    run = run_python(_NO_CLICK_SCENARIO, *project_args(project), env=cli_env)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["click"] == []
    assert out["kept_database"] in project.databases()
    assert project.data_fingerprint() == data_before


def test_schema_rollback_from_python(project: Project) -> None:
    project.upgrade(REV_DROP_EMAIL)  # head: the bad migration dropped customers.email
    target, storage = target_of(project), storage_of(project)

    result = api.rollback_schema(target, storage, to_revision=REV_TIER)
    assert project.revision() == REV_TIER
    assert result.kind == "schema"
    assert result.revision_before == REV_DROP_EMAIL and result.revision_after == REV_TIER
    assert [step["revision"] for step in result.reverted] == [REV_DROP_EMAIL]
    columns = {
        r[0]
        for r in project.db.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'"
        )
    }
    assert "email" in columns
    # The safety backup of the state before the downgrade, in the configured storage.
    safety = result.safety_backup
    assert safety is not None
    assert safety.manifest.alembic_revision == REV_DROP_EMAIL
    assert safety.local_path is not None and safety.local_path.is_file()
    assert project.backup_dir.resolve() in safety.local_path.resolve().parents
    doc = result.to_document()
    assert round_trips_as_json(doc)
    assert doc["revision_after"] == REV_TIER and doc["backup_file"]
    assert result.kept_database is None  # a downgrade keeps no database copy


def test_api_guards_protected_environments(project15: Project) -> None:
    project = project15
    production = target_of(project, "production")
    storage = storage_of(project)
    backup = api.backup_create(production, storage).backup  # reading needs no confirmation
    assert backup is not None
    # A stray scratch database that cleanup-artifacts would drop: one a dead run made.
    stray = plant_stray_scratch(project.db)
    project.db.execute("DELETE FROM orders")
    data_before, schema_before = project.data_fingerprint(), project.schema_dump()
    databases_before, files_before = project.databases(), project.files()
    assert stray in databases_before

    refusals: dict[str, Callable[[], object]] = {
        "data": lambda: api.rollback_data(production, storage, backup.key),
        # The data the downgrade drops is accepted here, so the confirmation is what refuses.
        "schema": lambda: api.rollback_schema(
            production, storage, REV_SEED, api.RollbackOptions(accept_data_loss=True)
        ),
        "cleanup-artifacts": lambda: api.cleanup_artifacts(production, storage, keep_days=0),
    }
    for what, call in refusals.items():
        with pytest.raises(Refused) as caught:
            call()
        refused = caught.value
        assert refused.exit_code == ExitCode.REFUSED and int(refused.exit_code) == 7, what
        assert "production" in refused.message and "confirmation" in refused.message, what

    # Without --accept-data-loss, the rehearsal's count of the live data the downgrade
    # would drop refuses it first, confirmed or not.
    with pytest.raises(Refused) as caught:
        api.rollback_schema(production, storage, REV_SEED, run=RunOptions(yes=True))
    assert "--accept-data-loss" in caught.value.one_line()

    assert project.revision() == REV_TIER
    assert project.data_fingerprint() == data_before
    assert project.schema_dump() == schema_before
    assert project.databases() == databases_before
    assert project.files() == files_before  # no safety backup was taken either

    dry = api.cleanup_artifacts(
        production, storage, keep_days=0, run=RunOptions(yes=True, dry_run=True)
    )
    assert dry.report.databases == [stray]
    assert round_trips_as_json(dry.to_document())
    assert dry.to_document()["databases"] == [stray]
    assert project.databases() == databases_before  # a dry run drops nothing

    # Confirmed, the data rollback goes ahead.
    result = api.rollback_data(production, storage, backup.key, run=RunOptions(yes=True))
    assert project.db.query("SELECT count(*) FROM orders") == [(50,)]
    assert result.kept_database in project.databases()


def test_api_dry_run_changes_nothing(project: Project) -> None:
    target, storage = target_of(project), storage_of(project)
    created = api.backup_create(target, storage)
    assert created.backup is not None
    project.db.execute("DELETE FROM orders WHERE id % 2 = 0")
    data_before, schema_before = project.data_fingerprint(), project.schema_dump()
    databases_before, files_before = project.databases(), project.files()

    result = api.rollback_data(target, storage, created.backup.key, run=RunOptions(dry_run=True))
    assert result.plan
    steps = [s["step"] for s in result.plan]
    assert {"verify", "safety-backup", "restore", "swap", "validate"} <= set(steps)
    assert all(s["detail"] for s in result.plan)
    assert result.kept_database is None and result.safety_backup is None
    assert result.unavailable_ms is None
    doc = result.to_document()
    assert round_trips_as_json(doc) and doc["plan"] == result.plan
    assert doc["kept_database"] is None and doc["backup_file"] is None

    assert project.data_fingerprint() == data_before
    assert project.schema_dump() == schema_before
    assert project.databases() == databases_before == [project.db.name]
    assert project.files() == files_before


_BACKUP_SCENARIO = """
    import sys
    from pathlib import Path

    from rollback_cli import api, log
    from rollback_cli.settings import StorageConfig, Target

    url, backup_dir, bin_dir, ini, configure = sys.argv[1:6]
    if configure == "yes":
        log.configure(log_dir=None, environment="staging", command="x", log_format="json")
    target = Target.resolve(
        url, environment="staging", pg_bin_dir=Path(bin_dir), alembic_config=Path(ini)
    )
    api.backup_create(target, StorageConfig(backup_dir=Path(backup_dir)))
"""


def test_api_is_silent_until_logging_is_configured(
    project15: Project, cli_env: dict[str, str]
) -> None:
    project = project15
    silent = run_python(_BACKUP_SCENARIO, *project_args(project), "no", env=cli_env)
    assert silent.returncode == 0, silent.stderr
    assert silent.stdout == ""
    assert silent.stderr == ""
    assert len(list(project.backup_dir.glob("backup_*.dump"))) == 1

    logged = run_python(_BACKUP_SCENARIO, *project_args(project), "yes", env=cli_env)
    assert logged.returncode == 0, logged.stderr
    assert logged.stdout == ""
    lines = logged.stderr.splitlines()
    assert lines
    events = [json.loads(line) for line in lines]  # every line is a JSON object
    assert all(e["command"] == "x" and e["environment"] == "staging" for e in events)
    assert all(e["run_id"] == events[0]["run_id"] for e in events)
    assert any(e["event"] == "step started" for e in events)
    assert any(e["event"] == "step finished" for e in events)
    assert project.db.server.password not in logged.stderr
    assert len(list(project.backup_dir.glob("backup_*.dump"))) == 2


def test_api_results_to_document(project: Project) -> None:
    target, storage = target_of(project), storage_of(project)
    created = api.backup_create(target, storage)
    assert created.backup is not None
    key = created.backup.key

    listing = api.backup_list(storage, "staging", target)
    doc = listing.to_document()
    assert isinstance(doc, dict) and round_trips_as_json(doc)
    assert set(doc) >= {"outcome", "backups", "kept_databases"}
    assert doc["outcome"] == "success" and doc["kept_databases"] == []
    [row] = doc["backups"]
    assert Path(row["name"]).name == Path(key).name
    assert row["valid"] and row["type"] == "full" and row["alembic_revision"] == REV_TIER
    assert row["created_at"] and row["age_seconds"] is not None

    verified = api.backup_verify(storage, "staging", key, target=target)
    doc = verified.to_document()
    assert isinstance(doc, dict) and round_trips_as_json(doc)
    assert doc["outcome"] == "success"
    assert doc["backup_sha256"] == created.backup.manifest.sha256
    assert doc["revision_after"] == REV_TIER
    assert doc["restore_test"] is None and doc["plan"] is None
    for check in doc["checks"]:
        assert set(check) >= CHECK_KEYS
        assert check["check"] == check["name"] and check["ok"] and check["status"] == "ok"
    assert [c["check"] for c in doc["checks"]] == [
        "manifest",
        "size",
        "signature",
        "sha256",
        "readable",
    ]

    preflight = api.status(target)
    doc = preflight.to_document()
    assert isinstance(doc, dict) and round_trips_as_json(doc)
    assert doc["outcome"] == "success"
    assert doc["revision_before"] == REV_TIER and doc["head_revision"] == REV_DROP_EMAIL
    for check in doc["checks"]:
        assert set(check) >= CHECK_KEYS
    assert {c["name"]: c["status"] for c in doc["checks"]} == {
        "connection": "ok",
        "client": "ok",
        "privileges": "ok",
        "revision": "ok",
        "lock": "ok",
        "sessions": "ok",
    }

    validation = api.validate(target, storage, backup_ref=key, expected_revision=REV_TIER)
    doc = validation.to_document()
    assert isinstance(doc, dict) and round_trips_as_json(doc)
    assert doc["outcome"] == "success"
    assert doc["validation"]
    for check in doc["validation"]:
        assert set(check) >= CHECK_KEYS and check["ok"]
    assert {"connectivity", "revision"} <= {c["check"] for c in doc["validation"]}

    cleaned = api.backup_cleanup(
        storage, "staging", older_than_seconds=0, keep_last=1, run=RunOptions(dry_run=True)
    )
    assert cleaned.to_document() == {"removed": [], "kept": [key]}
    artifacts = api.cleanup_artifacts(target, storage, run=RunOptions(dry_run=True))
    assert artifacts.to_document() == {
        "databases": [],
        "tables": [],
        "files": [],
        "kept_databases": [],
    }
