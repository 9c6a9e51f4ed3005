"""Configuration: where the database comes from (--database-url, DATABASE_URL, libpq PG*
variables, a passfile), every global option and its environment variable, and the one-line
exit-3 errors for URLs and servers that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command as alembic_command
from alembic.config import Config

from rollback_cli.errors import ExitCode
from rollback_cli.settings import parse_database_url
from tests.cli_helpers import (
    BACKUP_NAME,
    LOG_NAME,
    PASSWORD,
    Workspace,
    assert_no_password,
    invoke,
    read_manifest,
    run_subprocess,
    unused_port,
)
from tests.servers import TestDatabase


@pytest.fixture
def ws(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    return Workspace(database, tmp_path / "work")


def common_args(ws: Workspace) -> list[str]:
    """The workspace's options without --database-url."""
    return [
        "--backup-dir",
        str(ws.backup_dir),
        "--log-dir",
        str(ws.log_dir),
        "--log-format",
        "json",
        "--pg-bin-dir",
        str(ws.db.server.bin_dir),
    ]


def pg_bin(ws: Workspace) -> list[str]:
    return ["--pg-bin-dir", str(ws.db.server.bin_dir)]


def connected_to(run_doc: dict[str, object], dbname: str) -> bool:
    checks = run_doc["checks"]
    assert isinstance(checks, list)
    connection = next(c for c in checks if c["name"] == "connection")
    return connection["status"] == "ok" and f"/{dbname}" in connection["detail"]


# --- where the database comes from --------------------------------------------------------


def test_database_url_option(ws: Workspace) -> None:
    run = invoke([*common_args(ws), "--database-url", ws.url, "status", "--json"])
    assert run.exit_code == 0, str(run)
    assert connected_to(run.json, ws.db.name)


def test_database_url_env_var(ws: Workspace) -> None:
    run = invoke([*common_args(ws), "status", "--json"], env={"DATABASE_URL": ws.url})
    assert run.exit_code == 0, str(run)
    assert connected_to(run.json, ws.db.name)


def test_option_wins_over_env_var(ws: Workspace) -> None:
    other = ws.db.server.url("postgres")
    run = invoke(
        [*common_args(ws), "--database-url", ws.url, "status", "--json"],
        env={"DATABASE_URL": other, "PGDATABASE": "postgres"},
    )
    assert run.exit_code == 0, str(run)
    assert connected_to(run.json, ws.db.name)


def test_libpq_variables(ws: Workspace) -> None:
    env = ws.db.conninfo_env()  # PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE
    run = invoke([*common_args(ws), "status", "--json"], env=env)
    assert run.exit_code == 0, str(run)
    assert connected_to(run.json, ws.db.name)
    # The same variables drive pg_dump: a real backup of this database.
    run = invoke([*common_args(ws), "--json", "backup", "create"], env=env)
    assert run.exit_code == 0, str(run)
    assert read_manifest(Path(run.json["backup_file"]))["database"] == ws.db.name


def test_database_url_wins_over_pg_variables(ws: Workspace) -> None:
    env = ws.db.server.conninfo_env("postgres")
    run = invoke([*common_args(ws), "status", "--json"], env={**env, "DATABASE_URL": ws.url})
    assert run.exit_code == 0, str(run)
    assert connected_to(run.json, ws.db.name)


def test_pgpassfile(ws: Workspace, tmp_path: Path) -> None:
    passfile = tmp_path / "pgpass"
    server = ws.db.server
    passfile.write_text(f"{server.host}:{server.port}:*:{server.user}:{PASSWORD}\n")
    passfile.chmod(0o600)
    env = {k: v for k, v in ws.db.conninfo_env().items() if k != "PGPASSWORD"}
    env["PGPASSFILE"] = str(passfile)
    run = invoke([*common_args(ws), "--json", "backup", "create"], env=env)
    assert run.exit_code == 0, str(run)
    assert Path(run.json["backup_file"]).is_file()
    # Without the passfile, the same variables cannot log in.
    env["PGPASSFILE"] = str(tmp_path / "missing")
    run = invoke([*common_args(ws), "status"], env=env)
    assert run.exit_code == ExitCode.CONFIG, str(run)


