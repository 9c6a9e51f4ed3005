"""Backups on real PostgreSQL 15 and 18: create (types, formats, jobs, compression, labels),
naming, manifests, permissions, snapshot-consistent row counts, list, verify and cleanup."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from rollback_cli import __version__
from rollback_cli.errors import ExitCode
from tests.cli_helpers import (
    BACKUP_NAME,
    PASSWORD,
    Workspace,
    invoke,
    mode,
    read_events,
    read_manifest,
    run_subprocess,
    seed_shop,
    table_counts,
    write_manifest,
)
from tests.servers import PostgresCluster, TestDatabase, temporary_database

REV_TIER = "b7e2f5a91c38"
REV_HEAD = "e41c0d7f6a95"


@pytest.fixture
def ws(database: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database)
    return Workspace(database, tmp_path / "work")


@pytest.fixture
def ws18(database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database18)
    return Workspace(database18, tmp_path / "work")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restore_counts(ws: Workspace, backup: Path, fmt: str = "custom") -> dict[str, int]:
    """Restore ``backup`` into a fresh database with the server's own tools; its row counts."""
    with temporary_database(ws.db.server, prefix="r") as target:
        env = {"PATH": "/usr/bin:/bin", **target.conninfo_env()}
        bin_dir = ws.db.server.bin_dir
        if fmt == "plain":
            argv = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(backup)]
        else:
            argv = [str(bin_dir / "pg_restore"), "--exit-on-error", "-d", target.name, str(backup)]
        subprocess.run(argv, env=env, check=True, capture_output=True)
        return table_counts(target)


# --- create --------------------------------------------------------------------------------


