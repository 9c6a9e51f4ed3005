"""Backup compression: ``auto`` by default (what the selected pg_dump supports), plain
backups stay SQL text, and a method the client lacks is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollback_cli.backups.dump import accepts_compression
from rollback_cli.errors import ExitCode
from rollback_cli.postgres.clients import find_client
from tests.cli_helpers import Workspace, read_manifest, seed_shop
from tests.servers import TestDatabase


@pytest.fixture
def ws(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database)
    return Workspace(database, tmp_path / "work")


@pytest.fixture
def ws15(database15: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database15)
    return Workspace(database15, tmp_path / "work")


@pytest.mark.parametrize("spec", ["gzip:9", "6", "zstd:3", "lz4"])
def test_compressed_plain_is_refused_before_anything_is_written(ws: Workspace, spec: str) -> None:
    run = ws.run("backup", "create", "--format", "plain", "--compress", spec)
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "--format plain is written uncompressed" in run.error_line()
    assert not ws.backup_dir.exists() or ws.backups() == []


@pytest.mark.parametrize("spec", [None, "auto", "none", "0"])
def test_plain_backups_stay_sql_text(ws: Workspace, spec: str | None) -> None:
    extra = ["--compress", spec] if spec else []
    backup = ws.backup("--format", "plain", *extra)
    assert backup.name.endswith(".sql")
    assert backup.read_bytes().startswith(b"--\n-- PostgreSQL database dump")
    recorded = None if spec in (None, "auto") else spec
    assert read_manifest(backup)["compression"] == recorded
    assert ws.run("backup", "verify", str(backup)).exit_code == 0


def test_auto_is_what_the_client_supports(ws: Workspace) -> None:
    tools = find_client(ws.db.server.major, ws.db.server.bin_dir)
    expected = (
        "zstd"
        if accepts_compression(tools, "zstd")
        else "lz4"
        if accepts_compression(tools, "lz4")
        else None  # gzip at pg_dump's default level
    )
    for extra in ([], ["--compress", "auto"]):
        backup = ws.backup(*extra)
        assert read_manifest(backup)["compression"] == expected
        run = ws.run("backup", "verify", str(backup), "--restore-test")
        assert run.exit_code == 0, str(run)


def test_an_unsupported_method_names_what_the_client_supports(ws15: Workspace) -> None:
    run = ws15.run("backup", "create", "--compress", "zstd:3")
    assert run.exit_code == ExitCode.USAGE, str(run)
    line = run.error_line()
    assert "--compress zstd:3" in line and "supports gzip, none" in line
    assert ws15.backups() == []


def test_a_safety_backup_is_compressed_for_speed(
    database15: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """PostgreSQL 15's pg_dump has gzip only: a safety backup takes level 1."""
    seed_shop(database15)
    ws = Workspace(database15, tmp_path / "work")
    backup = ws.backup()
    run = ws.run("--json", "rollback", "data", "--backup-file", str(backup))
    assert run.exit_code == 0, str(run)
    safety = Path(run.json["backup_file"])
    assert read_manifest(safety)["compression"] == "gzip:1"
    assert ws.run("backup", "verify", str(safety), "--restore-test").exit_code == 0