def test_pgpassfile_in_url_query(ws: Workspace, tmp_path: Path) -> None:
    passfile = tmp_path / "pgpass"
    server = ws.db.server
    passfile.write_text(f"*:*:*:{server.user}:{PASSWORD}\n")
    passfile.chmod(0o600)
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{ws.db.name}?passfile={passfile}"
    run = invoke([*common_args(ws), "--database-url", url, "--json", "backup", "create"])
    assert run.exit_code == 0, str(run)


def test_pgsslmode(ws: Workspace) -> None:
    """The test servers have no SSL: 'require' must fail (so PGSSLMODE is honoured)."""
    env = ws.db.conninfo_env()
    run = invoke([*common_args(ws), "status"], env={**env, "PGSSLMODE": "disable"})
    assert run.exit_code == 0, str(run)
    run = invoke([*common_args(ws), "status"], env={**env, "PGSSLMODE": "require"})
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert "SSL" in run.error_line()
    run = invoke([*common_args(ws), "--database-url", ws.url + "?sslmode=require", "status"])
    assert run.exit_code == ExitCode.CONFIG, str(run)


def test_parse_database_url_keeps_every_part() -> None:
    info = parse_database_url("postgres://u%40x:p%3Aw@db.example:6543/my%2Fdb?sslmode=verify-full")
    assert (info.user, info.password, info.host, info.port, info.dbname, info.sslmode) == (
        "u@x",
        "p:w",
        "db.example",
        6543,
        "my/db",
        "verify-full",
    )
    assert "p:w" not in repr(info) and "p%3Aw" not in info.redacted_url()
    socket = parse_database_url("postgresql:///app?host=/run/postgresql&port=5433")
    assert (socket.host, socket.port, socket.dbname) == ("/run/postgresql", 5433, "app")


# --- every global option and its environment variable ----------------------------------


ENV_VARS = {
    "--database-url": "DATABASE_URL",
    "--environment": "DB_ROLLBACK_ENVIRONMENT",
    "--backup-dir": "DB_ROLLBACK_BACKUP_DIR",
    "--storage": "DB_ROLLBACK_STORAGE",
    "--log-dir": "DB_ROLLBACK_LOG_DIR",
    "--log-format": "DB_ROLLBACK_LOG_FORMAT",
    "--log-level": "DB_ROLLBACK_LOG_LEVEL",
    "--alembic-config": "DB_ROLLBACK_ALEMBIC_CONFIG",
    "--pg-bin-dir": "DB_ROLLBACK_PG_BIN_DIR",
    "--dry-run": "DB_ROLLBACK_DRY_RUN",
    "--yes": "DB_ROLLBACK_YES",
    "--keep-local": "DB_ROLLBACK_KEEP_LOCAL",
    "--s3-endpoint-url": "AWS_ENDPOINT_URL",
    "--s3-region": "DB_ROLLBACK_S3_REGION",
    "--s3-sse": "DB_ROLLBACK_S3_SSE",
    "--s3-kms-key-id": "DB_ROLLBACK_S3_KMS_KEY_ID",
    "--s3-storage-class": "DB_ROLLBACK_S3_STORAGE_CLASS",
}


@pytest.mark.parametrize(("option", "env_var"), ENV_VARS.items())
def test_help_names_the_env_var_of_each_option(
    option: str, env_var: str, cli_env: dict[str, str]
) -> None:
    help_text = " ".join(invoke(["--help"]).stdout.split())
    assert option in help_text
    assert f"env var: {env_var}" in help_text