def test_create_default_backup(ws: Workspace) -> None:
    started = datetime.now(timezone.utc).replace(microsecond=0)
    run, doc = ws.run_json("backup", "create")
    assert run.exit_code == 0, str(run)
    backup = Path(doc["backup_file"])
    match = BACKUP_NAME.match(backup.name)
    assert match and match["env"] == "staging" and match["ext"] == "dump" and not match["type"]
    stamp = datetime.strptime(match["stamp"], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
    assert started <= stamp <= datetime.now(timezone.utc)  # UTC
    assert backup.parent == ws.backup_dir
    assert sorted(ws.backups()) == [backup.name, backup.name + ".json"]  # no temp files left

    manifest = read_manifest(backup)
    assert manifest["manifest_version"] == 1
    assert manifest["tool_version"] == __version__
    assert manifest["file_name"] == backup.name
    assert manifest["size"] == backup.stat().st_size
    assert manifest["sha256"] == sha256_of(backup) == doc["backup_sha256"]
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset() == timedelta(0)
    assert manifest["environment"] == "staging"
    assert manifest["database"] == ws.db.name
    assert manifest["host"] == "127.0.0.1"
    assert manifest["server_version"].split(".")[0] == str(ws.db.server.major)
    assert re.match(r"^\d+\.\d+", manifest["pg_dump_version"])
    assert (manifest["type"], manifest["format"], manifest["compression"]) == (
        "full",
        "custom",
        None,
    )
    assert manifest["alembic_revisions"] == []
    assert manifest["row_counts"] == {"public.customers": 50, "public.orders": 500}
    assert manifest["label"] is None and manifest["git_commit"] is None
    assert doc["backup_uri"] == backup.resolve().as_uri()
    assert doc["row_counts"] == manifest["row_counts"]

    assert mode(ws.backup_dir) == 0o700
    assert mode(backup) == 0o600
    assert mode(Path(f"{backup}.json")) == 0o600
    assert restore_counts(ws, backup) == manifest["row_counts"]


def test_manifest_records_alembic_revision_git_commit_and_label(
    database: TestDatabase, tmp_path: Path, alembic_project: Path, cli_env: dict[str, str]
) -> None:
    ws = Workspace(database, tmp_path / "work")
    config = Config(str(alembic_project))
    config.attributes["configure_logger"] = False
    config.set_main_option(
        "sqlalchemy.url",
        ws.url.replace("postgresql://", "postgresql+psycopg2://", 1).replace("%", "%%"),
    )
    command.upgrade(config, REV_TIER)
    ws.alembic_ini = alembic_project
    sha = "0123456789abcdef0123456789abcdef01234567"
    run, doc = ws.run_json("backup", "create", "--label", "before v42", env={"GITHUB_SHA": sha})
    assert run.exit_code == 0, str(run)
    manifest = read_manifest(Path(doc["backup_file"]))
    assert manifest["alembic_revisions"] == [REV_TIER]
    assert doc["revision_before"] == doc["revision_after"] == REV_TIER
    assert manifest["git_commit"] == sha
    assert manifest["label"] == "before v42"
    assert manifest["row_counts"]["public.alembic_version"] == 1
    listed = ws.run_json("backup", "list")[1]["backups"]
    assert listed[0]["alembic_revision"] == REV_TIER and listed[0]["label"] == "before v42"


@pytest.mark.parametrize(
    ("backup_type", "suffix"), [("full", ""), ("schema", "_schema"), ("data", "_data")]
)
def test_backup_types(ws: Workspace, backup_type: str, suffix: str) -> None:
    backup = ws.backup("--type", backup_type)
    assert backup.name.endswith(f"{suffix}.dump")
    assert BACKUP_NAME.match(backup.name)
    manifest = read_manifest(backup)
    assert manifest["type"] == backup_type
    expected = {} if backup_type == "schema" else {"public.customers": 50, "public.orders": 500}
    assert manifest["row_counts"] == expected
    listing = subprocess.run(
        [str(ws.db.server.bin_dir / "pg_restore"), "--list", str(backup)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ("TABLE DATA public orders" in listing) == (backup_type != "schema")
    assert (" TABLE public orders" in listing) == (backup_type != "data")
    # A data-only archive is restore-tested into a copy of the live schema.
    run = ws.run("--json", "backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)
    assert run.json["restore_test"]["rows"] == (0 if backup_type == "schema" else 550)
    assert ws.db.related_databases() == [ws.db.name]


def test_data_backup_that_no_longer_fits_the_live_schema(ws18: Workspace) -> None:
    backup = ws18.backup("--type", "data")
    ws18.db.execute("ALTER TABLE orders DROP COLUMN amount")
    run = ws18.run("backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert "restore test of" in run.error_line() and "amount" in run.error_line()
    assert ws18.db.related_databases() == [ws18.db.name]


@pytest.mark.parametrize(
    ("fmt", "ext"), [("custom", ".dump"), ("plain", ".sql"), ("directory", ".dir")]
)
def test_backup_formats(ws: Workspace, fmt: str, ext: str) -> None:
    backup = ws.backup("--format", fmt)
    assert backup.name.endswith(ext)
    manifest = read_manifest(backup)
    assert manifest["format"] == fmt
    if fmt == "directory":
        assert backup.is_dir() and mode(backup) == 0o700
        assert (backup / "toc.dat").is_file()
        for member in backup.rglob("*"):
            assert mode(member) == 0o600, f"{member} is {oct(mode(member))}"
        assert manifest["size"] == sum(p.stat().st_size for p in backup.rglob("*"))
    else:
        assert mode(backup) == 0o600
        assert manifest["sha256"] == sha256_of(backup)
        assert manifest["size"] == backup.stat().st_size
    if fmt == "plain":
        text = backup.read_text()
        assert "PostgreSQL database dump" in text and "PostgreSQL database dump complete" in text
    run = ws.run("--json", "backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)
    assert run.json["restore_test"]["mismatches"] == []
    assert run.json["restore_test"]["rows"] == 550
    assert ws.db.related_databases() == [ws.db.name]  # the scratch database is gone


def test_directory_format_with_parallel_jobs(ws: Workspace) -> None:
    backup = ws.backup("--format", "directory", "--jobs", "2")
    manifest = read_manifest(backup)
    assert manifest["row_counts"] == {"public.customers": 50, "public.orders": 500}
    assert restore_counts(ws, backup) == manifest["row_counts"]


def test_jobs_needs_directory_format(ws: Workspace) -> None:
    run = ws.run("backup", "create", "--jobs", "2")
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "--format directory" in run.error_line()
    assert ws.backups() == []


def test_compression(ws: Workspace) -> None:
    ws.db.execute(
        "CREATE TABLE padding AS SELECT g, repeat('compressible ', 50) AS t "
        "FROM generate_series(1, 3000) g"
    )
    plain = ws.backup("--compress", "none")
    gzip = ws.backup("--compress", "gzip:9")
    level = ws.backup("--compress", "5")
    assert read_manifest(gzip)["compression"] == "gzip:9"
    assert gzip.stat().st_size * 5 < plain.stat().st_size
    assert level.stat().st_size * 5 < plain.stat().st_size
    for backup in (plain, gzip, level):
        assert ws.run("backup", "verify", str(backup)).exit_code == 0


def test_new_style_compression_needs_pg_dump_16(
    database15: TestDatabase, ws18: Workspace, tmp_path: Path
) -> None:
    gzip = ws18.backup("--compress", "gzip:4")  # passed as METHOD:LEVEL to pg_dump 18
    assert read_manifest(gzip)["compression"] == "gzip:4"
    assert ws18.run("backup", "verify", str(gzip), "--restore-test").exit_code == 0
    # zstd: pg_dump 18 takes it when built with zstd; otherwise a usage error, nothing written.
    run = ws18.run("--json", "backup", "create", "--compress", "zstd:3")
    if run.exit_code == 0:
        assert read_manifest(Path(run.json["backup_file"]))["compression"] == "zstd:3"
    else:
        assert run.exit_code == ExitCode.USAGE, str(run)
        assert "supports gzip, none" in run.error_line()
        assert len([n for n in ws18.backups() if n.startswith("backup_")]) == 2
    assert not [n for n in ws18.backups() if n.startswith(".tmp-")]
    ws15 = Workspace(database15, tmp_path / "work15")
    run = ws15.run("backup", "create", "--compress", "zstd:3")
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert "supports gzip, none" in run.error_line()
    assert ws15.backups() == []
    assert ws15.backup("--compress", "gzip:4").is_file()  # translated to --compress=4


@pytest.mark.parametrize("spec", ["bzip2", "gzip:x", "gzip:", ":3", ""])
def test_bad_compression_is_a_usage_error(ws18: Workspace, spec: str) -> None:
    run = ws18.run("backup", "create", "--compress", spec)
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert ws18.backups() == []


def test_a_name_clash_gets_a_suffix(ws18: Workspace) -> None:
    """Never overwrite: occupy the names of the next few seconds, then back up."""
    ws18.backup_dir.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    taken = []
    for second in range(6):
        stamp = (now + timedelta(seconds=second)).strftime("%Y%m%d_%H%M%S")
        path = ws18.backup_dir / f"backup_staging_{stamp}.dump"
        path.write_text("someone else's file")
        taken.append(path)
    backup = ws18.backup()
    assert backup not in taken
    assert backup.name.endswith("_1.dump")
    assert BACKUP_NAME.match(backup.name)
    for path in taken:
        assert path.read_text() == "someone else's file"
    assert read_manifest(backup)["file_name"] == backup.name


def test_dry_run_writes_nothing(ws18: Workspace) -> None:
    run = ws18.run("backup", "create", "--dry-run")
    assert run.exit_code == 0, str(run)
    assert "dry run: nothing was changed" in run.stdout
    assert "pg_dump" in run.stdout and "--snapshot" in run.stdout
    assert not [name for name in ws18.backups() if name.startswith("backup_")]
    run, doc = ws18.run_json("backup", "create", "--dry-run")
    assert doc["outcome"] == "dry_run" and doc["backup_file"] is None
    assert [step["step"] for step in doc["plan"]] == ["connect", "snapshot", "dump", "store"]


def test_backup_of_an_empty_database(
    database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    ws = Workspace(database18, tmp_path / "work")
    backup = ws.backup()
    assert read_manifest(backup)["row_counts"] == {}
    assert ws.run("backup", "verify", str(backup), "--restore-test").exit_code == 0


def test_unusual_names_survive(
    database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    database18.execute(
        'CREATE SCHEMA "Odd Schema"; CREATE TABLE "Odd Schema"."Mixed ""Case"" T" (x int);'
        'INSERT INTO "Odd Schema"."Mixed ""Case"" T" SELECT generate_series(1, 7);'
        "CREATE TABLE parent (id int, k int) PARTITION BY RANGE (k);"
        "CREATE TABLE part1 PARTITION OF parent FOR VALUES FROM (0) TO (10);"
        "CREATE TABLE part2 PARTITION OF parent FOR VALUES FROM (10) TO (20);"
        "INSERT INTO parent SELECT g, g FROM generate_series(0, 19) g;"
    )
    ws = Workspace(database18, tmp_path / "work")
    backup = ws.backup()
    counts = read_manifest(backup)["row_counts"]
    assert counts['Odd Schema.Mixed "Case" T'] == 7
    assert counts["public.parent"] == 20
    run = ws.run("--json", "backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)


# --- snapshot consistency --------------------------------------------------------------


def test_row_counts_come_from_the_dump_snapshot(ws18: Workspace) -> None:
    """Rows committed while pg_dump runs are in neither the dump nor the manifest counts."""
    db = ws18.db
    db.execute(
        "CREATE TABLE bulk (id bigserial PRIMARY KEY, payload text);"
        "INSERT INTO bulk (payload) SELECT md5(g::text) FROM generate_series(1, 300000) g;"
        "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now());"
    )
    stop = threading.Event()
    inserted = {"batches": 0}

    def writer() -> None:
        conn = db.connect()
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("INSERT INTO events DEFAULT VALUES")
                    cur.execute(
                        "INSERT INTO bulk (payload) SELECT 'late' FROM generate_series(1,50)"
                    )
                    inserted["batches"] += 1
        finally:
            conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while inserted["batches"] < 20:
            time.sleep(0.01)
        before = inserted["batches"]
        backup = ws18.backup()
        during = inserted["batches"] - before
    finally:
        stop.set()
        thread.join()
    assert during > 5, "the writer must have committed while the dump ran"
    manifest = read_manifest(backup)
    counts = manifest["row_counts"]
    live = table_counts(db)
    assert counts["public.events"] < live["public.events"]
    assert counts["public.bulk"] < live["public.bulk"]
    restored = restore_counts(ws18, backup)
    assert restored == counts
    assert manifest["snapshot"]  # pg_dump --snapshot was used
    run = ws18.run("backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)


# --- list ----------------------------------------------------------------------------------


def test_list_table_and_json(ws18: Workspace) -> None:
    assert ws18.run("backup", "list").stdout.strip() == "no backups found"
    full = ws18.backup("--label", "one")
    schema = ws18.backup("--type", "schema", "--format", "plain")
    directory = ws18.backup("--format", "directory")
    # An invalid one: a dump without its manifest.
    orphan = ws18.backup_dir / "backup_staging_20200101_000000.dump"
    orphan.write_bytes(full.read_bytes())

    run, doc = ws18.run_json("backup", "list")
    assert run.exit_code == 0, str(run)
    rows = {Path(r["name"]).name: r for r in doc["backups"]}
    assert set(rows) == {full.name, schema.name, directory.name, orphan.name}
    assert rows[full.name]["valid"] and rows[full.name]["type"] == "full"
    assert rows[full.name]["size"] == full.stat().st_size
    assert rows[full.name]["label"] == "one"
    assert rows[schema.name]["type"] == "schema" and rows[schema.name]["format"] == "plain"
    assert rows[directory.name]["valid"] and rows[directory.name]["format"] == "directory"
    assert not rows[orphan.name]["valid"] and rows[orphan.name]["problem"] == "no manifest"
    for row in doc["backups"]:
        assert row["created_at"] and "age_seconds" in row
        assert "alembic_revision" in row
    # Newest first.
    stamps = [r["created_at"] for r in doc["backups"]]
    assert stamps == sorted(stamps, reverse=True)

    table = ws18.run("backup", "list").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "DATABASE",
        "ENV",
        "LOCATION",
        "SIZE",
        "AGE",
        "TYPE",
        "REVISION",
        "LABEL",
        "STATUS",
    ]
    by_name = {line.split()[0]: line for line in table[1:]}
    assert by_name[full.name].rstrip().endswith("valid")
    assert "INVALID: no manifest" in by_name[orphan.name]
    assert re.search(r"\s\d+s\s+full\s", by_name[full.name])


def test_list_marks_a_size_mismatch_and_a_missing_file(ws18: Workspace) -> None:
    truncated = ws18.backup()
    gone = ws18.backup("--type", "schema")
    with truncated.open("r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    gone.unlink()
    rows = {Path(r["name"]).name: r for r in ws18.run_json("backup", "list")[1]["backups"]}
    assert not rows[truncated.name]["valid"] and "differs" in rows[truncated.name]["problem"]
    assert not rows[gone.name]["valid"] and rows[gone.name]["problem"] == "backup file missing"


# --- verify --------------------------------------------------------------------------------


def test_verify_by_path_name_and_uri(ws: Workspace) -> None:
    backup = ws.backup()
    for ref in (str(backup), backup.name, backup.resolve().as_uri()):
        run = ws.run("--json", "backup", "verify", ref)
        assert run.exit_code == 0, f"{ref}: {run}"
        checks = {c["check"]: c for c in run.json["checks"]}
        assert set(checks) >= {"manifest", "size", "sha256", "readable"}
        assert checks["sha256"]["detail"] == read_manifest(backup)["sha256"]


def test_verify_restore_test_compares_with_the_manifest(ws: Workspace) -> None:
    backup = ws.backup()
    run = ws.run("--json", "backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == 0, str(run)
    assert run.json["restore_test"]["tables"] == 2
    assert ws.db.related_databases() == [ws.db.name]
    # A manifest that lies about a row count fails the restore test (and only it).
    manifest = read_manifest(backup)
    manifest["row_counts"]["public.orders"] = 499
    write_manifest(backup, manifest)
    assert ws.run("backup", "verify", str(backup)).exit_code == 0
    run = ws.run("backup", "verify", str(backup), "--restore-test")
    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
    assert "public.orders: 500 rows, manifest 499" in run.error_line()
    assert ws.db.related_databases() == [ws.db.name]


# --- cleanup -------------------------------------------------------------------------------


def age_backup(backup: Path, days: float) -> None:
    manifest = read_manifest(backup)
    created = datetime.now(timezone.utc) - timedelta(days=days)
    manifest["created_at"] = created.isoformat()
    write_manifest(backup, manifest)


def test_cleanup_older_than_keep_last_and_dry_run(ws18: Workspace) -> None:
    old = [ws18.backup() for _ in range(3)]
    fresh = ws18.backup()
    for days, backup in zip((40, 50, 60), old, strict=True):
        age_backup(backup, days)
    other_env = ws18.backup(environment="production")
    age_backup(other_env, 90)

    run, doc = ws18.run_json("backup", "cleanup", "--older-than", "30d", "--dry-run")
    assert run.exit_code == 0, str(run)
    assert sorted(doc["removed"]) == sorted(p.name for p in old)
    assert doc["outcome"] == "dry_run"
    assert all(p.exists() and Path(f"{p}.json").exists() for p in old)

    run, doc = ws18.run_json("backup", "cleanup", "--older-than", "45d", "--keep-last", "0")
    assert run.exit_code == 0, str(run)
    assert sorted(doc["removed"]) == sorted(p.name for p in old[1:])
    for backup in old[1:]:
        assert not backup.exists() and not Path(f"{backup}.json").exists()
    assert old[0].exists() and fresh.exists()
    assert other_env.exists(), "another environment's backups are not touched"

    # --keep-last keeps the newest valid ones even when they are old.
    age_backup(fresh, 35)
    run, doc = ws18.run_json("backup", "cleanup", "--older-than", "30d", "--keep-last", "1")
    assert run.exit_code == 0, str(run)
    assert doc["removed"] == [old[0].name]
    assert fresh.exists()


def test_cleanup_takes_bare_days_and_units(ws18: Workspace) -> None:
    backup = ws18.backup()
    age_backup(backup, 3)
    ws18.backup()  # a newer full backup: the newest one of a database is never removed
    for spec, removed in (("1w", []), ("4", []), ("2", [backup.name])):
        run, doc = ws18.run_json(
            "backup", "cleanup", "--older-than", spec, "--keep-last", "0", "--dry-run"
        )
        assert run.exit_code == 0, str(run)
        assert doc["removed"] == removed, spec
    age_backup(backup, 0.1)
    run, doc = ws18.run_json(
        "backup", "cleanup", "--older-than", "1h", "--keep-last", "0", "--dry-run"
    )
    assert doc["removed"] == [backup.name]


def test_cleanup_removes_an_old_invalid_leftover(ws18: Workspace) -> None:
    ws18.backup()
    leftover = ws18.backup_dir / "backup_staging_20200101_000000.dump"
    leftover.write_bytes(b"PGDMP partial")
    old = time.time() - 90 * 86400
    os.utime(leftover, (old, old))
    run, doc = ws18.run_json("backup", "cleanup", "--older-than", "30d")
    assert run.exit_code == 0, str(run)
    assert doc["removed"] == [leftover.name]
    assert not leftover.exists()


def test_list_json_is_valid_json_with_no_backups(ws18: Workspace) -> None:
    run = ws18.run("--json", "backup", "list")
    assert run.exit_code == 0
    assert json.loads(run.stdout)["backups"] == []


def test_manifest_time_without_zone_is_utc(ws18: Workspace) -> None:
    """A hand-edited created_at without a zone must not break list or cleanup."""
    old = ws18.backup()
    fresh = ws18.backup()  # the newest full backup stays, whatever --keep-last says
    manifest = read_manifest(old)
    manifest["created_at"] = "2020-01-01T00:00:00"
    write_manifest(old, manifest)
    run, doc = ws18.run_json("backup", "list")
    assert run.exit_code == 0, str(run)
    assert [Path(r["name"]).name for r in doc["backups"]] == [fresh.name, old.name]
    assert doc["backups"][1]["created_at"] == "2020-01-01T00:00:00+00:00"
    run, doc = ws18.run_json("backup", "cleanup", "--older-than", "30d", "--keep-last", "0")
    assert run.exit_code == 0, str(run)
    assert doc["removed"] == [old.name]


def test_dry_run_creates_no_directory(ws18: Workspace, tmp_path: Path) -> None:
    run = ws18.run("backup", "create", "--dry-run")
    assert run.exit_code == 0, str(run)
    assert not ws18.backup_dir.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ws18.args()
    args[args.index("--backup-dir") + 1] = str(blocker / "backups")
    run = invoke([*args, "backup", "create", "--dry-run"])
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert "is not a directory" in run.error_line()


def test_default_directories_are_relative_to_the_working_directory(
    ws18: Workspace, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["--database-url", ws18.url, "--pg-bin-dir", str(ws18.db.server.bin_dir)]
    run = run_subprocess([*args, "--json", "backup", "create"], cli_env, cwd=cwd)
    assert run.exit_code == 0, str(run)
    assert Path(run.json["backup_file"]).parent == Path("backups")
    assert (cwd / run.json["backup_file"]).is_file()
    assert len(list((cwd / "logs").glob("rollback_staging_*.log"))) == 1
    assert run.stderr_events()  # JSON on stderr: not a terminal


def test_backup_by_an_owner_without_superuser(ws18: Workspace) -> None:
    """The usual CI role: owns the database and its tables, has CREATEDB, no superuser."""
    server = ws18.db.server
    role = f"owner_{ws18.db.name}"
    server.execute(f"CREATE ROLE \"{role}\" LOGIN CREATEDB PASSWORD '{PASSWORD}'")
    try:
        server.execute(f'ALTER DATABASE "{ws18.db.name}" OWNER TO "{role}"')
        for table in ("customers", "orders"):
            ws18.db.execute(f'ALTER TABLE "{table}" OWNER TO "{role}"')
        url = ws18.url.replace("postgresql://postgres:", f"postgresql://{role}:", 1)
        run, doc = ws18.run_json("backup", "create", url=url)
        assert run.exit_code == 0, str(run)
        assert doc["row_counts"] == {"public.customers": 50, "public.orders": 500}
        run = ws18.run("backup", "verify", doc["backup_file"], "--restore-test", url=url)
        assert run.exit_code == 0, str(run)
        assert ws18.db.related_databases() == [ws18.db.name]
    finally:
        server.execute(f'ALTER DATABASE "{ws18.db.name}" OWNER TO postgres')
        server.execute(f'DROP OWNED BY "{role}"', dbname=ws18.db.name)
        server.execute(f'DROP ROLE "{role}"')


def test_restore_test_without_createdb_fails_clearly(ws18: Workspace) -> None:
    server = ws18.db.server
    role = f"nocreate_{ws18.db.name}"
    server.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{PASSWORD}'")
    try:
        server.execute(f'ALTER DATABASE "{ws18.db.name}" OWNER TO "{role}"')
        for table in ("customers", "orders"):
            ws18.db.execute(f'ALTER TABLE "{table}" OWNER TO "{role}"')
        url = ws18.url.replace("postgresql://postgres:", f"postgresql://{role}:", 1)
        backup = ws18.backup()
        assert ws18.run("backup", "verify", str(backup), url=url).exit_code == 0
        run = ws18.run("backup", "verify", str(backup), "--restore-test", url=url)
        assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
        assert "cannot create the scratch database" in run.error_line()
        assert "CREATEDB" in run.error_line()
        assert "Traceback" not in run.stderr
    finally:
        server.execute(f'ALTER DATABASE "{ws18.db.name}" OWNER TO postgres')
        server.execute(f'DROP OWNED BY "{role}"', dbname=ws18.db.name)
        server.execute(f'DROP ROLE "{role}"')


def test_concurrent_backups_never_share_a_name(ws18: Workspace, cli_env: dict[str, str]) -> None:
    argv = [sys.executable, "-m", "rollback_cli", *ws18.args(), "--json", "backup", "create"]
    procs = [
        subprocess.Popen(argv, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    names = {Path(json.loads(out)["backup_file"]).name for out, _ in outputs}
    assert len(names) == 4
    for name in names:
        run = ws18.run("backup", "verify", name)
        assert run.exit_code == 0, str(run)
    assert not [n for n in ws18.backups() if n.startswith(".tmp-")]
    # One log file per run, even when the runs start in the same second.
    logs = ws18.log_files()
    assert len(logs) == 4 + 4  # four backups, four verifications
    for log_file in logs:
        assert len({event["run_id"] for event in read_events(log_file)}) == 1


@pytest.mark.parametrize("name", ['Odd "db" näme', "x" * 63], ids=["quotes-unicode", "63-chars"])
def test_awkward_database_names(
    pg18: PostgresCluster, tmp_path: Path, cli_env: dict[str, str], name: str
) -> None:
    db = TestDatabase(name=name, server=pg18)
    pg18.create_database(name)
    try:
        db.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 3)")
        ws = Workspace(db, tmp_path / "work")
        backup = ws.backup()
        assert read_manifest(backup)["database"] == name
        run = ws.run("backup", "verify", str(backup), "--restore-test")
        assert run.exit_code == 0, str(run)
        assert [d for d in pg18.databases() if d.startswith(name[:40])] == [name]
    finally:
        for other in pg18.databases():
            if other.startswith(name[:40]):
                pg18.drop_database(other)


def test_names_and_times_are_utc_whatever_the_local_zone(
    ws18: Workspace, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, "TZ": "Pacific/Kiritimati"}  # UTC+14: the date differs from UTC's
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run = run_subprocess([*ws18.args(), "--json", "backup", "create"], env)
    assert run.exit_code == 0, str(run)
    backup = Path(run.json["backup_file"])
    match = BACKUP_NAME.match(backup.name)
    assert match
    stamp = datetime.strptime(match["stamp"], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
    assert before <= stamp <= datetime.now(timezone.utc)
    assert read_manifest(backup)["created_at"].endswith("+00:00")
    (log_file,) = ws18.log_files()
    log_stamp = datetime.strptime(log_file.name[17:32], "%Y%m%d_%H%M%S")
    assert abs(log_stamp.replace(tzinfo=timezone.utc) - stamp) < timedelta(minutes=2)


def test_verify_dry_run_plans_the_restore_test(ws18: Workspace) -> None:
    backup = ws18.backup()
    run, doc = ws18.run_json("backup", "verify", str(backup), "--restore-test", "--dry-run")
    assert run.exit_code == 0, str(run)
    assert doc["outcome"] == "dry_run" and doc["restore_test"] is None
    assert [c["check"] for c in doc["checks"]] == [
        "manifest",
        "size",
        "signature",
        "sha256",
        "readable",
    ]
    assert doc["plan"][0]["step"] == "restore-test"
    assert not [e for e in ws18.last_log_events() if e["step"] == "restore-test"]
    text = ws18.run("--dry-run", "backup", "verify", str(backup), "--restore-test")
    assert "dry run: nothing was changed" in text.stdout and "restore-test" in text.stdout
    # A dry run still fails on a broken backup.
    backup.write_bytes(backup.read_bytes()[:-10])
    run = ws18.run("backup", "verify", str(backup), "--restore-test", "--dry-run")
    assert run.exit_code == ExitCode.BACKUP_INVALID, str(run)
