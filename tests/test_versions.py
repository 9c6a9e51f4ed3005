"""Client and server versions: pg_dump must be at least the server's major. Debian's
PostgreSQL 15 client against the PostgreSQL 18 server is refused (exit 7, naming what to
install); the embedded wheel's 18 client, given by --pg-bin-dir, DB_ROLLBACK_PG_BIN_DIR or
PATH, works. Archives record their format version, and an older pg_restore is refused early."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollback_cli.errors import ExitCode, Refused
from rollback_cli.postgres import clients as pg
from tests.cli_helpers import Workspace, invoke, read_manifest
from tests.servers import TestDatabase, debian_bin_dir, embedded_bin_dir

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def ws18(database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    database18.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
    return Workspace(database18, tmp_path / "work")


@pytest.fixture
def ws15(database15: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    database15.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
    return Workspace(database15, tmp_path / "work")


def embedded() -> Path:
    found = embedded_bin_dir()
    assert found is not None
    return found


def args_without_bin_dir(ws: Workspace) -> list[str]:
    args = ws.args()
    at = args.index("--pg-bin-dir")
    return args[:at] + args[at + 2 :]


def path_without_postgres() -> str:
    """PATH minus directories holding an 18 client (so only Debian's 15 is around)."""
    keep = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        version = pg.client_version(Path(entry) / "pg_dump") if entry else None
        if version is None or version[0] < 18:
            keep.append(entry)
    return os.pathsep.join(keep)


def test_the_two_servers_have_the_expected_majors(ws15: Workspace, ws18: Workspace) -> None:
    assert ws15.db.server.major == 15 and ws18.db.server.major == 18
    assert debian_bin_dir(15) == DEBIAN_15
    assert pg.client_version(DEBIAN_15 / "pg_dump")[0] == 15  # type: ignore[index]
    assert pg.client_version(embedded() / "pg_dump")[0] == 18  # type: ignore[index]


@pytest.mark.parametrize("command", [["backup", "create"], ["status"]], ids=" ".join)
def test_debian_15_client_against_18_server_is_refused(ws18: Workspace, command: list[str]) -> None:
    ws18.pg_bin_dir = DEBIAN_15
    run = ws18.run(*command)
    assert run.exit_code == ExitCode.REFUSED, str(run)
    line = run.error_line()
    assert "postgresql-client-18" in line
    assert "15." in line and "PostgreSQL 18" in line
    assert ws18.backups() == [] or all(not n.startswith("backup_") for n in ws18.backups())


def test_without_any_18_client_the_search_is_refused(ws18: Workspace) -> None:
    run = invoke(
        [*args_without_bin_dir(ws18), "backup", "create"], env={"PATH": path_without_postgres()}
    )
    assert run.exit_code == ExitCode.REFUSED, str(run)
    line = run.error_line()
    assert "install postgresql-client-18" in line
    assert "/usr/lib/postgresql/15/bin" in line  # says what it found
    assert "DB_ROLLBACK_PG_BIN_DIR" in line


def test_embedded_client_by_option(ws18: Workspace) -> None:
    ws18.pg_bin_dir = embedded()
    backup = ws18.backup()
    manifest = read_manifest(backup)
    assert manifest["pg_dump_version"].startswith("18")
    assert manifest["server_version"].startswith("18")
    run = ws18.run("backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)


def test_embedded_client_by_env_var(ws18: Workspace) -> None:
    run = invoke(
        [*args_without_bin_dir(ws18), "--json", "backup", "create"],
        env={"DB_ROLLBACK_PG_BIN_DIR": str(embedded()), "PATH": path_without_postgres()},
    )
    assert run.exit_code == 0, str(run)
    assert read_manifest(Path(run.json["backup_file"]))["pg_dump_version"].startswith("18")


def test_client_found_on_path(ws18: Workspace, tmp_path: Path) -> None:
    """A pg_dump symlinked onto PATH resolves to its installation (pg_restore next to it)."""
    on_path = tmp_path / "path-bin"
    on_path.mkdir()
    (on_path / "pg_dump").symlink_to(embedded() / "pg_dump")
    run = invoke(
        [*args_without_bin_dir(ws18), "--json", "backup", "create"],
        env={"PATH": f"{on_path}{os.pathsep}{path_without_postgres()}"},
    )
    assert run.exit_code == 0, str(run)
    assert read_manifest(Path(run.json["backup_file"]))["pg_dump_version"].startswith("18")


def test_debian_wrapper_on_path_is_a_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """/usr/bin/pg_dump is Debian's pg_wrapper: keep /usr/bin, not the wrapper's directory."""
    if not Path("/usr/bin/pg_dump").exists():
        pytest.fail("Debian's postgresql-client-common is expected on the test machine")
    monkeypatch.setenv("PATH", "/usr/bin")
    candidates = dict(pg._candidate_dirs(None))
    assert candidates["PATH"] == Path("/usr/bin")
    assert pg.client_version(candidates["PATH"] / "pg_dump") is not None


def test_matching_major_is_chosen_for_15(ws15: Workspace) -> None:
    run = invoke(
        [*args_without_bin_dir(ws15), "--json", "status"], env={"PATH": path_without_postgres()}
    )
    assert run.exit_code == 0, str(run)
    client = next(c for c in run.json["checks"] if c["name"] == "client")
    assert str(DEBIAN_15) in client["detail"] and "pg_dump 15." in client["detail"]
    connection = next(c for c in run.json["checks"] if c["name"] == "connection")
    assert "PostgreSQL 15." in connection["detail"]
    tools = pg.find_client(15)
    assert tools.major == 15 and tools.bin_dir == DEBIAN_15


def test_find_client_prefers_the_nearest_major() -> None:
    assert pg.find_client(15).major == 15
    assert pg.find_client(14).major == 15
    with pytest.raises(Refused) as refused:
        pg.find_client(18, DEBIAN_15)
    assert "postgresql-client-18" in refused.value.one_line()
    assert pg.find_client(15, embedded()).major == 18


def test_newer_client_on_older_server(ws15: Workspace) -> None:
    ws15.pg_bin_dir = embedded()
    backup = ws15.backup()
    manifest = read_manifest(backup)
    assert manifest["pg_dump_version"].startswith("18") and manifest["server_version"][:2] == "15"
    run = ws15.run("backup", "verify", str(backup))
    assert run.exit_code == 0, str(run)


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_newer_clients_backup_restores_into_15(ws15: Workspace, fmt: str) -> None:
    """pg_restore/pg_dump 17+ always emit SET transaction_timeout, which PostgreSQL 15
    rejects; the restore goes through psql without that line and succeeds."""
    ws15.pg_bin_dir = embedded()
    backup = ws15.backup("--format", fmt)
    run = ws15.run("backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)
    assert ws15.db.related_databases() == [ws15.db.name]


def test_archive_version_is_recorded(ws15: Workspace, ws18: Workspace) -> None:
    old = read_manifest(ws15.backup())
    ws18.pg_bin_dir = embedded()
    new = read_manifest(ws18.backup())
    assert old["archive_version"].startswith("1.")
    assert new["archive_version"].startswith("1.")
    assert tuple(map(int, new["archive_version"].split("."))) > tuple(
        map(int, old["archive_version"].split("."))
    )
    plain = read_manifest(ws15.backup("--format", "plain"))
    assert plain["archive_version"] is None
    directory = read_manifest(ws15.backup("--format", "directory"))
    assert directory["archive_version"] == old["archive_version"]


def test_old_pg_restore_is_refused_early(ws15: Workspace) -> None:
    """A backup dumped by pg_dump 18 cannot be read by pg_restore 15: exit 7, before any work."""
    ws15.pg_bin_dir = embedded()
    backup = ws15.backup()
    ws15.pg_bin_dir = DEBIAN_15
    run = ws15.run("backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert "postgresql-client-18" in run.error_line()
    assert ws15.db.related_databases() == [ws15.db.name]  # no scratch database was made


def test_bin_dir_without_pg_dump(ws18: Workspace, tmp_path: Path) -> None:
    ws18.pg_bin_dir = tmp_path
    run = ws18.run("backup", "create")
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert "no usable pg_dump" in run.error_line()


def test_bin_dir_that_does_not_exist(ws18: Workspace, tmp_path: Path) -> None:
    ws18.pg_bin_dir = tmp_path / "nowhere"
    run = ws18.run("backup", "create")
    assert run.exit_code in (ExitCode.USAGE, ExitCode.CONFIG), str(run)
    assert str(tmp_path / "nowhere") in run.error_line()