def test_every_directory_option_from_env(ws: Workspace, tmp_path: Path) -> None:
    backups = tmp_path / "env-backups"
    logs = tmp_path / "env-logs"
    env = {
        "DATABASE_URL": ws.url,
        "DB_ROLLBACK_ENVIRONMENT": "qa-1",
        "DB_ROLLBACK_BACKUP_DIR": str(backups),
        "DB_ROLLBACK_LOG_DIR": str(logs),
        "DB_ROLLBACK_LOG_FORMAT": "json",
        "DB_ROLLBACK_PG_BIN_DIR": str(ws.db.server.bin_dir),
    }
    run = invoke(["--json", "backup", "create"], env=env)
    assert run.exit_code == 0, str(run)
    backup = Path(run.json["backup_file"])
    assert backup.parent == backups
    match = BACKUP_NAME.match(backup.name)
    assert match and match["env"] == "qa-1"
    assert read_manifest(backup)["environment"] == "qa-1"
    (log_file,) = logs.iterdir()
    assert LOG_NAME.match(log_file.name) and log_file.name.startswith("rollback_qa-1_")
    assert run.json["log_file"] == str(log_file)
    # JSON on stderr because DB_ROLLBACK_LOG_FORMAT said so.
    assert run.stderr_events() and run.stderr_events()[-1]["event"] == "audit"


