"""Logging: JSON lines on stderr and always in a private log file, the fields every event
carries, step durations, and the audit record that closes every run."""

from __future__ import annotations

import getpass
import json
import os
import pty
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from rollback_cli.errors import ExitCode
from tests.cli_helpers import (
    LOG_NAME,
    Workspace,
    invoke,
    mode,
    read_events,
    run_subprocess,
    unused_port,
)
from tests.servers import TestDatabase

REQUIRED = ("timestamp", "level", "event", "run_id", "environment", "command", "step", "actor")
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")


@pytest.fixture
def ws(database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    database18.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)")
    return Workspace(database18, tmp_path / "work")


def check_event_fields(events: list[dict[str, object]], *, environment: str, command: str) -> None:
    assert events
    run_ids = {e["run_id"] for e in events}
    assert len(run_ids) == 1, f"one run, one run_id: {run_ids}"
    started = datetime.now(timezone.utc) - timedelta(minutes=5)
    for event in events:
        missing = [key for key in REQUIRED if key not in event]
        assert not missing, f"{event['event']!r} lacks {missing}"
        stamp = str(event["timestamp"])
        assert ISO_UTC.match(stamp), stamp
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert parsed.utcoffset() == timedelta(0) and parsed > started
        assert event["environment"] == environment
        assert event["command"] == command
        assert event["level"] in ("debug", "info", "warning", "error", "critical")


def test_json_on_stderr_and_in_the_log_file(ws: Workspace) -> None:
    run = ws.run("backup", "create", environment="qa")
    assert run.exit_code == 0, str(run)
    # stderr: nothing but JSON lines; stdout: the result for people.
    assert all(line.startswith("{") for line in run.stderr.splitlines())
    assert "backup created:" in run.stdout
    stderr_events = run.stderr_events()
    check_event_fields(stderr_events, environment="qa", command="backup create")

    (log_file,) = ws.log_files()
    match = LOG_NAME.match(log_file.name)
    assert match and match["env"] == "qa"
    stamp = datetime.strptime(match["stamp"], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=2)  # a UTC stamp
    assert mode(log_file) == 0o600
    assert mode(ws.log_dir) == 0o700
    file_events = read_events(log_file)
    check_event_fields(file_events, environment="qa", command="backup create")
    assert [e["event"] for e in file_events] == [e["event"] for e in stderr_events]
    assert file_events[0]["event"] == "command started"


def test_steps_log_their_duration(ws: Workspace) -> None:
    run = ws.run("backup", "create")
    assert run.exit_code == 0, str(run)
    events = ws.last_log_events()
    finished = [e for e in events if e["event"] == "step finished"]
    assert {e["step"] for e in finished} >= {"connect", "dump", "store"}
    for event in finished:
        assert isinstance(event["duration_ms"], int) and event["duration_ms"] >= 0
    # Events inside a step carry its name; outside, the step is "main".
    assert events[0]["step"] == "main" and events[-1]["step"] == "main"
    dump = next(e for e in finished if e["step"] == "dump")
    assert dump["size"] > 0 and len(dump["sha256"]) == 64


def test_last_event_is_the_audit_record(ws: Workspace) -> None:
    run, doc = ws.run_json("backup", "create", "--label", "audit me")
    assert run.exit_code == 0, str(run)
    audit = ws.last_log_events()[-1]
    assert audit["event"] == "audit"
    assert audit["outcome"] == "success" and audit["exit_code"] == 0
    assert audit["backup_file"] == doc["backup_file"]
    assert isinstance(audit["duration_ms"], int)
    assert doc["log_file"] == str(ws.log_files()[0])


@pytest.mark.parametrize(
    ("args", "code", "outcome"),
    [
        (["backup", "verify", "missing.dump"], ExitCode.BACKUP_INVALID, "backup_invalid"),
        (["backup", "create", "--jobs", "2"], ExitCode.USAGE, "usage_error"),
        (["status"], ExitCode.CONFIG, "config_error"),
    ],
    ids=["backup-missing", "usage", "unreachable"],
)
def test_failures_end_with_an_audit_record(
    ws: Workspace, args: list[str], code: int, outcome: str
) -> None:
    url = None
    if args == ["status"]:
        url = f"postgresql://postgres@127.0.0.1:{unused_port()}/{ws.db.name}"
    run = ws.run(*args, url=url)
    assert run.exit_code == code, str(run)
    events = ws.last_log_events()
    check_event_fields(events, environment="staging", command=" ".join(args[:2]))
    errors = [e for e in events if e["level"] == "error"]
    assert errors and errors[-1]["exit_code"] == code
    audit = events[-1]
    assert audit["event"] == "audit"
    assert (audit["outcome"], audit["exit_code"]) == (outcome, code)
    assert audit["message"] and audit["message"] in run.error_line()


def test_actor_from_github_or_the_os_user(ws: Workspace) -> None:
    run = ws.run("backup", "list", env={"GITHUB_ACTOR": "octocat"})
    assert run.exit_code == 0, str(run)
    assert {e["actor"] for e in run.stderr_events()} == {"octocat"}
    run = ws.run("backup", "list")
    assert {e["actor"] for e in run.stderr_events()} == {getpass.getuser()}


