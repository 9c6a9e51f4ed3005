"""``backup cleanup`` retention against real backups on real PostgreSQL 18: ``--keep-last``
counts per location, database and backup type, and the newest valid full backup of each
database is never removed, whatever the flags."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Run, Workspace, read_manifest, seed_shop, write_manifest
from tests.rollback_helpers import Project, tier_project
from tests.servers import TestDatabase, temporary_database
from tests.test_backup import age_backup

DAY = 86400.0


@pytest.fixture
def ws(database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Workspace:
    seed_shop(database18)
    return Workspace(database18, tmp_path / "work")


@pytest.fixture
def other(ws: Workspace) -> Iterator[Workspace]:
    """A second database on the same server, backed up into the same backup directory."""
    with temporary_database(ws.db.server, prefix="o") as db:
        seed_shop(db, customers=5, orders=7)
        yield Workspace(db, ws.workdir)


def aged(ws: Workspace, days: float, *extra: str, environment: str = "staging") -> Path:
    """A real backup whose manifest says it is ``days`` old."""
    backup = ws.backup(*extra, environment=environment)
    age_backup(backup, days)
    return backup


def cleanup_run(ws: Workspace, *args: str) -> tuple[Run, dict[str, Any]]:
    """``backup cleanup ARGS --json``: the run (for its log events) and its document."""
    run, doc = ws.run_json("backup", "cleanup", *args)
    assert run.exit_code == 0, str(run)
    return run, doc


def cleanup(ws: Workspace, *args: str) -> dict[str, Any]:
    return cleanup_run(ws, *args)[1]


def present(*backups: Path) -> list[bool]:
    return [b.exists() and Path(f"{b}.json").exists() for b in backups]


def gone(*backups: Path) -> bool:
    return not any(b.exists() or Path(f"{b}.json").exists() for b in backups)


def names(*backups: Path) -> list[str]:
    return sorted(b.name for b in backups)


def kept_events(run: Run) -> dict[str, dict[str, Any]]:
    return {e["backup"]: e for e in run.stderr_events() if e.get("event") == "kept backup"}


# --- two databases sharing one backup directory -------------------------------------------


@pytest.mark.parametrize("keep_last", ["0", "1", "2"])
@pytest.mark.parametrize("runner", ["first", "second"])
def test_two_databases_each_keep_their_only_old_backup(
    ws: Workspace, other: Workspace, keep_last: str, runner: str
) -> None:
    mine = aged(ws, 10)
    theirs = aged(other, 20)  # older than every backup of the first database
    doc = cleanup(
        ws if runner == "first" else other, "--older-than", "1d", "--keep-last", keep_last
    )
    assert doc["removed"] == []
    assert sorted(doc["kept"]) == names(mine, theirs)
    assert present(mine, theirs) == [True, True]


@pytest.mark.parametrize(
    ("keep_last", "survivors"),
    [("0", 1), ("1", 1), ("2", 2), ("3", 3)],
)
def test_two_databases_with_three_old_backups_keep_the_newest_of_each(
    ws: Workspace, other: Workspace, keep_last: str, survivors: int
) -> None:
    # Interleaved ages: the second database's backups are all older than the first's newest,
    # so counting per environment would keep only the first database's.
    mine = [aged(ws, days) for days in (10, 20, 30)]
    theirs = [aged(other, days) for days in (15, 25, 35)]
    doc = cleanup(ws, "--older-than", "1d", "--keep-last", keep_last)
    removed = mine[survivors:] + theirs[survivors:]
    assert sorted(doc["removed"]) == names(*removed)
    assert sorted(doc["kept"]) == names(*mine[:survivors], *theirs[:survivors])
    assert all(present(*mine[:survivors], *theirs[:survivors]))
    assert gone(*removed)


# --- kinds of backup ----------------------------------------------------------------------


@pytest.mark.parametrize("schema_days", [0, 5])
def test_a_newer_schema_backup_does_not_push_out_the_full_ones(
    ws: Workspace, schema_days: float
) -> None:
    full = [aged(ws, days) for days in (10, 20, 30)]
    schema = aged(ws, schema_days, "--type", "schema")
    doc = cleanup(ws, "--older-than", "1d", "--keep-last", "1")
    assert sorted(doc["removed"]) == names(*full[1:])
    assert sorted(doc["kept"]) == names(full[0], schema)
    assert present(full[0], schema) == [True, True]
    assert gone(*full[1:])


def test_keep_last_counts_each_type_of_backup_separately(ws: Workspace) -> None:
    full = [aged(ws, days) for days in (10, 40)]
    data = [aged(ws, days, "--type", "data") for days in (5, 50)]
    schema = [aged(ws, days, "--type", "schema") for days in (3, 60)]
    doc = cleanup(ws, "--older-than", "1d", "--keep-last", "1")
    assert sorted(doc["removed"]) == names(full[1], data[1], schema[1])
    assert sorted(doc["kept"]) == names(full[0], data[0], schema[0])
    assert gone(full[1], data[1], schema[1])


# --- the newest valid full backup is never removed ----------------------------------------


@pytest.mark.parametrize("older_than", ["0d", "0", "0s"])
def test_keep_last_zero_still_keeps_the_newest_full_backup_of_each_database(
    ws: Workspace, other: Workspace, older_than: str
) -> None:
    mine = [aged(ws, days) for days in (0.01, 1, 2)]
    mine_schema = aged(ws, 0.001, "--type", "schema")  # newer than every full one
    mine_data = aged(ws, 0.002, "--type", "data")
    theirs = [aged(other, days) for days in (3, 4)]
    run, doc = cleanup_run(ws, "--older-than", older_than, "--keep-last", "0")
    removed = [*mine[1:], mine_schema, mine_data, theirs[1]]
    assert sorted(doc["removed"]) == names(*removed)
    assert sorted(doc["kept"]) == names(mine[0], theirs[0])
    assert gone(*removed)
    assert present(mine[0], theirs[0]) == [True, True]
    # The reason is logged for each backup that only this rule kept.
    events = kept_events(run)
    assert set(events) == {mine[0].name, theirs[0].name}
    assert {events[mine[0].name]["database"], events[theirs[0].name]["database"]} == {
        ws.db.name,
        other.db.name,
    }
    assert all("newest valid full backup" in e["reason"] for e in events.values())
    # A second run finds nothing more to remove: the protected ones stay protected.
    doc = cleanup(ws, "--older-than", older_than, "--keep-last", "0")
    assert doc["removed"] == []


def test_the_only_backup_survives_any_age_and_keep_last(ws: Workspace) -> None:
    backup = aged(ws, 365)
    for keep_last in ("0", "1", "5"):
        for older_than in ("0d", "1h", "30d"):
            doc = cleanup(ws, "--older-than", older_than, "--keep-last", keep_last)
            assert (doc["removed"], doc["kept"]) == ([], [backup.name]), (older_than, keep_last)
    assert present(backup) == [True]


def corrupt(backup: Path, how: str) -> None:
    """Make ``backup`` invalid, one day old by its manifest or (without one) its mtime."""
    one_day_ago = time.time() - DAY
    if how == "size":
        manifest = read_manifest(backup)
        manifest["size"] += 1
        write_manifest(backup, manifest)
        age_backup(backup, 1)
        return
    if how == "not-json":
        Path(f"{backup}.json").write_text("{not json")
    elif how == "missing":
        Path(f"{backup}.json").unlink()
    elif how == "other-file":
        manifest = read_manifest(backup)
        manifest["file_name"] = "backup_staging_20200101_000000.dump"
        write_manifest(backup, manifest)
    os.utime(backup, (one_day_ago, one_day_ago))


@pytest.mark.parametrize("how", ["not-json", "missing", "other-file", "size"])
@pytest.mark.parametrize("keep_last", ["0", "1"])
def test_an_invalid_newest_full_backup_does_not_protect_itself(
    ws: Workspace, how: str, keep_last: str
) -> None:
    older, newer = aged(ws, 3), aged(ws, 2)
    broken = ws.backup()
    corrupt(broken, how)  # one day old: the newest full backup, but not a valid one
    run, doc = ws.run_json("backup", "list")
    rows = {Path(r["name"]).name: r for r in doc["backups"]}
    assert not rows[broken.name]["valid"] and rows[newer.name]["valid"]

    run, doc = cleanup_run(ws, "--older-than", "0d", "--keep-last", keep_last)
    assert sorted(doc["removed"]) == names(older, broken)
    assert doc["kept"] == [newer.name]
    assert present(newer) == [True]
    assert gone(older, broken)
    if keep_last == "0":
        assert set(kept_events(run)) == {newer.name}


# --- safety backups -----------------------------------------------------------------------


@pytest.fixture
def project(
    database18: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Project:
    return tier_project(database18, alembic_project, tmp_path)


def project_workspace(project: Project) -> Workspace:
    return Workspace(project.db, project.workdir, alembic_ini=project.alembic_ini)


def safety_backup(project: Project) -> tuple[Path, Path]:
    """A full backup and the safety backup a real data rollback from it takes."""
    backup = Path(project.backup())
    result, doc = project.run_json("rollback", "data", "--backup-file", str(backup))
    assert result.exit_code == 0, result.stderr
    safety = Path(doc["backup_file"])
    assert safety.stem.endswith("_safety") and safety.exists()
    assert read_manifest(safety)["type"] == "full"
    assert read_manifest(safety)["database"] == read_manifest(backup)["database"]
    return backup, safety


def test_a_safety_backup_is_the_newest_full_backup_of_its_database(project: Project) -> None:
    ws = project_workspace(project)
    backup, safety = safety_backup(project)
    age_backup(backup, 10)
    age_backup(safety, 5)
    schema = aged(ws, 1, "--type", "schema")
    run, doc = cleanup_run(ws, "--older-than", "0d", "--keep-last", "0")
    assert sorted(doc["removed"]) == names(backup, schema)
    assert doc["kept"] == [safety.name]
    assert set(kept_events(run)) == {safety.name}
    assert present(safety) == [True] and gone(backup, schema)


def test_a_safety_backup_counts_among_the_full_backups(project: Project) -> None:
    """Counted as a full backup: an older safety backup is pushed out by a newer full one
    under ``--keep-last 1``, which keeps one full backup, not one of each name."""
    ws = project_workspace(project)
    backup, safety = safety_backup(project)
    age_backup(safety, 10)
    age_backup(backup, 5)
    schema = aged(ws, 2, "--type", "schema")
    doc = cleanup(ws, "--older-than", "1d", "--keep-last", "1")
    assert doc["removed"] == [safety.name]
    assert sorted(doc["kept"]) == names(backup, schema)
    assert gone(safety) and present(backup, schema) == [True, True]


# --- host tells databases of the same name apart --------------------------------------------


def set_host(backup: Path, host: str) -> None:
    manifest = read_manifest(backup)
    manifest["host"] = host
    write_manifest(backup, manifest)


def test_same_database_name_on_another_host_is_another_database(ws: Workspace) -> None:
    here = [aged(ws, days) for days in (10, 20)]
    there = [aged(ws, days) for days in (30, 40)]
    for backup in there:
        set_host(backup, "db2.example.com")
    doc = cleanup(ws, "--older-than", "1d", "--keep-last", "1")
    assert sorted(doc["removed"]) == names(here[1], there[1])
    assert sorted(doc["kept"]) == names(here[0], there[0])


def test_a_manifest_without_a_host_belongs_with_the_only_host(ws: Workspace) -> None:
    newest, older = aged(ws, 10), aged(ws, 20)
    set_host(newest, "")
    doc = cleanup(ws, "--older-than", "1d", "--keep-last", "1")
    assert doc["removed"] == [older.name]
    assert doc["kept"] == [newest.name]


# --- dry run ------------------------------------------------------------------------------


def listing(ws: Workspace) -> dict[str, bytes]:
    return {
        str(p.relative_to(ws.backup_dir)): p.read_bytes() if p.is_file() else b""
        for p in sorted(ws.backup_dir.rglob("*"))
    }


@pytest.mark.parametrize(
    ("older_than", "keep_last"),
    [("0d", "0"), ("0d", "1"), ("1d", "0"), ("15d", "1"), ("1d", "2"), ("100d", "0")],
)
def test_dry_run_removes_nothing_and_lists_what_the_real_run_removes(
    ws: Workspace, other: Workspace, older_than: str, keep_last: str
) -> None:
    mine = [aged(ws, days) for days in (5, 10, 20, 30)]
    schema = [aged(ws, days, "--type", "schema") for days in (2, 25)]
    theirs = [aged(other, days) for days in (12, 40)]
    production = aged(ws, 90, environment="production")
    leftover = ws.backup_dir / "backup_staging_20200101_000000.dump"
    leftover.write_bytes(b"PGDMP partial")
    old = time.time() - 60 * DAY
    os.utime(leftover, (old, old))
    before = listing(ws)

    dry_run, dry = cleanup_run(
        ws, "--dry-run", "--older-than", older_than, "--keep-last", keep_last
    )
    assert dry["outcome"] == "dry_run"
    assert listing(ws) == before, "a dry run changes nothing"

    real_run, real = cleanup_run(ws, "--older-than", older_than, "--keep-last", keep_last)
    assert sorted(real["removed"]) == sorted(dry["removed"])
    assert sorted(real["kept"]) == sorted(dry["kept"])
    removed = set(real["removed"])
    expected_gone = {n for n in before if n in removed or n.removesuffix(".json") in removed}
    assert set(before) - set(listing(ws)) == expected_gone
    # Whatever the flags: each database keeps its newest full backup; other environments
    # are untouched.
    assert present(mine[0], theirs[0], production) == [True, True, True]
    assert set(kept_events(dry_run)) == set(kept_events(real_run))
    assert (leftover.name in removed) == (older_than != "100d")
    assert (schema[0].name in removed) == (keep_last == "0" and older_than != "100d")
    assert bool(removed) == (older_than != "100d")