def test_storage_from_env(ws: Workspace, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = invoke(
        [*common_args(ws), "--database-url", ws.url, "--json", "backup", "create"],
        env={"DB_ROLLBACK_STORAGE": store.as_uri()},
    )
    assert run.exit_code == 0, str(run)
    assert run.json["backup_uri"].startswith(store.as_uri() + "/backup_staging_")
    assert [p.suffix for p in sorted(store.iterdir())] == [".dump", ".json"]


def test_log_format_and_level_from_env(ws: Workspace) -> None:
    args = ["--database-url", ws.url, "--log-dir", str(ws.log_dir), *pg_bin(ws), "status"]
    console = invoke(args, env={"DB_ROLLBACK_LOG_FORMAT": "console"})
    assert console.exit_code == 0, str(console)
    assert not console.stderr_events()  # a console shows the checks, not the log
    verbose = invoke(args, env={"DB_ROLLBACK_LOG_FORMAT": "console", "DB_ROLLBACK_VERBOSE": "1"})
    assert verbose.exit_code == 0, str(verbose)
    assert "command started" in verbose.stderr and not verbose.stderr_events()
    quiet = invoke(args, env={"DB_ROLLBACK_LOG_FORMAT": "json", "DB_ROLLBACK_LOG_LEVEL": "error"})
    assert quiet.exit_code == 0, str(quiet)
    assert quiet.stderr_events() == []
    debug = invoke(args, env={"DB_ROLLBACK_LOG_FORMAT": "json", "DB_ROLLBACK_LOG_LEVEL": "debug"})
    assert {e["event"] for e in debug.stderr_events()} >= {"command started", "audit"}


def test_alembic_config_from_env(ws: Workspace, alembic_project: Path) -> None:
    run = invoke(
        ["--database-url", ws.url, "--log-dir", str(ws.log_dir), *pg_bin(ws), "--json", "status"],
        env={"DB_ROLLBACK_ALEMBIC_CONFIG": str(alembic_project)},
    )
    assert run.exit_code == 0, str(run)
    assert run.json["head_revision"] == "e41c0d7f6a95"


def test_dry_run_from_env(ws: Workspace) -> None:
    run = invoke(
        [*common_args(ws), "--database-url", ws.url, "backup", "create"],
        env={"DB_ROLLBACK_DRY_RUN": "1"},
    )
    assert run.exit_code == 0, str(run)
    assert "dry run: nothing was changed" in run.stdout
    assert ws.backups() == []


def test_yes_from_env(ws: Workspace) -> None:
    """A protected environment needs --yes (or DB_ROLLBACK_YES) without a terminal."""
    args = [*common_args(ws), "--database-url", ws.url, "-e", "production", "cleanup-artifacts"]
    refused = invoke(args)
    assert refused.exit_code == ExitCode.REFUSED, str(refused)
    allowed = invoke(args, env={"DB_ROLLBACK_YES": "true"})
    assert allowed.exit_code == 0, str(allowed)


def test_protected_environments_from_env(ws: Workspace) -> None:
    args = [*common_args(ws), "--database-url", ws.url, "-e", "live-eu", "cleanup-artifacts"]
    assert invoke(args).exit_code == 0
    refused = invoke(args, env={"DB_ROLLBACK_PROTECTED_ENVIRONMENTS": "live-us, live-eu"})
    assert refused.exit_code == ExitCode.REFUSED, str(refused)


# --- configuration and connection errors: exit 3, one line, no password ------------------


def bad_urls(db: TestDatabase) -> dict[str, str]:
    server = db.server
    auth = f"{server.user}:{PASSWORD}"
    return {
        "bad port": f"postgresql://{auth}@{server.host}:notaport/{db.name}",
        "port out of range": f"postgresql://{auth}@{server.host}:99999/{db.name}",
        "bad scheme": f"mysql://{auth}@{server.host}:{server.port}/{db.name}",
        "bad ipv6": f"postgresql://{auth}@[::1/{db.name}",
        "no database": f"postgresql://{auth}@{server.host}:{server.port}/",
        "unreachable": f"postgresql://{auth}@127.0.0.1:{unused_port()}/{db.name}",
        "wrong password": f"postgresql://{server.user}:wrong-{PASSWORD}@{server.host}:"
        f"{server.port}/{db.name}",
        "no such database": f"postgresql://{auth}@{server.host}:{server.port}/{db.name}_missing",
        "no such user": f"postgresql://nobody_{db.name}:{PASSWORD}@{server.host}:"
        f"{server.port}/{db.name}",
    }


@pytest.mark.parametrize(
    "case",
    [
        "bad port",
        "port out of range",
        "bad scheme",
        "bad ipv6",
        "no database",
        "unreachable",
        "wrong password",
        "no such database",
        "no such user",
    ],
)
@pytest.mark.parametrize("command", [["status"], ["backup", "create"]], ids=" ".join)
def test_bad_connection_exits_3_on_one_line(
    case: str, command: list[str], database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    ws = Workspace(database18, tmp_path / "work")
    url = bad_urls(ws.db)[case]
    run = run_subprocess([*common_args(ws), "--database-url", url, *command], cli_env, timeout=60)
    assert run.exit_code == ExitCode.CONFIG, str(run)
    line = run.error_line()
    assert line.startswith("db-rollback: error: ")
    assert run.stdout == ""
    assert_no_password(run.stdout, run.stderr, where=case)
    for log_file in ws.log_files():
        assert_no_password(log_file.read_text(), where=f"{case} log")
    assert "Traceback" not in run.stderr
    assert ws.backups() == []  # nothing written


def test_error_messages_say_what_is_wrong(ws: Workspace) -> None:
    urls = bad_urls(ws.db)
    expected = {
        "bad port": "invalid port",
        "bad scheme": "postgresql://",
        "no database": "names no database",
        "unreachable": "cannot connect to 127.0.0.1",
        "wrong password": "password authentication failed",
        "no such database": "does not exist",
    }
    for case, words in expected.items():
        run = invoke([*common_args(ws), "--database-url", urls[case], "status"])
        assert run.exit_code == ExitCode.CONFIG, f"{case}: {run}"
        assert words in run.error_line(), f"{case}: {run.error_line()}"


def test_pg_variables_without_database(ws: Workspace) -> None:
    env = {k: v for k, v in ws.db.conninfo_env().items() if k != "PGDATABASE"}
    run = invoke([*common_args(ws), "status"], env=env)
    assert run.exit_code == ExitCode.CONFIG
    assert "no database given" in run.error_line()


def test_pgport_not_a_number(ws: Workspace) -> None:
    run = invoke([*common_args(ws), "status"], env={**ws.db.conninfo_env(), "PGPORT": "five"})
    assert run.exit_code == ExitCode.CONFIG
    assert "PGPORT" in run.error_line()


def test_json_result_on_config_error(ws: Workspace) -> None:
    url = bad_urls(ws.db)["wrong password"]
    run = invoke([*common_args(ws), "--database-url", url, "--json", "status"])
    assert run.exit_code == ExitCode.CONFIG
    doc = json.loads(run.stdout)
    assert doc["exit_code"] == 3 and doc["outcome"] == "config_error"
    assert "password authentication failed" in doc["message"]
    assert_no_password(run.stdout)


def test_pg_variables_fill_what_the_url_leaves_out(ws: Workspace) -> None:
    """As libpq does: our connections and pg_dump's reach the same server as the same user."""
    server = ws.db.server
    url = f"postgresql://{server.user}@{server.host}/{ws.db.name}"  # no password, no port
    env = {"PGPASSWORD": PASSWORD, "PGPORT": str(server.port)}
    for command in (["status"], ["backup", "create"]):
        run = invoke([*common_args(ws), "--database-url", url, *command], env=env)
        assert run.exit_code == 0, str(run)
    url = f"postgresql://{server.user}:{PASSWORD}@{server.host}:{server.port}/{ws.db.name}"
    run = invoke(
        [*common_args(ws), "--database-url", url, "backup", "create"],
        env={"PGPORT": "1", "PGPASSWORD": "not-this-one", "PGUSER": "nobody"},
    )
    assert run.exit_code == 0, str(run)  # the URL's own settings win


def test_unknown_url_option_is_a_config_error(ws: Workspace) -> None:
    run = invoke([*common_args(ws), "--database-url", ws.url + "?no_such_option=1", "status"])
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert 'invalid connection option "no_such_option"' in run.error_line()
    assert_no_password(run.stdout, run.stderr)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p%40ss@db.example:6543/app?sslmode=require",
        "postgresql://u@[::1]:5433/app",
        "postgresql://u@db/app?passfile=/run/secrets/pgpass",
        "postgresql:///app?host=/run/postgresql&port=5433",
        "postgresql://u:pw@h/my%20db?options=-c%20search_path%3Dx&application_name=ci",
    ],
)
def test_url_round_trip(url: str) -> None:
    """The URL handed to Alembic/SQLAlchemy describes the same connection as the one given."""
    info = parse_database_url(url)
    assert parse_database_url(info.to_url()) == info
    redacted = info.redacted_url()
    assert ":pw@" not in redacted and "p%40ss" not in redacted


def test_passfile_url_reaches_alembic(ws: Workspace, tmp_path: Path, alembic_project: Path) -> None:
    """A passfile is the only password source: the in-process Alembic connection needs it too."""
    config = Config(str(alembic_project))
    config.attributes["configure_logger"] = False
    driver_url = ws.url.replace("postgresql://", "postgresql+psycopg2://", 1)
    config.set_main_option("sqlalchemy.url", driver_url.replace("%", "%%"))
    alembic_command.upgrade(config, "b7e2f5a91c38")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{ws.db.server.user}:{PASSWORD}\n")
    passfile.chmod(0o600)
    server = ws.db.server
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{ws.db.name}?passfile={passfile}"
    run = invoke(
        [
            *common_args(ws),
            "--database-url",
            url,
            "--alembic-config",
            str(alembic_project),
            "rollback",
            "schema",
            "--to-revision",
            "8d4b6a0c9e12",
        ]
    )
    assert run.exit_code == 0, str(run)
    assert ws.db.query("SELECT version_num FROM alembic_version") == [("8d4b6a0c9e12",)]
