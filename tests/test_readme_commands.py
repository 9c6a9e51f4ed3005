"""Every `db-rollback` command line of the README's shell examples runs as written.

The lines are read from README.md itself (fenced ``sh`` blocks, continuation lines
joined), in their order, in one working directory, against the example project on
PostgreSQL 15 with S3 on SeaweedFS. Only the placeholders a reader would replace are
replaced: the example backup's name (by a real backup of this database), the bucket
(by a test bucket), `checks.sql` (a file of checks). Environment: production with `--yes`
given by the environment (DB_ROLLBACK_YES), as a CI job would. Each must exit 0.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rollback_cli.cli import cli
from tests.rollback_helpers import REV_TIER, Project, tier_project
from tests.servers import TestDatabase

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_BACKUP = "backup_production_20260101_120000.dump"
EXAMPLE_BUCKET = "s3://acme-backups/db"
# The one line that needs a KMS key: SeaweedFS has none (aws:kms is covered against the
# S3 client's parameters in test_storage_s3); the same line with AES256 runs instead.
KMS = ("--s3-sse aws:kms --s3-kms-key-id alias/db-backups", "--s3-sse AES256")


def readme_commands() -> list[str]:
    """The `db-rollback ...` lines of the README's sh blocks, continuations joined."""
    commands: list[str] = []
    in_block = False
    pending = ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() in ("```sh", "```bash") and not in_block
            pending = ""
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if text.startswith("db-rollback ") or (
            text.startswith("DATABASE_URL=") and ("db-rollback " in text)
        ):
            commands.append(text)
    return commands


def test_the_readme_has_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert len(commands) >= 25, commands
    for word in ("drill", "rollback full", "rollback undo", "backup verify", "validate"):
        assert any(word in c for c in commands), word


@pytest.fixture
def workspace(
    database15: TestDatabase,
    alembic_project: Path,
    tmp_path: Path,
    cli_env: dict[str, str],
    s3_env: Any,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Project, dict[str, str]]:
    project = tier_project(database15, alembic_project, tmp_path)
    monkeypatch.chdir(project.workdir)
    for name, value in {
        "DATABASE_URL": database15.url,
        "DB_ROLLBACK_ENVIRONMENT": "production",
        "DB_ROLLBACK_YES": "1",
        "DB_ROLLBACK_ALEMBIC_CONFIG": str(project.alembic_ini),
        "DB_ROLLBACK_PG_BIN_DIR": str(database15.server.bin_dir),
        "DB_ROLLBACK_LOG_FORMAT": "json",
    }.items():
        monkeypatch.setenv(name, value)
    (project.workdir / "checks.sql").write_text(
        "-- name: customers exist\nSELECT count(*) > 0 FROM customers;\n"
    )
    local = invoke(["backup", "create", "--label", "setup", "--json"])
    remote = invoke(["--storage", f"s3://{s3_bucket}/db", "backup", "create", "--json"])
    names = {
        "local": Path(json.loads(local)["backup_file"]).name,
        "remote": json.loads(remote)["backup_uri"].rpartition("/")[2],
        "bucket": f"s3://{s3_bucket}/db",
    }
    return project, names


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.stderr)
    return result.stdout


def substitute(command: str, names: dict[str, str]) -> str:
    command = command.replace(*KMS)
    remote = EXAMPLE_BUCKET in command
    command = command.replace(EXAMPLE_BUCKET, names["bucket"])
    return command.replace(EXAMPLE_BACKUP, names["remote"] if remote else names["local"])


def run_line(command: str, outputs: dict[str, str]) -> tuple[int, str, str]:
    """One README line: `db-rollback ARGS [> FILE]`, with `$(jq -r .KEY FILE)` read from a
    file an earlier line wrote."""

    def jq(match: re.Match[str]) -> str:
        return shlex.quote(str(json.loads(outputs[match.group(2)])[match.group(1)]))

    command = re.sub(r'"\$\(jq -r \.(\w+) ([\w.]+)\)"', jq, command)
    words = shlex.split(command, comments=True)
    assert words[0] == "db-rollback", command
    redirect = None
    if ">" in words:
        at = words.index(">")
        redirect, words = words[at + 1], words[:at]
    result = CliRunner().invoke(cli, words[1:])
    if redirect:
        outputs[redirect] = result.stdout
    return result.exit_code, result.stdout, result.stderr


def test_every_readme_command_line_runs(workspace: tuple[Project, dict[str, str]]) -> None:
    project, names = workspace
    outputs: dict[str, str] = {}
    failures = []
    ran = 0
    for line in readme_commands():
        command = substitute(line, names)
        code, _, stderr = run_line(command, outputs)
        ran += 1
        if code != 0:
            failures.append(f"{line}\n  exit {code}: {stderr.strip().splitlines()[-1:]}")
    assert not failures, "\n".join(failures)
    assert ran == len(readme_commands())
    assert project.revision() == REV_TIER
