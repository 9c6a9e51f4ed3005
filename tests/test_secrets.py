"""No secret leaks: the password is absent from child argv and environment (a 0600 passfile
carries it and is removed afterwards), logs, stderr, stdout, manifests and error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from psycopg2 import sql

from rollback_cli.errors import ExitCode
from tests.cli_helpers import (
    PASSWORD,
    Run,
    Workspace,
    assert_no_password,
    invoke,
    recorded_calls,
    run_subprocess,
    unused_port,
    wrapper_bin_dir,
)
from tests.servers import TestDatabase

WRONG_PASSWORD = "Wr0ng-But-S3cret!"
ODD_PASSWORD = "p:a\\ss@w/rd 1%'\"#?"


@pytest.fixture
def ws(
    database: TestDatabase, tmp_path: Path, cli_env: dict[str, str], alembic_project: Path
) -> Workspace:
    database.execute("CREATE TABLE t (id int, secret_looking text)")
    database.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g")
    record = tmp_path / "calls.jsonl"
    bin_dir = wrapper_bin_dir(tmp_path / "wrapped-bin", database.server.bin_dir, record)
    return Workspace(database, tmp_path / "work", alembic_ini=alembic_project, pg_bin_dir=bin_dir)


def everything_written(ws: Workspace, runs: list[Run]) -> list[tuple[str, str]]:
    texts = [(f"stdout of run {i}", r.stdout) for i, r in enumerate(runs)]
    texts += [(f"stderr of run {i}", r.stderr) for i, r in enumerate(runs)]
    for path in [
        *ws.log_files(),
        *(ws.backup_dir.rglob("*.json") if ws.backup_dir.exists() else []),
    ]:
        texts.append((str(path), path.read_text()))
    return texts


def assert_clean(ws: Workspace, runs: list[Run], *secrets: str) -> None:
    for where, text in everything_written(ws, runs):
        assert_no_password(text, where=where)
        for secret in secrets:
            for form in (secret, quote(secret, safe="")):
                assert form not in text, f"secret in {where}"


def check_children(record: Path, *secrets: str) -> list[dict[str, Any]]:
    calls = [c for c in recorded_calls(record) if "--version" not in c["argv"]]
    assert calls, "the wrapped client binaries were never run"
    for call in calls:
        argv = " ".join(call["argv"])
        for secret in (PASSWORD, quote(PASSWORD, safe=""), *secrets):
            assert secret not in argv, f"{call['tool']} argv holds the password: {argv}"
        assert "://" not in argv, f"{call['tool']} got a URL: {argv}"
        assert "PGPASSWORD" not in call["env_names"], f"{call['tool']} got PGPASSWORD"
        assert "DATABASE_URL" not in call["env_names"]
        if "--list" in call["argv"] or "--file=-" in call["argv"]:
            continue  # reads a file, connects nowhere
        if "--host=/nonexistent/db-rollback-compression-probe" in call["argv"]:
            continue  # asks pg_dump which compression it has; connects nowhere
        assert call["pgpassfile"] and call["passfile_mode"] == "0o600"
        if not call["pgpassfile"].startswith("/proc/self/fd/"):
            # A named file must be gone; an inherited anonymous memory file (memfd) has no
            # name, and nothing is left of it once the processes holding it end.
            assert not Path(call["pgpassfile"]).exists(), "the passfile outlived the run"
    return calls


def test_backup_and_restore_test_leak_nothing(ws: Workspace) -> None:
    runs = []
    for fmt in ("custom", "plain", "directory"):
        run = ws.run("--json", "backup", "create", "--format", fmt, "--label", "leak check")
        assert run.exit_code == 0, str(run)
        runs.append(run)
        backup = run.json["backup_file"]
        verify = ws.run("--json", "backup", "verify", backup, "--restore-test")
        assert verify.exit_code == 0, str(verify)
        runs.append(verify)
    runs.append(ws.run("--json", "backup", "list"))
    runs.append(ws.run("backup", "list"))
    runs.append(ws.run("backup", "create", "--dry-run"))
    assert "***" in runs[-1].stdout  # the plan shows the URL, redacted
    runs.append(ws.run("--json", "status"))
    runs.append(ws.run("--log-level", "debug", "status"))
    assert all(r.exit_code == 0 for r in runs), [str(r) for r in runs if r.exit_code]
    assert_clean(ws, runs)
    tools = {c["tool"] for c in check_children(ws.workdir.parent / "calls.jsonl")}
    assert tools == {"pg_dump", "pg_restore", "psql"}


def test_libpq_password_variable_is_not_passed_on(ws: Workspace) -> None:
    env = ws.db.conninfo_env()  # PGPASSWORD among them
    args = [a for a in ws.args() if a != ws.url]
    args.remove("--database-url")
    runs = [invoke([*args, "--json", "backup", "create"], env=env)]
    assert runs[0].exit_code == 0, str(runs[0])
    runs.append(
        invoke([*args, "backup", "verify", runs[0].json["backup_file"], "--restore-test"], env=env)
    )
    assert runs[1].exit_code == 0, str(runs[1])
    assert_clean(ws, runs)
    check_children(ws.workdir.parent / "calls.jsonl")


@pytest.mark.parametrize(
    "url_of",
    [
        lambda s, db: f"postgresql://{s.user}:{WRONG_PASSWORD}@{s.host}:{s.port}/{db}",
        lambda s, db: f"postgresql://{s.user}:{WRONG_PASSWORD}@{s.host}:{unused_port()}/{db}",
        lambda s, db: f"postgresql://{s.user}:{WRONG_PASSWORD}@{s.host}:port/{db}",
        lambda s, db: f"postgresql://{s.user}:{WRONG_PASSWORD}@{s.host}:{s.port}/{db}_gone",
        lambda s, db: f"postgresql://{s.user}:{WRONG_PASSWORD}@{s.host}:{s.port}/",
        lambda s, db: f"mysql://{s.user}:{WRONG_PASSWORD}@{s.host}:{s.port}/{db}",
    ],
    ids=["wrong-password", "unreachable", "bad-port", "no-database", "no-dbname", "bad-scheme"],
)
def test_errors_do_not_echo_the_password(
    ws: Workspace, url_of: Any, cli_env: dict[str, str]
) -> None:
    url = url_of(ws.db.server, ws.db.name)
    runs = []
    for command in (["status"], ["--json", "backup", "create"], ["--log-level", "debug", "status"]):
        run = run_subprocess([*ws.args(url=url), *command], cli_env)
        assert run.exit_code == ExitCode.CONFIG, str(run)
        runs.append(run)
    assert_clean(ws, runs, WRONG_PASSWORD)


def test_a_password_with_every_awkward_character(
    database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Passfile escaping works (the backup succeeds) and the odd password leaks nowhere."""
    server = database18.server
    role = f"odd_{database18.name}"
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(ODD_PASSWORD)
                )
            )
            cur.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(database18.name), sql.Identifier(role)
                )
            )
    finally:
        conn.close()
    try:
        record = tmp_path / "calls.jsonl"
        bin_dir = wrapper_bin_dir(tmp_path / "bin", server.bin_dir, record)
        ws = Workspace(database18, tmp_path / "work", pg_bin_dir=bin_dir)
        url = (
            f"postgresql://{role}:{quote(ODD_PASSWORD, safe='')}@{server.host}:{server.port}/"
            f"{database18.name}"
        )
        database18.execute(f'CREATE TABLE t (id int); ALTER TABLE t OWNER TO "{role}"')
        runs = [ws.run("--json", "backup", "create", url=url)]
        assert runs[0].exit_code == 0, str(runs[0])
        runs.append(ws.run("--json", "status", url=url))
        assert runs[1].exit_code == 0, str(runs[1])
        runs.append(ws.run("status", url=url.replace("p%3Aa", "p%3Ab")))
        assert runs[2].exit_code == ExitCode.CONFIG
        assert_clean(ws, runs, ODD_PASSWORD)
        check_children(record, ODD_PASSWORD)
    finally:
        server.execute(f'ALTER DATABASE "{database18.name}" OWNER TO postgres')
        server.execute(f'DROP OWNED BY "{role}"', dbname=database18.name)
        server.execute(f'DROP ROLE "{role}"')


