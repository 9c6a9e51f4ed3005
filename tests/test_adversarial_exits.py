"""Adversarial suite: missing client tools and greedy options are refused or bounded before
anything changes, with the documented exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from rollback_cli.cli import cli
from rollback_cli.errors import ExitCode
from tests.rollback_helpers import Project, log_events


@pytest.mark.parametrize("missing", ["pg_restore", "psql"])
def test_a_missing_client_tool_is_refused_before_the_safety_backup(
    project15: Project, tmp_path: Path, missing: str
) -> None:
    backup = project15.backup()
    partial = tmp_path / "partial-bin"
    partial.mkdir()
    for tool in ("pg_dump", "pg_restore", "psql"):
        if tool != missing:
            os.symlink(project15.db.server.bin_dir / tool, partial / tool)
    args = project15.base_args()
    args[args.index("--pg-bin-dir") + 1] = str(partial)
    files_before = project15.files()
    project15.db.execute("DELETE FROM orders")
    before = project15.data_fingerprint()

    result = CliRunner().invoke(cli, [*args, "rollback", "data", "--backup-file", backup])

    assert result.exit_code == ExitCode.REFUSED, result.stderr
    assert missing in result.stderr and "postgresql-client-" in result.stderr
    assert project15.data_fingerprint() == before
    assert [f for f in project15.files() if "safety" in f] == [
        f for f in files_before if "safety" in f
    ]


def test_jobs_are_capped_at_the_free_connection_slots(project15: Project) -> None:
    before = project15.data_fingerprint()
    backup = project15.backup("--format", "directory")
    project15.db.execute("DELETE FROM orders")

    result = project15.run("rollback", "data", "--backup-file", backup, "--jobs", "500")

    assert result.exit_code == 0, result.stderr
    assert project15.data_fingerprint() == before
    capped = [e for e in log_events(project15) if e["event"] == "parallel restore jobs capped"]
    assert capped and capped[0]["asked"] == 500 and capped[0]["jobs"] < 100
