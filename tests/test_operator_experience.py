"""Operator experience: what a person at a terminal (or a pipe) sees and types.

Results and checklists on stdout, one error line on stderr, global options before or after
the command, a closed pipe that is not an error, restore tests of schema-only and plain
backups, partial revision ids, help that says what each option does."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from rollback_cli.errors import ExitCode
from rollback_cli.postgres.lock import rollback_lock
from rollback_cli.settings import parse_database_url
from tests.cli_helpers import Workspace, invoke, seed_shop
from tests.rollback_helpers import REV_TIER, Project, bulk_orders_sql, tier_project
from tests.servers import TestDatabase


@pytest.fixture
def project(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Project:
    """The example Alembic project on PostgreSQL 15, at the tier revision."""
    return tier_project(database15, alembic_project, tmp_path)


@pytest.fixture
def ws(database15: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    """A database without Alembic, two small tables."""
    seed_shop(database15, customers=5, orders=20)
    return Workspace(database15, tmp_path / "work")


# --- a closed stdout is not an error ---------------------------------------------------------


def _with_closed_stdout(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the console script with a stdout pipe whose reader is already gone (what
    `db-rollback ... | head -1` becomes once head has read its line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [str(Path(sys.executable).parent / "db-rollback"), *args],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)


def test_backup_list_into_a_closed_pipe_exits_0_quietly(
    ws: Workspace, cli_env: dict[str, str]
) -> None:
    ws.backup()
    args = [a for a in ws.args() if a not in ("--log-format", "json")]
    proc = _with_closed_stdout([*args, "--log-format", "console", "backup", "list"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert ws.last_log_events()[-1]["exit_code"] == 0


@pytest.mark.parametrize("args", [["--help"], ["backup", "list", "--help"], ["--version"]])
def test_help_into_a_closed_pipe_exits_0_quietly(args: list[str], cli_env: dict[str, str]) -> None:
    proc = _with_closed_stdout(args, cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# --- global options after the command --------------------------------------------------------


def test_global_options_after_the_command(ws: Workspace) -> None:
    backup = ws.backup()
    args = ws.args()
    # Everything after the command: environment, directories, database, format.
    run = invoke(["backup", "list", *args[:2], *args[4:], "--environment", "staging", "--json"])
    assert run.exit_code == 0, str(run)
    assert [b["name"] for b in run.json["backups"]] == [backup.name]
    elsewhere = invoke(["backup", "list", *args[:2], *args[4:], "-e", "qa", "--json"])
    assert elsewhere.exit_code == 0, str(elsewhere)
    assert elsewhere.json["environment"] == "qa"


def test_global_option_after_the_command_overrides_the_one_before(ws: Workspace) -> None:
    run = ws.run("backup", "create", "--environment", "qa", "--json")
    assert run.exit_code == 0, str(run)
    assert run.json["environment"] == "qa"
    assert Path(run.json["backup_file"]).name.startswith("backup_qa_")


def test_bad_global_option_after_the_command_is_a_usage_error(ws: Workspace) -> None:
    run = ws.run("backup", "create", "--environment", "bad name!")
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "--environment" in run.error_line()
    assert ws.backups() == []


def test_production_after_the_command_still_needs_yes(ws: Workspace) -> None:
    run = ws.run("rollback", "undo", "-e", "production")
    assert run.exit_code == ExitCode.REFUSED, str(run)


# --- restore tests of schema-only and plain backups ------------------------------------------


@pytest.mark.parametrize(
    "options",
    [["--type", "schema"], ["--format", "plain"], ["--type", "schema", "--format", "plain"]],
    ids=["schema", "plain", "schema-plain"],
)
def test_restore_test_of_a_backup_proves_what_its_type_holds(
    project: Project, options: list[str]
) -> None:
    backup = project.backup(*options)
    run, doc = project.run_json("backup", "verify", backup, "--restore-test")
    assert run.exit_code == 0, run.stderr
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["restore-test"]["ok"]
    restore = doc["restore_test"]
    assert restore["mismatches"] == []
    assert restore["tables"] >= 2


# --- partial revision ids in validate --------------------------------------------------------


def test_validate_takes_a_partial_revision_like_rollback_schema(project: Project) -> None:
    run, doc = project.run_json("validate", "--expect-revision", REV_TIER[:4])
    assert run.exit_code == 0, run.stderr
    revision = next(c for c in doc["validation"] if c["name"] == "revision")
    assert revision["ok"] and REV_TIER in revision["detail"]


def test_validate_partial_revision_without_alembic_config(ws: Workspace) -> None:
    ws.db.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        "INSERT INTO alembic_version VALUES ('c0ffee123456')"
    )
    run, _doc = ws.run_json("validate", "--expect-revision", "c0ff")
    assert run.exit_code == 0, str(run)
    too_short = ws.run("validate", "--expect-revision", "c0f")
    assert too_short.exit_code == ExitCode.FAILED_UNCHANGED, str(too_short)
    other = ws.run("validate", "--expect-revision", "beef")
    assert other.exit_code == ExitCode.FAILED_UNCHANGED, str(other)


# --- a failed status or validate shows its whole checklist -----------------------------------


def test_failed_status_shows_every_check_failing_first(project: Project) -> None:
    with rollback_lock(parse_database_url(project.db.url), project.db.name):
        table = project.run("status")
        run, doc = project.run_json("status")
    assert table.exit_code == ExitCode.REFUSED, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("  ✗ lock: a rollback is running: pid")
    names = [line.split(":")[0].split()[-1] for line in lines]
    assert {"connection", "client", "privileges", "revision", "lock", "sessions"} <= set(names)
    errors = [
        line
        for line in table.stderr.splitlines()
        if "a rollback is running" in line and not line.startswith("{")
    ]
    assert len(errors) == 1 and errors[0].startswith("db-rollback: error: preflight failed")

    assert run.exit_code == ExitCode.REFUSED
    assert doc["outcome"] == "refused"
    assert next(c["name"] for c in doc["checks"]) == "lock"
    assert {c["name"]: c["status"] for c in doc["checks"]}["connection"] == "ok"
    assert doc["revision_before"] == REV_TIER


def test_status_with_a_named_alembic_config_that_is_missing_fails(
    project: Project, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.ini"
    args = project.base_args()
    args[args.index("--alembic-config") + 1] = str(missing)
    run = invoke([*args, "status"])
    assert run.exit_code == ExitCode.CONFIG, run.stderr
    assert run.stdout.splitlines()[0] == (
        f"  ✗ alembic: {missing} not found (named by --alembic-config or "
        "DB_ROLLBACK_ALEMBIC_CONFIG; the head revision cannot be read)"
    )
    assert "✓ revision: current" in run.stdout


def test_status_without_alembic_config_named_leaves_head_unknown(ws: Workspace) -> None:
    run, doc = ws.run_json("status")
    assert run.exit_code == 0, str(run)
    revision = next(c for c in doc["checks"] if c["name"] == "revision")
    assert revision["status"] == "ok" and "head unknown" in revision["detail"]


def test_failed_validate_shows_every_check_failing_first(project: Project) -> None:
    table = project.run("validate", "--expect-revision", "e41c0d7f6a95")
    assert table.exit_code == ExitCode.FAILED_UNCHANGED, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("  ✗ revision: alembic_version b7e2f5a91c38, expected e41c")
    assert any(line.startswith("  ✓ connectivity:") for line in lines)
    run, doc = project.run_json("validate", "--expect-revision", "e41c0d7f6a95")
    assert run.exit_code == ExitCode.FAILED_UNCHANGED
    assert [c["name"] for c in doc["validation"]] == ["revision", "connectivity"]
    assert doc["outcome"] == "failed_unchanged"


# --- the console: results and step progress, the log in its file -----------------------------


def _console(ws: Workspace) -> list[str]:
    return [a if a != "json" else "console" for a in ws.args()]


def test_console_shows_steps_and_the_result_not_the_log(ws: Workspace) -> None:
    run = invoke([*_console(ws), "backup", "create"])
    assert run.exit_code == 0, str(run)
    assert run.stdout.startswith("backup created: ")
    lines = run.stderr.splitlines()
    assert lines and all(line.startswith("  ✓ ") for line in lines), run.stderr
    assert any(line.startswith("  ✓ dump (") for line in lines)
    assert "command started" not in run.stderr and "audit" not in run.stderr
    events = ws.last_log_events()  # the file keeps the whole structured log
    assert events[0]["event"] == "command started" and events[-1]["event"] == "audit"


@pytest.mark.parametrize("flag", [["--verbose"], ["--log-level", "info"], ["-v"]])
def test_verbose_console_shows_the_structured_log(ws: Workspace, flag: list[str]) -> None:
    run = invoke([*_console(ws), *flag, "backup", "list"])
    assert run.exit_code == 0, str(run)
    assert "command started" in run.stderr and "audit" in run.stderr


def test_status_on_the_console_shows_each_check_once(project: Project) -> None:
    args = [a if a != "json" else "console" for a in project.base_args()]
    run = invoke([*args, "status"])
    assert run.exit_code == 0, run.stderr
    assert run.stderr == ""
    assert len(run.stdout.splitlines()) == 6


@pytest.mark.parametrize("verbose", [False, True])
def test_console_error_appears_once(ws: Workspace, verbose: bool) -> None:
    args = [*_console(ws), *(["--verbose"] if verbose else []), "backup", "verify", "nope.dump"]
    run = invoke(args)
    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    lines = run.stderr.splitlines()
    assert lines[-1].startswith("db-rollback: error: backup nope.dump does not exist")
    assert not any("[error" in line for line in lines), run.stderr
    if not verbose:  # the audit record, with the message, is in the log file
        assert [line for line in lines if "nope.dump" in line] == [lines[-1]], run.stderr


# --- help and listings -----------------------------------------------------------------------


def test_schema_rollback_help_offers_only_what_it_uses(cli_env: dict[str, str]) -> None:
    schema = invoke(["rollback", "schema", "--help"]).stdout
    assert "--jobs" not in schema and "--allow-cross-environment" not in schema
    assert "lock_timeout of the downgrade" in schema
    data = invoke(["rollback", "data", "--help"]).stdout
    assert "--jobs" in data and "--allow-cross-environment" in data
    assert "downgrade" not in data.split("--lock-timeout", 1)[1].split("--", 1)[0]
    assert "--statement-timeout" not in data


@pytest.mark.parametrize(
    "command", [["status"], ["backup", "list"], ["rollback", "undo"], ["validate"]]
)
def test_help_has_an_example(command: list[str], cli_env: dict[str, str]) -> None:
    run = invoke([*command, "--help"])
    assert run.exit_code == 0
    assert "Example:" in run.stdout and "db-rollback " in run.stdout.split("Example:", 1)[1]


@pytest.mark.parametrize(
    "option", ["--log-dir", "--log-level", "--alembic-config", "--s3-region", "--s3-kms-key-id"]
)
def test_every_global_option_is_described(option: str, cli_env: dict[str, str]) -> None:
    text = invoke(["--help"]).stdout
    after = text.split(f"  {option} ", 1)[1].split("\n  -", 1)[0]
    assert len(after.split()) > 3, after


def test_to_revision_is_described(cli_env: dict[str, str]) -> None:
    for command in ("schema", "full"):
        text = invoke(["rollback", command, "--help"]).stdout
        assert "--to-revision REV" in text
        assert "partial ids" in text.split("--to-revision REV", 1)[1][:200]


def test_backup_list_shows_database_environment_and_label(ws: Workspace) -> None:
    ws.backup("--label", "before release 42")
    run = ws.run("backup", "list")
    assert run.exit_code == 0, str(run)
    header, row = run.stdout.splitlines()[:2]
    for column in ("DATABASE", "ENV", "LABEL"):
        assert column in header
    assert ws.db.name in row and " staging " in row and "before release 42" in row


def test_rollback_without_alembic_says_so_in_words(ws: Workspace) -> None:
    backup = ws.backup()
    run = ws.run("rollback", "data", "--backup-file", str(backup))
    assert run.exit_code == 0, str(run)
    first = run.stdout.splitlines()[0]
    assert first.startswith(f"data rolled back: {ws.db.name} restored from ")
    assert "no Alembic revision recorded" in first and "-" not in first.split(";")[-1]
    undo = ws.run("rollback", "undo")
    assert undo.exit_code == 0, str(undo)
    assert undo.stdout.splitlines()[0] == (
        f"rollback undone: {ws.db.name} is again the database the last rollback replaced; "
        "no Alembic revision recorded (alembic_version is empty or missing)"
    )


def test_interrupted_state_in_words() -> None:
    from rollback_cli.cli.runner import interrupted_state

    assert "no database was changed" in interrupted_state("backup create", {"dump": "started"})
    before = interrupted_state("rollback data", {"preflight": "finished", "restore": "failed"})
    assert before.startswith("interrupted before any change: the live database is as it was")
    swap = interrupted_state("rollback data", {"restore": "finished", "swap": "failed"})
    assert "the restored copy if the swap completed, else the untouched original" in swap
    after = interrupted_state("rollback data", {"swap": "finished", "validate": "started"})
    assert after.startswith("interrupted after the live database was changed (swap finished)")


# --- progress on a terminal ------------------------------------------------------------------


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``argv`` with stderr on a pseudo-terminal; (exit code, stdout, stderr)."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=secondary)
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        stdout = proc.communicate(timeout=120)[0]
    finally:
        os.close(primary)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode("utf-8", "replace")


def test_dump_progress_bar_is_replaced_by_the_finished_step(
    project: Project, cli_env: dict[str, str]
) -> None:
    project.db.execute(bulk_orders_sql(1_500_000))
    args = [a for a in project.base_args() if a not in ("--log-format", "json")]
    code, stdout, stderr = _on_a_terminal(
        [sys.executable, "-m", "rollback_cli", *args, "backup", "create", "--compress", "none"],
        cli_env,
    )
    assert code == 0, stderr
    assert stdout.startswith("backup created: ")
    assert "  dump  [" in stderr and "MiB" in stderr  # click's bar, with the size so far
    finished = stderr.split("✓ dump (", 1)
    assert len(finished) == 2 and finished[0].endswith("\r\x1b[K  ")
    assert "dumped" not in stderr and "command started" not in stderr


def test_no_progress_without_a_terminal(project: Project) -> None:
    project.db.execute(bulk_orders_sql(300_000))
    run = project.run("backup", "create")
    assert run.exit_code == 0, run.stderr
    assert "\r" not in run.stderr and "  dump  [" not in run.stderr


def test_restore_progress_counts_tables_on_a_terminal(
    project: Project, cli_env: dict[str, str]
) -> None:
    """A data rollback's restore shows a bar of the tables loaded, of the archive's total;
    the finished step's line takes its place."""
    backup = project.backup()
    args = [a for a in project.base_args() if a not in ("--log-format", "json")]
    code, stdout, stderr = _on_a_terminal(
        [sys.executable, "-m", "rollback_cli", *args, "rollback", "data", "--backup-file", backup],
        cli_env,
    )
    assert code == 0, stderr
    assert "data rolled back" in stdout
    tables = len(project.db.query("SELECT 1 FROM pg_tables WHERE schemaname = 'public'"))
    assert "  restore  [" in stderr and f"{tables}/{tables}" in stderr and "tables" in stderr
    assert "processing data" not in stderr and "finished item" not in stderr
    # The safety backup, dumped from the kept database after the swap, shows its size.
    assert "  safety-backup  [" in stderr and "KiB" in stderr


def test_a_failing_restore_on_a_terminal_names_the_error_not_the_verbose_lines(
    project: Project, cli_env: dict[str, str]
) -> None:
    """With progress counted (pg_restore --verbose), the error line is still pg_restore's
    error: a table named error_log does not take its place."""
    project.db.execute("CREATE TABLE error_log (id int); INSERT INTO error_log VALUES (1)")
    # The restore fails on a role the backup names that this server lacks.
    project.db.execute("CREATE ROLE ghost_owner; ALTER TABLE error_log OWNER TO ghost_owner")
    owned = project.backup()
    project.db.execute("ALTER TABLE error_log OWNER TO CURRENT_USER; DROP ROLE ghost_owner")
    args = [a for a in project.base_args() if a not in ("--log-format", "json")]
    code, _, stderr = _on_a_terminal(
        [sys.executable, "-m", "rollback_cli", *args, "rollback", "data", "--backup-file", owned],
        cli_env,
    )
    assert code == 5, stderr
    last = stderr.strip().splitlines()[-1]
    assert "ghost_owner" in last and "does not exist" in last, last
