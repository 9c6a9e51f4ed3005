"""Adversarial suite: a tampered backup (its manifest recomputed to match) never runs
anything outside the database, whatever command is handed it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from rollback_cli.errors import ExitCode
from rollback_cli.postgres.script_guard import ScriptGuard, UnsafeScript
from tests.rollback_helpers import Project, reseal

TRAILER = b"-- PostgreSQL database dump complete"


def tamper_plain(backup: Path, payload: bytes) -> None:
    data = backup.read_bytes()
    at = data.rindex(TRAILER)
    backup.write_bytes(data[:at] + payload + b"\n" + data[at:])
    reseal(backup)


def marker_payloads(marker: Path) -> dict[str, bytes]:
    m = str(marker).encode()
    return {
        "shell": b"\\! touch " + m,
        "pipe-output": b"\\o | touch " + m + b"\nSELECT 1;\n\\o",
        "copy-program": b"\\copy (SELECT 1) TO PROGRAM 'touch " + m + b"'",
        "setenv": b"\\setenv PAGER 'touch " + m + b"'",
        "include": b"\\i " + m,
        "gexec": b"SELECT 'SELECT 1' \\gexec",
        "same-line": b"SELECT 1; \\! touch " + m,
        "after-unrestrict": b"\\unrestrict abc\n\\! touch " + m,
        "scs-off": b"SET standard_conforming_strings = off;\nSELECT 'x\\'; \\! touch "
        + m
        + b" --'",
        "block-comment-end": b"/* a */ \\! touch " + m,
        "copy-data-escape": b"COPY customers (id) FROM stdin;\n\\.\n\\! touch " + m,
    }


PAYLOAD_IDS = list(marker_payloads(Path("/x")).keys())


@pytest.mark.parametrize("payload", PAYLOAD_IDS)
def test_a_plain_backup_with_a_meta_command_is_refused_everywhere(
    project15: Project, tmp_path: Path, payload: str
) -> None:
    marker = tmp_path / "pwned"
    backup = Path(project15.backup("--format", "plain"))
    tamper_plain(backup, marker_payloads(marker)[payload])
    project15.db.execute("DELETE FROM orders")
    before = project15.data_fingerprint()
    databases = project15.databases()

    runs = [
        project15.run("backup", "verify", str(backup)),
        project15.run("backup", "verify", str(backup), "--restore-test"),
        project15.run("--dry-run", "rollback", "data", "--backup-file", str(backup)),
        project15.run("rollback", "data", "--backup-file", str(backup)),
        project15.run("rollback", "data", "--backup-file", str(backup), "--strategy", "in-place"),
    ]

    for run in runs:
        assert run.exit_code == ExitCode.BACKUP_INVALID, run.stderr
    assert not marker.exists()
    assert project15.data_fingerprint() == before
    assert project15.databases() == databases


@pytest.mark.parametrize(
    "harmless",
    [
        b"SELECT 'a \\! b';",
        b"SELECT E'it\\'s \\\\! fine';",
        b'SELECT 1 AS "odd \\! name";',
        b"DO $body$ BEGIN PERFORM '\\! x'; END $body$;",
        b"SELECT $$ \\! not a command $$;",
        b"-- \\! a comment\nSELECT 1;",
        b"/* nested /* \\! */ still a comment */ SELECT 1;",
    ],
)
def test_backslashes_psql_does_not_execute_are_allowed(harmless: bytes) -> None:
    ScriptGuard().check_all([line + b"\n" for line in harmless.split(b"\n")])


@pytest.mark.parametrize("payload", PAYLOAD_IDS)
def test_the_guard_refuses_each_payload_on_its_own(payload: str) -> None:
    lines = marker_payloads(Path("/tmp/x"))[payload].split(b"\n")
    with pytest.raises(UnsafeScript):
        ScriptGuard().check_all([line + b"\n" for line in lines])


def test_real_pg_dump_scripts_pass_the_guard(project15: Project) -> None:
    backup = Path(project15.backup("--format", "plain"))
    with backup.open("rb") as handle:
        ScriptGuard().check_all(handle)
    assert project15.run("backup", "verify", str(backup), "--restore-test").exit_code == 0


def test_a_custom_archive_whose_sql_carries_a_meta_command_is_refused(
    project15: Project, tmp_path: Path
) -> None:
    """The archive's table of contents holds SQL text that pg_restore prints verbatim: a
    same-length edit that turns a statement into a meta-command."""
    marker = Path("/tmp") / f"p{uuid.uuid4().hex[:8]}"
    backup = Path(project15.backup())
    data = backup.read_bytes()
    original = b"CREATE TABLE public.alembic_version ("
    assert original in data
    evil = b"\\! touch " + str(marker).encode() + b"\n"
    evil += b"-" * (len(original) - len(evil))
    assert len(evil) == len(original)
    backup.write_bytes(data.replace(original, evil))
    reseal(backup)
    before = project15.data_fingerprint()

    verified = project15.run("backup", "verify", str(backup))
    in_place = project15.run(
        "rollback", "data", "--backup-file", str(backup), "--strategy", "in-place"
    )

    assert verified.exit_code == ExitCode.BACKUP_INVALID, verified.stderr
    assert in_place.exit_code == ExitCode.BACKUP_INVALID, in_place.stderr
    assert not marker.exists()
    assert project15.data_fingerprint() == before