def test_console_format_on_stderr_json_in_file(ws: Workspace) -> None:
    args = [a if a != "json" else "console" for a in ws.args()]
    run = invoke([*args, "--verbose", "backup", "create"])
    assert run.exit_code == 0, str(run)
    assert run.stderr_events() == []
    assert "command started" in run.stderr and "audit" in run.stderr
    events = ws.last_log_events()  # the file stays JSON
    check_event_fields(events, environment="staging", command="backup create")
    assert events[-1]["event"] == "audit"


def test_default_format_is_json_without_a_terminal(ws: Workspace, cli_env: dict[str, str]) -> None:
    args = [a for a in ws.args() if a not in ("--log-format", "json")]
    run = run_subprocess([*args, "backup", "list"], cli_env)
    assert run.exit_code == 0, str(run)
    assert run.stderr_events() and run.stderr_events()[-1]["event"] == "audit"


def test_log_level_filters_stderr_not_the_file(ws: Workspace) -> None:
    run = ws.run("--log-level", "warning", "backup", "create")
    assert run.exit_code == 0, str(run)
    assert run.stderr_events() == []
    assert ws.last_log_events()[-1]["event"] == "audit"


def test_each_run_gets_its_own_log_file_and_run_id(ws: Workspace) -> None:
    for _ in range(3):
        assert ws.run("backup", "list").exit_code == 0
    files = ws.log_files()
    assert len(files) == 3
    run_ids = {read_events(f)[0]["run_id"] for f in files}
    assert len(run_ids) == 3
    for log_file in files:
        assert LOG_NAME.match(log_file.name), log_file.name
        assert mode(log_file) == 0o600


def test_unwritable_log_dir_still_runs(ws: Workspace, tmp_path: Path) -> None:
    """A log dir that cannot be created (a file is in the way) is a warning, not a failure."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ws.args()
    args[args.index("--log-dir") + 1] = str(blocker / "logs")
    run = invoke([*args, "--json", "backup", "list"])
    assert run.exit_code == 0, str(run)
    assert run.json["log_file"] is None
    assert any(e["event"] == "log file could not be created" for e in run.stderr_events())


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_unexpected_error_exits_1_with_a_structured_traceback(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    """The one place exceptions become exit codes: anything unknown is exit 1, logged with a
    structured traceback, its message scrubbed of credentials."""
    import rollback_cli.backups.catalog

    def broken(storage: object) -> list[object]:
        raise RuntimeError("listing broke near postgresql://admin:hunter2@db.internal/app")

    monkeypatch.setattr(rollback_cli.backups.catalog, "list_backups", broken)
    run = ws.run("--log-format", log_format, "--json", "backup", "list")
    assert run.exit_code == ExitCode.UNEXPECTED, str(run)
    if log_format == "console":
        assert "Traceback" in run.stderr or "RuntimeError" in run.stderr
    line = run.stderr.splitlines()[-1]
    assert line.startswith("db-rollback: error: unexpected error: RuntimeError: listing broke")
    assert "hunter2" not in run.stdout + run.stderr
    assert run.json["outcome"] == "error" and run.json["exit_code"] == 1
    events = ws.last_log_events()
    failure = next(e for e in events if e["event"] == "unexpected error")
    frames = failure["exception"][0]["frames"]
    assert failure["exception"][0]["exc_type"] == "RuntimeError"
    assert any(frame["name"] == "broken" for frame in frames)
    assert "hunter2" not in json.dumps(events)
    assert events[-1]["event"] == "audit" and events[-1]["exit_code"] == 1


def test_console_format_by_default_on_a_terminal(ws: Workspace, cli_env: dict[str, str]) -> None:
    """stderr on a TTY gets the console: step progress and warnings by default (the
    structured log with --verbose); the log file stays JSON."""
    args = [a for a in ws.args() if a not in ("--log-format", "json")]
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rollback_cli", *args, "backup", "create"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=60,
            check=False,
        )
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
    finally:
        os.close(primary)
    stderr = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, stderr
    assert "command started" not in stderr and "audit" not in stderr
    assert "✓ dump (" in stderr and "✓ store (" in stderr
    assert not any(line.lstrip().startswith("{") for line in stderr.splitlines())
    assert ws.last_log_events()[-1]["event"] == "audit"


def test_library_log_lines_share_the_format(
    database18: TestDatabase, tmp_path: Path, alembic_project: Path, cli_env: dict[str, str]
) -> None:
    """Alembic logs through the standard library; its lines carry the same fields."""
    config = Config(str(alembic_project))
    config.attributes["configure_logger"] = False
    url = database18.url.replace("postgresql://", "postgresql+psycopg2://", 1)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "b7e2f5a91c38")
    ws = Workspace(database18, tmp_path / "work", alembic_ini=alembic_project)
    run = ws.run("rollback", "schema", "--to-revision", "8d4b6a0c9e12", "--dry-run")
    assert run.exit_code == 0, str(run)
    events = ws.last_log_events()
    check_event_fields(events, environment="staging", command="rollback schema")
    from_alembic = [e for e in events if str(e.get("logger", "")).startswith("alembic")]
    assert from_alembic, [e.get("logger") for e in events]
    assert {e["logger"] for e in events} >= {"rollback_cli"}
    assert [e["event"] for e in run.stderr_events()] == [e["event"] for e in events]
