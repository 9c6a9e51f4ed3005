"""``backup create | list | verify | cleanup``."""

from __future__ import annotations

import time
from typing import Any

import click

from rollback_cli.cli import render
from rollback_cli.cli.options import JOBS, App, parsed, pass_app, run_flags
from rollback_cli.cli.runner import execute
from rollback_cli.errors import ConfigError
from rollback_cli.settings import parse_duration, parse_timeout_ms


@click.group()
def backup() -> None:
    """Create, list, verify and clean up backups."""


@backup.command("create")
@click.option(
    "--type",
    "backup_type",
    type=click.Choice(["full", "schema", "data"]),
    default="full",
    show_default=True,
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["custom", "plain", "directory"]),
    default="custom",
    show_default=True,
)
@click.option(
    "--jobs",
    "-j",
    type=JOBS,
    default="auto",
    show_default=True,
    help="Parallel pg_dump jobs (directory format only). auto: one per core, at most one "
    "per table and 8, within the server's free connection slots; 1 for the single-file "
    "formats.",
)
@click.option(
    "--compress",
    metavar="METHOD[:LEVEL]",
    help="auto (default): zstd or lz4 when this pg_dump (16+) has them, else gzip; or gzip, "
    "lz4, zstd, none with an optional :LEVEL, e.g. zstd:3. Plain format is never compressed.",
)
@click.option("--label", help="Free text stored in the manifest, e.g. the release.")
@click.option(
    "--lock-timeout",
    default="5s",
    show_default=True,
    metavar="DURATION",
    help="How long pg_dump and the row counts wait for each table lock another session "
    "holds (e.g. 500ms, 5s, 2min; 0 = forever); then the backup fails (exit 5).",
)
@run_flags
@pass_app
def backup_create(
    app: App,
    backup_type: str,
    fmt: str,
    jobs: int | None,
    compress: str | None,
    label: str | None,
    lock_timeout: str,
    dry_run: bool,
    yes: bool,
    json_output: bool,
) -> None:
    """Dump the database with a snapshot-consistent manifest.

    Writes backup_{env}_{UTC timestamp}[_{type}].{dump|sql|dir} and its .json manifest
    (sha256, row counts, Alembic revision) into the backup directory or storage.

    \b
    Example:
      db-rollback -e staging backup create --label "before release 42"
    """
    app = app.with_flags(dry_run, yes, json_output)
    lock_timeout_ms = parsed(parse_timeout_ms, lock_timeout, "--lock-timeout")
    execute(
        app,
        "backup create",
        lambda api: api.backup_create(
            app.target(),
            app.storage,
            api.BackupRequest(
                backup_type, fmt, jobs, compress, label, lock_timeout_ms=lock_timeout_ms
            ),
            run=app.run,
        ),
        render.backup_created,
    )


@backup.command("list")
@run_flags
@pass_app
def backup_list(app: App, dry_run: bool, yes: bool, json_output: bool) -> None:
    """List backups with database, environment, size, age, type, revision, label and
    whether they are valid.

    A backup is valid only with a parseable manifest whose size matches; run
    `backup verify` for the full checksum. With a reachable database, the kept
    pre-rollback databases `rollback undo` can swap back are listed too.

    \b
    Example:
      db-rollback -e production backup list --json
    """
    app = app.with_flags(dry_run, yes, json_output)

    def call(api: Any) -> Any:
        try:
            target = app.target()
        except ConfigError as exc:
            # Listing backups needs no server; the kept databases are shown when one answers.
            from rollback_cli.log import get_logger

            get_logger().info("pre-rollback databases not listed", reason=exc.one_line())
            target = None
        return api.backup_list(app.storage, app.environment, target)

    execute(app, "backup list", call, lambda doc: render.backup_listing(doc, time.time()))


@backup.command("verify")
@click.argument("backup_ref", metavar="BACKUP")
@click.option(
    "--restore-test",
    is_flag=True,
    help="Also restore into a scratch database, compare row counts and revision, drop it.",
)
@run_flags
@pass_app
def backup_verify(
    app: App, backup_ref: str, restore_test: bool, dry_run: bool, yes: bool, json_output: bool
) -> None:
    """Check a backup: manifest, size, sha256, archive readable; optionally restore it.

    BACKUP is a path, a name in the backup directory/storage, or a storage URI.

    \b
    Example:
      db-rollback backup verify backups/backup_staging_20260101_120000.dump --restore-test
    """
    app = app.with_flags(dry_run, yes, json_output)

    def show(doc: dict[str, Any]) -> None:
        click.echo(f"backup OK: {doc['backup_uri']}")
        render.checks(doc["checks"])
        if doc.get("plan"):
            render.plan(doc["plan"])

    execute(
        app,
        "backup verify",
        lambda api: api.backup_verify(
            app.storage,
            app.environment,
            backup_ref,
            # The restore test needs a server; the checks before it only read the backup.
            target=app.target() if restore_test and not app.dry_run else None,
            pg_bin_dir=app.pg_bin_dir,
            restore_test=restore_test,
            run=app.run,
        ),
        show,
    )


@backup.command("cleanup")
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Remove backups older than this: 30d, 12h, 2w (a bare number means days).",
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Always keep this many newest valid backups of each database and type "
    "(full, schema, data) in each location.",
)
@run_flags
@pass_app
def backup_cleanup(
    app: App, older_than: str, keep_last: int, dry_run: bool, yes: bool, json_output: bool
) -> None:
    """Apply retention to this environment's backups (the manifest goes first).

    --keep-last counts per database and per backup type in each location (the backup
    directory or storage, and its local staging copies), so a schema-only backup never
    pushes out the full ones. Whatever the flags, the newest valid full backup of each
    database in each location is never removed; it is reported kept.

    \b
    Example:
      db-rollback backup cleanup --older-than 30d --keep-last 5 --dry-run
    """
    app = app.with_flags(dry_run, yes, json_output)
    seconds = parsed(parse_duration, older_than, "--older-than")

    def show(doc: dict[str, Any]) -> None:
        verb = "would remove" if app.dry_run else "removed"
        click.echo(f"{verb} {len(doc['removed'])} backup(s), kept {len(doc['kept'])}")
        for name in doc["removed"]:
            click.echo(f"  - {name}")

    execute(
        app,
        "backup cleanup",
        lambda api: api.backup_cleanup(
            app.storage,
            app.environment,
            older_than_seconds=seconds,
            keep_last=keep_last,
            run=app.run,
        ),
        show,
    )
