"""The original script's command lines, verbatim, with ``db-rollback`` in place of
``python scripts/rollback/rollback_procedures.py``."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from rollback_cli.cli.legacy import translate
from rollback_cli.errors import ExitCode
from tests.cli_helpers import (
    BACKUP_NAME,
    Run,
    Workspace,
    invoke,
    read_manifest,
    run_subprocess,
    seed_shop,
    write_manifest,
)
from tests.servers import TestDatabase

REV_SEED = "8d4b6a0c9e12"
REV_TIER = "b7e2f5a91c38"


@pytest.fixture
def ws(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database)
    return Workspace(database, tmp_path / "work")


def env_of(ws: Workspace) -> dict[str, str]:
    """How the original script was configured: environment variables only."""
    return {
        "DATABASE_URL": ws.url,
        "DB_ROLLBACK_BACKUP_DIR": str(ws.backup_dir),
        "DB_ROLLBACK_LOG_DIR": str(ws.log_dir),
        "DB_ROLLBACK_PG_BIN_DIR": str(ws.db.server.bin_dir),
        "DB_ROLLBACK_LOG_FORMAT": "json",
    }


def legacy(ws: Workspace, line: str) -> Run:
    """Run one legacy command line (split on spaces) in-process."""
    return invoke(line.split(), env=env_of(ws))


def backups_of(ws: Workspace) -> list[Path]:
    return sorted(p for p in ws.backup_dir.glob("backup_*") if not p.name.endswith(".json"))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--create-backup", "backup create"),
        ("--create-backup --type schema", "backup create --type schema"),
        ("--create-backup --type=data", "backup create --type data"),
        ("--environment production --create-backup", "--environment production backup create"),
        ("--create-backup --environment production", "--environment production backup create"),
        ("--list-backups", "backup list"),
        ("--verify-backup F.dump", "backup verify F.dump"),
        ("--verify-backup=F.dump --restore-test", "backup verify F.dump --restore-test"),
        ("--cleanup-backups 30", "backup cleanup --older-than 30d"),
        ("--cleanup-backups 7 --dry-run", "--dry-run backup cleanup --older-than 7d"),
        ("--cleanup", "cleanup-artifacts"),
        ("--type schema --to-revision abc", "rollback schema --to-revision abc"),
        ("--type data --backup-file F", "rollback data --backup-file F"),
        (
            "--type full --to-revision abc --backup-file F --environment prod --dry-run",
            "--environment prod --dry-run rollback full --to-revision abc --backup-file F",
        ),
        (
            "--type data --backup-file F --strategy in-place",
            "rollback data --backup-file F --strategy in-place",
        ),
        ("backup create --type schema", "backup create --type schema"),  # not legacy: unchanged
    ],
)
def test_translation(line: str, expected: str) -> None:
    assert translate(line.split()) == expected.split()


def test_create_backup(ws: Workspace) -> None:
    run = legacy(ws, "--create-backup --environment staging")
    assert run.exit_code == 0, str(run)
    (backup,) = backups_of(ws)
    assert BACKUP_NAME.match(backup.name)
    assert read_manifest(backup)["type"] == "full"


@pytest.mark.parametrize("kind", ["schema", "data", "full"])
def test_create_backup_with_type(ws: Workspace, kind: str) -> None:
    run = legacy(ws, f"--create-backup --type {kind} --environment staging")
    assert run.exit_code == 0, str(run)
    (backup,) = backups_of(ws)
    assert read_manifest(backup)["type"] == kind


def test_console_script_verbatim(ws: Workspace, cli_env: dict[str, str]) -> None:
    env = {**cli_env, **env_of(ws)}
    run = run_subprocess(["--create-backup", "--environment", "qa"], env, module=False)
    assert run.exit_code == 0, str(run)
    (backup,) = backups_of(ws)
    assert backup.name.startswith("backup_qa_")
    listed = run_subprocess(["--list-backups", "--environment", "qa"], env, module=False)
    assert listed.exit_code == 0, str(listed)
    assert backup.name in listed.stdout
    verified = run_subprocess(["--verify-backup", str(backup)], env, module=False)
    assert verified.exit_code == 0, str(verified)
    assert "backup OK" in verified.stdout


def test_list_backups(ws: Workspace) -> None:
    assert legacy(ws, "--create-backup").exit_code == 0
    run = legacy(ws, "--list-backups")
    assert run.exit_code == 0, str(run)
    (backup,) = backups_of(ws)
    assert backup.name in run.stdout and "valid" in run.stdout


def test_verify_backup(ws: Workspace) -> None:
    assert legacy(ws, "--create-backup").exit_code == 0
    (backup,) = backups_of(ws)
    run = legacy(ws, f"--verify-backup {backup}")
    assert run.exit_code == 0, str(run)
    run = legacy(ws, f"--verify-backup {backup.name}")  # a name in the backup dir works too
    assert run.exit_code == 0, str(run)
    missing = legacy(ws, f"--verify-backup {backup}.missing")
    assert missing.exit_code == ExitCode.BACKUP_INVALID, str(missing)


def test_cleanup_backups(ws: Workspace) -> None:
    for _ in range(3):
        assert legacy(ws, "--create-backup").exit_code == 0
    old, older, _newest = backups_of(ws)
    for backup, days in ((old, 40), (older, 45)):
        manifest = read_manifest(backup)
        created = datetime.now(timezone.utc) - timedelta(days=days)
        manifest["created_at"] = created.isoformat()
        write_manifest(backup, manifest)
    dry = legacy(ws, "--cleanup-backups 30 --dry-run")
    assert dry.exit_code == 0, str(dry)
    assert len(backups_of(ws)) == 3
    assert "would remove 2 backup(s)" in dry.stdout
    run = legacy(ws, "--cleanup-backups 30")
    assert run.exit_code == 0, str(run)
    assert old not in backups_of(ws) and older not in backups_of(ws)
    assert len(backups_of(ws)) == 1


def test_dry_run_before_or_after(ws: Workspace) -> None:
    for line in ("--dry-run --create-backup", "--create-backup --dry-run"):
        run = legacy(ws, line)
        assert run.exit_code == 0, str(run)
        assert "dry run: nothing was changed" in run.stdout
    assert backups_of(ws) == []


def test_environment_flag(ws: Workspace) -> None:
    run = legacy(ws, "--create-backup --environment production")
    assert run.exit_code == 0, str(run)
    (backup,) = backups_of(ws)
    assert backup.name.startswith("backup_production_")
    events = [json.loads(line) for line in ws.log_files()[0].read_text().splitlines()]
    assert {e["environment"] for e in events} == {"production"}


def test_legacy_schema_rollback_dry_run(
    database: TestDatabase, tmp_path: Path, alembic_project: Path, cli_env: dict[str, str]
) -> None:
    config = Config(str(alembic_project))
    config.attributes["configure_logger"] = False
    url = database.url.replace("postgresql://", "postgresql+psycopg2://", 1)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, REV_TIER)
    ws = Workspace(database, tmp_path / "work", alembic_ini=alembic_project)
    env = {**env_of(ws), "DB_ROLLBACK_ALEMBIC_CONFIG": str(alembic_project)}
    run = invoke(
        f"--type schema --to-revision {REV_SEED} --environment staging --dry-run".split(), env=env
    )
    assert run.exit_code == 0, str(run)
    assert REV_TIER in run.stdout
    version = database.query("SELECT version_num FROM alembic_version")
    assert version == [(REV_TIER,)]


def test_legacy_cleanup_dry_run(ws: Workspace) -> None:
    run = legacy(ws, "--cleanup --dry-run")
    assert run.exit_code == 0, str(run)
    assert "would remove" in run.stdout


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("--cleanup-backups abc", "takes a number of days"),
        ("--create-backup --list-backups", "choose one of"),
        ("--verify-backup", "requires a value"),
        ("--type data", "--backup-file"),
        ("--type incremental --to-revision x", "--type must be schema, data or full"),
        ("--to-revision abc", "--type must be"),
    ],
)
def test_bad_legacy_lines_are_usage_errors(ws: Workspace, line: str, words: str) -> None:
    run = legacy(ws, line)
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert words in run.error_line()
    assert not ws.backup_dir.exists() or backups_of(ws) == []
