"""The command line itself: version, help for every command, entry points, fast start-up,
usage errors and the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from rollback_cli import __version__
from rollback_cli.errors import EXIT_CODE_HELP, ExitCode
from tests.cli_helpers import invoke, run_subprocess

COMMANDS = [
    [],
    ["backup"],
    ["backup", "create"],
    ["backup", "list"],
    ["backup", "verify"],
    ["backup", "cleanup"],
    ["rollback"],
    ["rollback", "schema"],
    ["rollback", "data"],
    ["rollback", "full"],
    ["rollback", "undo"],
    ["status"],
    ["validate"],
    ["cleanup-artifacts"],
]
HEAVY_MODULES = ("alembic", "boto3", "botocore", "sqlalchemy", "psycopg2")


def test_version_in_process(cli_env: dict[str, str]) -> None:
    run = invoke(["--version"])
    assert run.exit_code == 0
    assert run.stdout.strip() == f"db-rollback, version {__version__}"


def test_version_console_script(cli_env: dict[str, str]) -> None:
    run = run_subprocess(["--version"], cli_env, module=False)
    assert run.exit_code == 0, str(run)
    assert run.stdout.strip() == f"db-rollback, version {__version__}"
    assert run.stderr == ""


def test_python_dash_m_help(cli_env: dict[str, str]) -> None:
    run = run_subprocess(["--help"], cli_env)
    assert run.exit_code == 0, str(run)
    assert run.stdout.startswith("Usage: db-rollback [OPTIONS] COMMAND")
    for command in ("backup", "rollback", "status", "validate", "cleanup-artifacts"):
        assert f"\n  {command} " in run.stdout


def test_help_epilog_lists_every_exit_code(cli_env: dict[str, str]) -> None:
    run = run_subprocess(["--help"], cli_env, module=False)
    assert run.exit_code == 0
    assert "Exit codes:" in run.stdout
    for code in ExitCode:
        assert f"\n    {int(code):<4} " in run.stdout, f"exit code {int(code)} not in --help"
    # The text in --help is the text of errors.py, line for line.
    for line in EXIT_CODE_HELP.splitlines()[1:]:
        assert line.strip() in run.stdout
    assert "Legacy flags" in run.stdout and "--create-backup" in run.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "db-rollback")
def test_help_of_every_command(command: list[str], cli_env: dict[str, str]) -> None:
    run = invoke([*command, "--help"])
    assert run.exit_code == 0, str(run)
    assert run.stdout.startswith("Usage: ")
    assert " ".join(command) in run.stdout.splitlines()[0]
    assert "-h, --help" in run.stdout
    # Help never needs a database, so it never writes a log file.
    assert run.stderr == ""


def test_short_help_option(cli_env: dict[str, str]) -> None:
    assert invoke(["-h"]).stdout == invoke(["--help"]).stdout


def test_importing_the_cli_keeps_heavy_modules_out(cli_env: dict[str, str]) -> None:
    code = (
        "import json, sys\n"
        "import rollback_cli.cli\n"
        "from rollback_cli.cli import cli\n"
        "try:\n"
        "    cli.main(['--help'], prog_name='db-rollback')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, check=True
    )
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY_MODULES)
    assert heavy == [], f"--help imported {heavy}"
    assert "Usage: db-rollback" in proc.stdout


def test_help_is_fast(cli_env: dict[str, str]) -> None:
    """DESIGN 8: `db-rollback --help` within 0.25 s of a bare interpreter start (best of 5)."""

    def best(argv: list[str]) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run(argv, env=cli_env, capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        return min(times)

    bare = best([sys.executable, "-c", "pass"])
    helped = best([sys.executable, "-m", "rollback_cli", "--help"])
    assert helped - bare <= 0.25, f"--help took {helped:.3f}s vs {bare:.3f}s for python -c pass"


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["backup", "create", "--type", "incremental"],
        ["backup", "create", "--format", "tar"],
        ["backup", "create", "--jobs", "0"],
        ["backup", "verify"],
        ["backup", "cleanup"],
        ["rollback", "schema"],
        ["--log-format", "xml", "status"],
        ["--environment", "bad name!", "status"],
        ["backup", "list", "--no-such-option"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2_with_one_error_line(args: list[str], cli_env: dict[str, str]) -> None:
    run = run_subprocess(args, cli_env)
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert run.stdout == ""
    assert len(run.error_line()) < 300
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("args", [[], ["backup"], ["rollback"]], ids=lambda a: " ".join(a))
def test_a_group_without_a_command_shows_its_help(args: list[str], cli_env: dict[str, str]) -> None:
    run = run_subprocess(args, cli_env)
    assert run.exit_code == ExitCode.USAGE
    assert "Usage: db-rollback" in run.stdout + run.stderr
    assert "Commands:" in run.stdout + run.stderr


def test_exit_code_values_are_the_documented_ones() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "UNEXPECTED": 1,
        "USAGE": 2,
        "CONFIG": 3,
        "BACKUP_INVALID": 4,
        "FAILED_UNCHANGED": 5,
        "MANUAL_ATTENTION": 6,
        "REFUSED": 7,
        "INTERRUPTED": 130,
    }
