"""``rollback schema | data | full | undo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from rollback_cli.cli import render
from rollback_cli.cli.options import App, F, pass_app, run_flags
from rollback_cli.cli.runner import execute
from rollback_cli.settings import parse_timeout_ms


def rollback_options(func: F) -> F:
    """Options shared by the rollback commands."""
    func = click.option(
        "--checks",
        "checks_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="SQL file of queries that must each return true afterwards.",
    )(func)
    func = click.option(
        "--statement-timeout",
        default="0",
        show_default=True,
        help="statement_timeout for the downgrade (0 = none).",
    )(func)
    func = click.option(
        "--lock-timeout",
        default="5s",
        show_default=True,
        help="lock_timeout for the downgrade, so it never queues forever.",
    )(func)
    func = click.option(
        "--no-safety-backup",
        is_flag=True,
        help="Skip the safety backup (refused in protected environments).",
    )(func)
    func = click.option(
        "--allow-cross-environment",
        is_flag=True,
        help="Allow restoring a backup taken in another environment.",
    )(func)
    return click.option(
        "--jobs",
        "-j",
        type=click.IntRange(min=1),
        default=2,
        show_default=True,
        help="Parallel pg_restore jobs (swap strategy).",
    )(func)


def _options(api: Any, opts: dict[str, Any], strategy: str = "swap") -> Any:
    """The RollbackOptions of the command line's options (parsed when the command runs, so
    a bad timeout is a usage error with the documented exit code)."""
    return api.RollbackOptions(
        strategy=strategy,
        jobs=opts["jobs"],
        allow_cross_environment=opts["allow_cross_environment"],
        allow_other_database=opts.get("allow_other_database", False),
        no_safety_backup=opts["no_safety_backup"],
        timeouts=api.Timeouts(
            parse_timeout_ms(opts["lock_timeout"]), parse_timeout_ms(opts["statement_timeout"])
        ),
        checks_file=opts["checks_file"],
        no_rehearsal=opts.get("no_rehearsal", False),
        accept_data_loss=opts.get("accept_data_loss", False),
    )


@click.group()
def rollback() -> None:
    """Roll back schema, data or both; undo the last data rollback."""


REHEARSAL_OPTIONS = (
    click.option(
        "--no-rehearsal",
        is_flag=True,
        help="Do not rehearse the downgrade on a copy of the schema first (unsafe).",
    ),
    click.option(
        "--accept-data-loss",
        is_flag=True,
        help="Allow, in a protected environment, a downgrade that drops tables or columns "
        "holding live data (the rehearsal counts them).",
    ),
)


def rehearsal_options(func: F) -> F:
    for option in REHEARSAL_OPTIONS:
        func = option(func)
    return func


@rollback.command("schema")
@rehearsal_options
@click.option(
    "--to-revision",
    required=True,
    metavar="REV",
    help="Target Alembic revision (partial ids allowed, or 'base').",
)
@rollback_options
@run_flags
@pass_app
def rollback_schema_cmd(
    app: App, /, to_revision: str, dry_run: bool, yes: bool, json_output: bool, **opts: Any
) -> None:
    """Downgrade with Alembic (in-process) to an ancestor of the current revision.

    Takes a safety backup first. --dry-run lists the revisions it would revert and
    their downgrade SQL, flagging drops of tables or columns.

    \b
    Example:
      db-rollback rollback schema --to-revision 1a2b3c --dry-run
    """
    app = app.with_flags(dry_run, yes, json_output)
    execute(
        app,
        "rollback schema",
        # The options first: a bad timeout is a usage error before any connection.
        lambda api: api.rollback_schema(
            options=_options(api, opts),
            target=app.target(),
            storage=app.storage,
            to_revision=to_revision,
            run=app.run,
        ),
        render.rollback(app),
    )


ALLOW_OTHER_DATABASE = click.option(
    "--allow-other-database",
    is_flag=True,
    help="Allow restoring a backup of another database (its manifest names the database).",
)


@rollback.command("data")
@ALLOW_OTHER_DATABASE
@click.option(
    "--backup-file",
    required=True,
    metavar="BACKUP",
    help="Path, name in the backup directory/storage, or storage URI.",
)
@click.option(
    "--strategy",
    type=click.Choice(["swap", "in-place"]),
    default="swap",
    show_default=True,
    help="swap: restore aside, then rename (needs CREATEDB). "
    "in-place: one pg_restore --clean --single-transaction.",
)
@rollback_options
@run_flags
@pass_app
def rollback_data_cmd(
    app: App,
    /,
    backup_file: str,
    strategy: str,
    dry_run: bool,
    yes: bool,
    json_output: bool,
    **opts: Any,
) -> None:
    """Restore a verified backup in place of the live database.

    The swap strategy restores into {db}_rb_{ts}, validates it, then renames it over the
    live database (kept as {db}_pre_{ts} for `rollback undo`).

    \b
    Example:
      db-rollback rollback data --backup-file backups/backup_staging_20260101_120000.dump
    """
    app = app.with_flags(dry_run, yes, json_output)
    execute(
        app,
        "rollback data",
        lambda api: api.rollback_data(
            options=_options(api, opts, strategy),
            target=app.target(),
            storage=app.storage,
            backup_ref=backup_file,
            run=app.run,
        ),
        render.rollback(app),
    )


@rollback.command("full")
@ALLOW_OTHER_DATABASE
@click.option("--to-revision", required=True, metavar="REV")
@click.option("--backup-file", metavar="BACKUP", help="Restore this backup first.")
@click.option(
    "--strategy", type=click.Choice(["swap", "in-place"]), default="swap", show_default=True
)
@rollback_options
@run_flags
@pass_app
def rollback_full_cmd(
    app: App,
    /,
    to_revision: str,
    backup_file: str | None,
    strategy: str,
    dry_run: bool,
    yes: bool,
    json_output: bool,
    **opts: Any,
) -> None:
    """Data rollback from a backup (if given), then schema rollback to REV.

    One safety backup. The schema step is skipped when the backup is already at REV
    and refused when the backup is older than REV.

    \b
    Example:
      db-rollback rollback full --to-revision 1a2b3c --backup-file backups/backup_x.dump
    """
    app = app.with_flags(dry_run, yes, json_output)
    execute(
        app,
        "rollback full",
        lambda api: api.rollback_full(
            options=_options(api, opts, strategy),
            target=app.target(),
            storage=app.storage,
            to_revision=to_revision,
            backup_ref=backup_file,
            run=app.run,
        ),
        render.rollback(app),
    )


@rollback.command("undo")
@run_flags
@pass_app
def rollback_undo_cmd(app: App, /, dry_run: bool, yes: bool, json_output: bool) -> None:
    """Swap the database kept by the last data rollback back in (undo it again to reverse)."""
    app = app.with_flags(dry_run, yes, json_output)
    execute(
        app,
        "rollback undo",
        lambda api: api.rollback_undo(app.target(), app.storage, run=app.run),
        render.rollback(app),
    )
