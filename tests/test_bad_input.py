"""Bad input: every case ends with one clear error line, the documented exit code, and
nothing changed (no backup files, no manifests, no temp files, no scratch databases)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollback_cli.errors import ExitCode
from tests.cli_helpers import (
    Workspace,
    invoke,
    read_manifest,
    read_only,
    run_subprocess,
    tmpfs,
    write_executable,
    write_manifest,
)
from tests.servers import TestDatabase


@pytest.fixture
def mounts() -> None:
    """Tests that mount a tiny tmpfs or a read-only bind mount need root (as in CI)."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts file systems: run the suite as root", pytrace=False)


@pytest.fixture
def ws(database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    database18.execute(
        "CREATE TABLE items (id int PRIMARY KEY, note text);"
        "INSERT INTO items SELECT g, 'note ' || g FROM generate_series(1, 200) g;"
    )
    return Workspace(database18, tmp_path / "work")


@pytest.fixture
def ws15(database15: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    database15.execute("CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2)")
    return Workspace(database15, tmp_path / "work15")


def fix_manifest(backup: Path) -> None:
    """Make the manifest agree with the file's current size and sha256."""
    manifest = read_manifest(backup)
    manifest["size"] = backup.stat().st_size
    manifest["sha256"] = hashlib.sha256(backup.read_bytes()).hexdigest()
    write_manifest(backup, manifest)


def snapshot_dir(path: Path) -> dict[str, bytes | None]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def assert_rejected(ws: Workspace, backup: str, code: int, words: str) -> None:
    """verify and verify --restore-test both refuse, change nothing, leave no scratch db."""
    before = snapshot_dir(ws.backup_dir)
    for extra in ([], ["--restore-test"]):
        run = ws.run("backup", "verify", backup, *extra)
        assert run.exit_code == code, str(run)
        line = run.error_line()
        assert line.startswith("db-rollback: error: ")
        assert words in line, line
        assert run.stdout == ""
        assert "Traceback" not in run.stderr
    assert snapshot_dir(ws.backup_dir) == before
    assert ws.db.related_databases() == [ws.db.name]


# --- backups that are missing or broken: exit 4 -----------------------------------------


def test_nonexistent_backup_path(ws: Workspace, tmp_path: Path) -> None:
    assert_rejected(ws, str(tmp_path / "nope" / "backup.dump"), 4, "does not exist")
    assert_rejected(ws, "backup_staging_20200101_000000.dump", 4, "does not exist")


def test_empty_file_without_manifest(ws: Workspace) -> None:
    ws.backup_dir.mkdir(parents=True)
    empty = ws.backup_dir / "backup_staging_20200101_000000.dump"
    empty.touch()
    assert_rejected(ws, str(empty), 4, "has no manifest")


def test_empty_file_with_a_manifest(ws: Workspace) -> None:
    backup = ws.backup()
    backup.write_bytes(b"")
    assert_rejected(ws, str(backup), 4, "truncated or replaced")
    fix_manifest(backup)  # even when the manifest agrees, an empty archive is not a backup
    assert_rejected(ws, str(backup), 4, "pg_restore cannot read")


def test_truncated_dump(ws: Workspace) -> None:
    backup = ws.backup()
    with backup.open("r+b") as handle:
        handle.truncate(backup.stat().st_size // 2)
    assert_rejected(ws, str(backup), 4, "truncated or replaced")
    fix_manifest(backup)  # a truncation the manifest does not reveal: pg_restore does
    assert_rejected(ws, str(backup), 4, "pg_restore cannot read")


def test_truncated_plain_dump(ws: Workspace) -> None:
    backup = ws.backup("--format", "plain")
    text = backup.read_text()
    backup.write_text(text[: len(text) * 2 // 3])
    fix_manifest(backup)
    assert_rejected(ws, str(backup), 4, "completion trailer is missing")


def test_a_file_that_is_not_a_dump(ws: Workspace) -> None:
    backup = ws.backup()
    backup.write_text("this is not a pg_dump archive\n" * 40)
    fix_manifest(backup)
    assert_rejected(ws, str(backup), 4, "pg_restore cannot read")
    plain = ws.backup("--format", "plain")
    plain.write_text("SELECT 1;\n")
    fix_manifest(plain)
    assert_rejected(ws, str(plain), 4, "header missing")


def test_manifest_missing(ws: Workspace) -> None:
    backup = ws.backup()
    Path(f"{backup}.json").unlink()
    assert_rejected(ws, str(backup), 4, "has no manifest")
    assert_rejected(ws, backup.name, 4, "has no manifest")


def test_checksum_mismatch(ws: Workspace) -> None:
    backup = ws.backup()
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    backup.write_bytes(bytes(data))
    assert_rejected(ws, str(backup), 4, "fails its checksum")


def test_directory_backup_with_a_changed_member(ws: Workspace) -> None:
    backup = ws.backup("--format", "directory")
    member = next(p for p in backup.iterdir() if p.name != "toc.dat")
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF
    member.write_bytes(bytes(data))
    assert_rejected(ws, str(backup), 4, "fails its checksum")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: "{not json", "is not valid JSON"),
        (lambda m: "[1, 2]", "is not a JSON object"),
        (lambda m: {**m, "manifest_version": 99}, "unsupported format version 99"),
        (lambda m: {k: v for k, v in m.items() if k != "sha256"}, "lacks sha256"),
        (lambda m: {**m, "size": "big"}, "invalid size"),
        (lambda m: {**m, "sha256": "abc"}, "invalid sha256"),
        (lambda m: {**m, "type": "incremental"}, "unknown type or format"),
        (lambda m: {**m, "created_at": "yesterday"}, "invalid created_at"),
        (lambda m: {**m, "file_name": "backup_other.dump"}, "describes backup_other.dump"),
    ],
    ids=[
        "not-json",
        "not-object",
        "future-version",
        "no-sha256",
        "bad-size",
        "bad-sha256",
        "bad-type",
        "bad-date",
        "other-file",
    ],
)
def test_broken_manifest(ws: Workspace, change: object, words: str) -> None:
    backup = ws.backup()
    changed = change(read_manifest(backup))  # type: ignore[operator]
    manifest_path = Path(f"{backup}.json")
    if isinstance(changed, str):
        manifest_path.write_text(changed)
    else:
        write_manifest(backup, changed)
    assert_rejected(ws, str(backup), 4, words)
    listed = ws.run_json("backup", "list")[1]["backups"]
    assert [row["valid"] for row in listed] == [False]


def test_manifest_is_not_text(ws: Workspace) -> None:
    backup = ws.backup()
    Path(f"{backup}.json").write_bytes(b"\xff\xfe\x00garbage")
    assert_rejected(ws, str(backup), 4, "manifest")


# --- options that make no sense: exit 2 ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["backup", "cleanup", "--older-than", "soon"],
        ["backup", "cleanup", "--older-than", "-3d"],
        ["backup", "cleanup", "--older-than", "30y"],
        ["backup", "cleanup", "--older-than", ""],
        ["backup", "cleanup", "--older-than", "30d", "--keep-last", "-1"],
        ["backup", "create", "--type", "incremental"],
        ["backup", "create", "--format", "tar"],
        ["backup", "create", "--compress", "brotli"],
        ["backup", "create", "--jobs", "two"],
        ["--cleanup-backups", "many"],
        ["--create-backup", "--list-backups"],
        ["--verify-backup"],
    ],
    ids=lambda a: " ".join(a) or "empty",
)
def test_bad_options_are_usage_errors(ws: Workspace, args: list[str]) -> None:
    existing = ws.backup()
    before = snapshot_dir(ws.backup_dir)
    run = ws.run(*args)
    assert run.exit_code == ExitCode.USAGE, str(run)
    assert run.stdout == ""
    assert run.error_line()
    assert snapshot_dir(ws.backup_dir) == before
    assert existing.exists()


