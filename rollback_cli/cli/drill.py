"""``drill``: restore a backup into a scratch database, check it, drop it, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from rollback_cli.cli import render
from rollback_cli.cli.options import App, parsed, pass_app, run_flags
from rollback_cli.cli.runner import execute

DRILL_EXIT_HELP = """\
Exit codes of a drill:
  0    the backup restored, matched its manifest and passed every check
  1    unexpected error
  2    usage error (e.g. a bad --max-age or checks file)
  3    configuration or connection error
  4    no backup of this database, or it is older than --max-age, corrupt,
       fails verification or its restore, does not match its manifest, or
       fails a --checks query
  7    refused: no pg_restore as new as the server or the archive
  130  interrupted (the scratch database is dropped or left recorded as ours)"""


@click.command("drill", epilog="\b\n" + DRILL_EXIT_HELP)
@click.argument("backup_ref", metavar="[BACKUP]", required=False)
@click.option(
    "--type",
    "backup_type",
    type=click.Choice(["full", "schema", "data"]),
    default="full",
    show_default=True,
    help="Which kind of backup is the newest one picked (ignored when BACKUP is named).",
)
@click.option(
    "--max-age",
    metavar="AGE",
    help="Fail (exit 4) when the backup is older than this: a whole number and a unit "
    "s, m, h, d or w, e.g. 26h, 2d, 90m.",
)
@click.option(
    "--checks",
    "checks_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="SQL file of queries that must each return true on the restored copy.",
)
@run_flags
@pass_app
def drill(
    app: App,
    backup_ref: str | None,
    backup_type: str,
    max_age: str | None,
    checks_file: Path | None,
    dry_run: bool,
    yes: bool,
    json_output: bool,
) -> None:
    """Prove a backup restores: restore it into a scratch database, check it, drop it.

    Picks the newest backup of the target database (its manifest's environment and
    database; of --type, default full) in the storage, or BACKUP when named (a path, a
    name in the backup directory or storage, or a storage URI). Verifies it (manifest,
    size, signature, sha256, readability), restores it into a scratch database on the
    target's server, compares row counts and revision with the manifest, runs the --checks
    queries read-only against the copy, drops it, and reports restore time, size, age, row
    counts and every check. The live database is only read. --dry-run picks and verifies
    the backup and shows the plan; no scratch database is made.

    \b
    Examples:
      db-rollback --storage s3://acme-backups/db drill --max-age 26h --checks checks.sql
      db-rollback drill backups/backup_production_20260101_120000.dump
    """
    app = app.with_flags(dry_run, yes, json_output)
    max_age_seconds = None
    if max_age is not None:
        # Loaded here, not at import: `db-rollback --help` stays light.
        from rollback_cli.backups.drill import parse_max_age

        max_age_seconds = parsed(parse_max_age, max_age, "--max-age")

    execute(
        app,
        "drill",
        lambda api: api.drill(
            app.target(),
            app.storage,
            backup_ref=backup_ref,
            backup_type=backup_type,
            max_age_seconds=max_age_seconds,
            checks_file=checks_file,
            run=app.run,
        ),
        show,
    )


def show(doc: dict[str, Any]) -> None:
    """The drill's result for people."""
    drilled = doc["drill"]
    if doc.get("plan"):
        click.echo(f"backup verified, not restored: {drilled['backup']}")
        render.plan(doc["plan"])
        return
    click.echo(f"restore drill passed: {drilled['backup']}")
    click.echo(f"  uri:       {drilled['uri']}")
    age = drilled["age"]
    if drilled.get("max_age_seconds") is not None:
        age += f" (allowed {drilled['max_age']})"
    click.echo(f"  age:       {age}, made {drilled['created_at']}")
    click.echo(f"  size:      {render.human_size(drilled['size'])}")
    click.echo(
        f"  restored:  {drilled['tables']} tables, {drilled['rows']:,} rows in "
        f"{drilled['restore_seconds']:.1f}s into {drilled['scratch_database']} (dropped)"
    )
    click.echo(f"  revision:  {doc['revision_after'] or '-'}")
    render.checks(doc["checks"])