def test_manifest_names_host_and_database_only(ws: Workspace) -> None:
    run = ws.run("--json", "backup", "create")
    manifest = json.loads(Path(f"{run.json['backup_file']}.json").read_text())
    assert manifest["host"] == "127.0.0.1" and manifest["database"] == ws.db.name
    flat = json.dumps(manifest)
    assert "postgres:" not in flat and "://" not in flat
    assert_no_password(flat)


@pytest.mark.parametrize(
    "args",
    [
        ["{url}", "status"],
        ["-e", "{url}", "status"],
        ["backup", "create", "--label", "x", "{url}"],
        ["backup", "create", "--type", "{url}"],
        ["--create-backup", "{url}"],
    ],
    ids=["as-command", "as-environment", "extra-argument", "as-choice", "legacy"],
)
def test_usage_errors_do_not_echo_a_url_password(
    ws: Workspace, args: list[str], cli_env: dict[str, str]
) -> None:
    """A URL pasted in the wrong place: Click quotes it back, without its password."""
    argv = [a.replace("{url}", ws.url) for a in args]
    for run in (run_subprocess(argv, cli_env), invoke(argv)):
        assert run.exit_code == ExitCode.USAGE, str(run)
        assert_no_password(run.stdout, run.stderr, where=" ".join(args))
        assert "postgres:***@" in run.stderr or "Error:" in run.stderr