# --- where backups cannot be written -------------------------------------------------------


def test_backup_dir_under_a_regular_file(ws: Workspace, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    args = ws.args()
    args[args.index("--backup-dir") + 1] = str(blocker / "backups")
    run = invoke([*args, "backup", "create"])
    assert run.exit_code == ExitCode.CONFIG, str(run)
    assert f"cannot create directory {blocker / 'backups'}" in run.error_line()
    assert blocker.read_text() == "x"


def test_backup_dir_not_writable(ws: Workspace, tmp_path: Path, mounts: None) -> None:
    """A read-only bind mount: not writable even for root (chmod would not stop root)."""
    target = tmp_path / "readonly"
    with read_only(target):
        args = ws.args()
        args[args.index("--backup-dir") + 1] = str(target)
        run = invoke([*args, "backup", "create"])
        assert run.exit_code == ExitCode.CONFIG, str(run)
        assert f"directory {target} is not writable" in run.error_line()
        assert list(target.iterdir()) == []


def test_disk_full_during_dump(ws: Workspace, tmp_path: Path, mounts: None) -> None:
    # About 4 MB of incompressible rows for a 1 MB file system.
    ws.db.execute(
        "CREATE TABLE noise AS SELECT g, md5(g::text) || md5((g * 7)::text) AS t "
        "FROM generate_series(1, 60000) g"
    )
    target = tmp_path / "tiny"
    with tmpfs(target, "1m"):
        args = ws.args()
        args[args.index("--backup-dir") + 1] = str(target)
        run = invoke([*args, "backup", "create", "--compress", "none"])
        assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
        assert "disk full" in run.error_line() and "partial file removed" in run.error_line()
        assert list(target.iterdir()) == []


def test_disk_full_during_directory_dump(ws: Workspace, tmp_path: Path, mounts: None) -> None:
    ws.db.execute(
        "CREATE TABLE noise AS SELECT g, md5(g::text) || md5((g * 7)::text) AS t "
        "FROM generate_series(1, 60000) g"
    )
    target = tmp_path / "tiny"
    with tmpfs(target, "1m"):
        args = ws.args()
        args[args.index("--backup-dir") + 1] = str(target)
        run = invoke([*args, "backup", "create", "--format", "directory", "--compress", "none"])
        assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
        assert "pg_dump failed" in run.error_line()
        assert list(target.iterdir()) == []


def test_disk_full_while_writing_the_manifest(ws: Workspace, tmp_path: Path, mounts: None) -> None:
    """Room for the dump but not for its manifest: no backup without a manifest remains."""
    size = ws.backup().stat().st_size
    page = 4096
    target = tmp_path / "tiny"
    with tmpfs(target, f"{64 * page}"):
        filler = target / "filler"
        free_pages = -(-size // page)  # exactly enough pages for the dump
        filler.write_bytes(b"\0" * (64 - free_pages) * page)
        args = ws.args()
        args[args.index("--backup-dir") + 1] = str(target)
        run = invoke([*args, "backup", "create"])
        assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
        assert "cannot store the backup" in run.error_line()
        assert "disk full" in run.error_line()
        assert [p.name for p in target.iterdir()] == ["filler"]


def test_pg_dump_failing_midway(ws: Workspace, tmp_path: Path) -> None:
    """A pg_dump that writes part of an archive and dies: exit 5, partial file removed."""
    real = ws.db.server.bin_dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(
        bin_dir / "pg_dump",
        f"""
        #!/bin/bash
        if [ "$1" = "--version" ]; then exec {real}/pg_dump --version; fi
        {real}/pg_dump "$@" | head -c 3000
        echo "pg_dump: error: connection to server lost" >&2
        exit 1
        """,
    )
    ws.pg_bin_dir = bin_dir
    run = ws.run("backup", "create")
    assert run.exit_code == ExitCode.FAILED_UNCHANGED, str(run)
    assert "pg_dump failed (exit 1): pg_dump: error: connection to server lost" in (
        run.error_line()
    )
    assert ws.backups() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_interrupted_backup_leaves_nothing(
    ws: Workspace, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM or Ctrl-C during the dump: exit 130, temp file removed, no manifest."""
    real = ws.db.server.bin_dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(
        bin_dir / "pg_dump",
        f"""
        #!/bin/bash
        if [ "$1" = "--version" ]; then exec {real}/pg_dump --version; fi
        printf 'PGDMP partial'
        exec sleep 60
        """,
    )
    ws.pg_bin_dir = bin_dir
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rollback_cli",
            *ws.args(),
            "backup",
            "create",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(n.startswith(".tmp-") for n in ws.backups()):
        time.sleep(0.05)
    assert any(n.startswith(".tmp-") for n in ws.backups()), "the dump never started"
    time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, stderr
    assert ws.backups() == []
    assert "interrupted" in stderr.splitlines()[-1]


def test_connection_problems_change_nothing(ws: Workspace, cli_env: dict[str, str]) -> None:
    existing = ws.backup()
    before = snapshot_dir(ws.backup_dir)
    server = ws.db.server
    for url in (
        f"postgresql://{server.user}:wrong@{server.host}:{server.port}/{ws.db.name}",
        f"postgresql://{server.user}@{server.host}:{server.port}/{ws.db.name}_gone",
    ):
        for command in (
            ["backup", "create"],
            ["backup", "verify", str(existing), "--restore-test"],
        ):
            run = run_subprocess([*ws.args(url=url), *command], cli_env)
            assert run.exit_code == ExitCode.CONFIG, str(run)
            assert snapshot_dir(ws.backup_dir) == before
    assert ws.db.related_databases() == [ws.db.name]


def test_verify_against_the_wrong_server_version(ws15: Workspace) -> None:
    """A backup is verified with its own pg_dump's major or newer; an older one is refused."""
    backup = ws15.backup()
    manifest = read_manifest(backup)
    manifest["pg_dump_version"] = "99.1"
    write_manifest(backup, manifest)
    run = ws15.run("backup", "verify", str(backup))
    assert run.exit_code == ExitCode.REFUSED, str(run)
    assert "postgresql-client-99" in run.error_line()


def test_manifest_without_its_backup(ws: Workspace) -> None:
    backup = ws.backup()
    backup.unlink()
    assert_rejected(ws, str(backup), 4, "does not exist")
    assert_rejected(ws, backup.name, 4, "the file is missing")


def test_verify_given_the_manifest_path_verifies_its_backup(ws: Workspace) -> None:
    backup = ws.backup()
    run = ws.run("--json", "backup", "verify", f"{backup}.json")
    assert run.exit_code == 0, str(run)
    assert run.json["backup_file"] == backup.name
