"""``status``, ``validate`` and ``cleanup-artifacts``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from rollback_cli.cli import render
from rollback_cli.cli.options import App, parsed, pass_app, run_flags
from rollback_cli.cli.runner import execute
from rollback_cli.settings import parse_duration


@click.command("status")
@run_flags
@pass_app
def status(app: App, dry_run: bool, yes: bool, json_output: bool) -> None:
    """Preflight: connection, versions, client tools, privileges, revisions, locks, sessions.

    Shows every check with its verdict, failed ones first. Exits 0 when everything a
    rollback needs is in place, 3 when the database or a named --alembic-config cannot
    be used, 7 when another check fails.

    \b
    Example:
      db-rollback -e production status --alembic-config deploy/alembic.ini
    """
    app = app.with_flags(dry_run, yes, json_output)
    execute(
        app,
        "status",
        lambda api: api.status(app.target(), require_alembic_config=app.alembic_config_named),
        lambda doc: render.checks(doc.get("checks")),
    )


@click.command("validate")
@click.option("--backup-file", metavar="BACKUP", help="Compare row counts with this manifest.")
@click.option("--expect-revision", metavar="REV", help="alembic_version must equal this.")
@click.option(
    "--checks",
    "checks_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="SQL file of queries that must each return true.",
)
@run_flags
@pass_app
def validate_cmd(
    app: App,
    backup_file: str | None,
    expect_revision: str | None,
    checks_file: Path | None,
    dry_run: bool,
    yes: bool,
    json_output: bool,
) -> None:
    """Post-rollback checks: connectivity, revision, manifest row counts, SQL checks.

    Shows every check with its verdict, failed ones first; exits 5 when one fails.
    --expect-revision takes a partial id, resolved through the Alembic scripts (or,
    without them, matched as a unique prefix of the database's revision).

    The --checks queries run read-only, each in its own transaction with a 30s statement
    timeout; --dry-run reads them but runs none.

    \b
    Example:
      db-rollback validate --expect-revision 1a2b3c --checks checks.sql
    """
    app = app.with_flags(dry_run, yes, json_output)

    def show(doc: dict[str, Any]) -> None:
        if app.dry_run:
            click.echo("dry run: the checks file was read; its queries were not run.")
        render.checks(doc.get("validation"))

    execute(
        app,
        "validate",
        lambda api: api.validate(
            app.target(),
            app.storage,
            backup_ref=backup_file,
            expected_revision=expect_revision,
            checks_file=checks_file,
            run=app.run,
        ),
        show,
    )


@click.command("cleanup-artifacts")
@click.option(
    "--keep-days",
    type=click.FloatRange(min=0),
    default=7,
    show_default=True,
    help="Keep pre-rollback databases (for undo) this many days.",
)
@click.option(
    "--temp-older-than",
    default="1h",
    show_default=True,
    metavar="AGE",
    help="Remove temp files and incomplete uploads older than this.",
)
@run_flags
@pass_app
def cleanup_artifacts_cmd(
    app: App, keep_days: float, temp_older_than: str, dry_run: bool, yes: bool, json_output: bool
) -> None:
    """Drop old {db}_pre_* and stray {db}_rb_* databases, Alembic temp tables, temp files.

    \b
    Example:
      db-rollback cleanup-artifacts --keep-days 3 --dry-run
    """
    app = app.with_flags(dry_run, yes, json_output)
    temp_age = parsed(parse_duration, temp_older_than, "--temp-older-than")

    def show(doc: dict[str, Any]) -> None:
        verb = "would remove" if app.dry_run else "removed"
        for kind in ("databases", "tables", "files"):
            click.echo(f"{verb} {len(doc[kind])} {kind}" + "".join(f"\n  - {n}" for n in doc[kind]))
        if doc["kept_databases"]:
            click.echo("kept (within --keep-days): " + ", ".join(doc["kept_databases"]))

    execute(
        app,
        "cleanup-artifacts",
        lambda api: api.cleanup_artifacts(
            app.target(),
            app.storage,
            keep_days=keep_days,
            temp_age_seconds=temp_age,
            run=app.run,
        ),
        show,
    )
