"""``rollback schema | data | full | undo``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rollback_cli.cli import render
from rollback_cli.cli.options import JOBS, App, F, pass_app, run_flags
from rollback_cli.cli.runner import execute
from rollback_cli.settings import parse_timeout_ms

LOCK_TIMEOUT_HELP = {
    "schema": "lock_timeout of the downgrade and of the safety backup's table locks, so "
    "neither queues forever behind traffic (e.g. 500ms, 5s, 2min; 0 = forever).",
    "data": "How long the safety backup, stopping writers and the in-place restore wait "
    "for each lock another session holds before the rollback gives up (e.g. 500ms, 5s; "
    "0 = forever).",
    "full": "How long the safety backup, the restore and the downgrade wait for each lock "
    "another session holds before the rollback gives up (e.g. 500ms, 5s; 0 = forever).",
}
STATEMENT_TIMEOUT_HELP = {
    "schema": "statement_timeout of each downgrade statement (e.g. 10min; 0 = none).",
    "full": "statement_timeout of each downgrade statement (e.g. 10min; 0 = none).",
}


def rollback_options(command: str) -> Callable[[F], F]:
    """Options shared by the rollback commands, their help worded for ``command``."""

    def decorate(func: F) -> F:
        func = click.option(
            "--checks",
            "checks_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="SQL file of queries that must each return true afterwards.",
        )(func)
        if command in STATEMENT_TIMEOUT_HELP:  # a data rollback runs no migration statement
            func = click.option(
                "--statement-timeout",
                default="0",
                show_default=True,
                metavar="DURATION",
                help=STATEMENT_TIMEOUT_HELP[command],
            )(func)
        func = click.option(
            "--lock-timeout",
            default="5s",
            show_default=True,
            metavar="DURATION",
            help=LOCK_TIMEOUT_HELP[command],
        )(func)
        return click.option(
            "--no-safety-backup",
            is_flag=True,
            help="Skip the safety backup (refused in protected environments).",
        )(func)

    return decorate


def restore_options(func: F) -> F:
    """Options of the commands that restore a backup (data, full)."""
    func = click.option(
        "--allow-cross-environment",
        is_flag=True,
        help="Allow restoring a backup taken in another environment.",
    )(func)
    func = click.option(
        "--safety-backup-timing",
        type=click.Choice(["auto", "after-swap", "during-restore"]),
        default="auto",
        show_default=True,
        help=(
            "When the swap strategy dumps its safety backup. after-swap: the kept database, "
            "once the restored copy is live and validated (the shortest time to recovery). "
            "during-restore: the live database, beside the restore, stored before the swap "
            "(the shortest total; it shares the cores with the restore). auto: "
            "during-restore for a server on this machine with 4 cores or more, else "
            "after-swap."
        ),
    )(func)
    return click.option(
        "--jobs",
        "-j",
        type=JOBS,
        default="auto",
        show_default=True,
        help="Parallel pg_restore jobs (swap strategy). auto: one per core, at most one per "
        "table holding rows and 8; always within the server's free connection slots.",
    )(func)


def _options(api: Any, opts: dict[str, Any], strategy: str = "swap") -> Any:
    """The RollbackOptions of the command line's options (parsed when the command runs, so
    a bad timeout is a usage error with the documented exit code)."""
    return api.RollbackOptions(
        strategy=strategy,
        jobs=opts.get("jobs"),
        allow_cross_environment=opts.get("allow_cross_environment", False),
        allow_other_database=opts.get("allow_other_database", False),
        no_safety_backup=opts["no_safety_backup"],
        timeouts=api.Timeouts(
            parse_timeout_ms(opts["lock_timeout"]),
            parse_timeout_ms(opts.get("statement_timeout", "0")),
        ),
        checks_file=opts["checks_file"],
        no_rehearsal=opts.get("no_rehearsal", False),
        rehearse_with_data=opts.get("rehearse_with_data", False),
        accept_data_loss=opts.get("accept_data_loss", False),
        safety_timing=opts.get("safety_backup_timing", "auto"),
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
        "--rehearse-with-data",
        is_flag=True,
        help="Rehearse on a copy of the live data too, not only the schema: a downgrade "
        "that fails on existing rows (NOT NULL without default, a data migration back) "
        "fails there. Costs a dump and restore of the database.",
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
@rollback_options("schema")
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
@restore_options
@rollback_options("data")
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
@rehearsal_options
@click.option(
    "--to-revision",
    required=True,
    metavar="REV",
    help="Target Alembic revision after the restore (partial ids allowed, or 'base').",
)
@click.option("--backup-file", metavar="BACKUP", help="Restore this backup first.")
@click.option(
    "--strategy",
    type=click.Choice(["swap", "in-place"]),
    default="swap",
    show_default=True,
    help="How the backup is restored (see `rollback data --help`).",
)
@restore_options
@rollback_options("full")
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
    """Swap the database kept by the last data rollback back in (undo it again to reverse).

    The database the rollback replaced was kept as {db}_pre_{ts}; undo renames it back
    into place and keeps the current one the same way. `status` shows what undo would
    swap back.

    \b
    Example:
      db-rollback rollback undo --dry-run
    """
    app = app.with_flags(dry_run, yes, json_output)
    execute(
        app,
        "rollback undo",
        lambda api: api.rollback_undo(app.target(), app.storage, run=app.run),
        render.rollback(app),
    )
