"""The command line: the global options, the command groups, and the console-script entry.

Each command parses its options, makes one call into :mod:`rollback_cli.api` through
:func:`rollback_cli.cli.runner.execute`, and renders the result.
"""

from __future__ import annotations

import io
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from rollback_cli import __version__
from rollback_cli.cli import legacy
from rollback_cli.cli.backup import backup
from rollback_cli.cli.checks import cleanup_artifacts_cmd, status, validate_cmd
from rollback_cli.cli.options import App
from rollback_cli.cli.rollback import rollback
from rollback_cli.cli.runner import ARGV_META_KEY
from rollback_cli.errors import EXIT_CODE_HELP, ExitCode, UsageError
from rollback_cli.settings import StorageConfig, validate_environment

LEGACY_HELP = """\
Legacy flags (the original rollback script's command lines work verbatim):
  --create-backup [--type T]   = backup create
  --list-backups               = backup list
  --verify-backup FILE         = backup verify FILE
  --cleanup-backups DAYS       = backup cleanup --older-than DAYSd
  --cleanup                    = cleanup-artifacts
  --type schema --to-revision R             = rollback schema
  --type data --backup-file F               = rollback data
  --type full --to-revision R --backup-file F = rollback full"""


def _redactor(args: list[str]) -> Any:
    """The one redactor, told the passwords of every URL on the command line and in the
    settings' environment variables, and the secrets libpq and AWS read from it. Imported
    here, on the error paths only, so that --help stays light."""
    from rollback_cli.log import redactor

    for text in args:
        redactor.add_url_secrets(text)
    for name, value in os.environ.items():
        if name in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            redactor.add_secret(value)
        elif name == "DATABASE_URL" or name.startswith(("DB_ROLLBACK_", "AWS_ENDPOINT_URL")):
            redactor.add_url_secrets(value)
    return redactor


def _scrub_click_error(exc: click.ClickException, args: list[str]) -> None:
    """Click repeats offending values in its messages ("No such command
    'postgresql://u:pw@h/db'"): scrub them with the one redactor."""
    redactor = _redactor(args)
    # Click marks message Final, but its show() reads it back: replacing it is the way.
    exc.message = redactor.scrub(exc.message)  # type: ignore[misc]
    if isinstance(exc, click.FileError):
        exc.ui_filename = redactor.scrub(exc.ui_filename)  # type: ignore[misc]


def _show_scrubbed(exc: click.ClickException, args: list[str]) -> None:
    """``exc.show()``, its whole text (usage line included) scrubbed on the way out."""
    redactor = _redactor(args)
    buffer = io.StringIO()
    exc.show(file=buffer)
    sys.stderr.write(redactor.scrub(buffer.getvalue()))
    sys.stderr.flush()


def _print_scrubbed_traceback() -> None:
    """An exception that escaped everything else: Python's traceback, scrubbed."""
    sys.stderr.write(_redactor(sys.argv[1:]).scrub(traceback.format_exc()))
    sys.stderr.flush()


class RootGroup(click.Group):
    """Translates the original script's flags before Click parses the command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            args = legacy.translate(list(args))
        except UsageError as exc:
            raise click.UsageError(exc.message, ctx) from None
        return super().parse_args(ctx, args)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        given = list(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            _scrub_click_error(exc, given)
            raise
        ctx.meta[ARGV_META_KEY] = given
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            _scrub_click_error(exc, ctx.meta.get(ARGV_META_KEY, []))
            raise


@click.group(
    cls=RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\n" + EXIT_CODE_HELP + "\n\n\b\n" + LEGACY_HELP,
)
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    show_envvar=True,
    metavar="URL",
    help="postgresql://user@host:port/db (password: in the URL, PGPASSWORD or "
    "~/.pgpass). Default: libpq PG* variables.",
)
@click.option(
    "--restore-url",
    envvar="DB_ROLLBACK_RESTORE_URL",
    show_envvar=True,
    metavar="URL",
    help="Connect restores (pg_restore/psql) as this role, e.g. the database owner: a role "
    "without superuser rights, so nothing a backup holds can run on the server's host.",
)
@click.option(
    "--environment",
    "-e",
    envvar="DB_ROLLBACK_ENVIRONMENT",
    show_envvar=True,
    default="staging",
    show_default=True,
    help="Environment name recorded in backups and logs; 'production' needs --yes.",
)
@click.option(
    "--backup-dir",
    envvar="DB_ROLLBACK_BACKUP_DIR",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=Path("backups"),
    show_default=True,
    help="Local backup directory (and staging area for remote storage).",
)
@click.option(
    "--storage",
    envvar="DB_ROLLBACK_STORAGE",
    show_envvar=True,
    metavar="URI",
    help="file:///path or s3://bucket/prefix. Default: the backup directory.",
)
@click.option(
    "--log-dir",
    envvar="DB_ROLLBACK_LOG_DIR",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=Path("logs"),
    show_default=True,
)
@click.option(
    "--log-format",
    envvar="DB_ROLLBACK_LOG_FORMAT",
    show_envvar=True,
    type=click.Choice(["json", "console"]),
    default=None,
    help="Log format on stderr. Default: console on a terminal, json otherwise.",
)
@click.option(
    "--log-level",
    envvar="DB_ROLLBACK_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--alembic-config",
    envvar="DB_ROLLBACK_ALEMBIC_CONFIG",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=Path("alembic.ini"),
    show_default=True,
)
@click.option(
    "--pg-bin-dir",
    envvar="DB_ROLLBACK_PG_BIN_DIR",
    show_envvar=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory with pg_dump/pg_restore/psql to use (must be >= the server major).",
)
@click.option(
    "--s3-endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    show_envvar=True,
    metavar="URL",
    help="S3-compatible endpoint.",
)
@click.option("--s3-region", envvar="DB_ROLLBACK_S3_REGION", show_envvar=True)
@click.option(
    "--s3-sse",
    envvar="DB_ROLLBACK_S3_SSE",
    show_envvar=True,
    type=click.Choice(["AES256", "aws:kms"]),
    help="Server-side encryption.",
)
@click.option("--s3-kms-key-id", envvar="DB_ROLLBACK_S3_KMS_KEY_ID", show_envvar=True)
@click.option("--s3-storage-class", envvar="DB_ROLLBACK_S3_STORAGE_CLASS", show_envvar=True)
@click.option(
    "--keep-local",
    is_flag=True,
    envvar="DB_ROLLBACK_KEEP_LOCAL",
    show_envvar=True,
    help="Keep the local copy after uploading to remote storage.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    envvar="DB_ROLLBACK_DRY_RUN",
    show_envvar=True,
    help="Run every read-only check and print the plan; change nothing.",
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    envvar="DB_ROLLBACK_YES",
    show_envvar=True,
    help="Confirm operations in protected environments without a prompt.",
)
@click.option(
    "--json", "json_output", is_flag=True, help="Print one JSON result document on stdout."
)
@click.version_option(__version__, "--version", prog_name="db-rollback")
@click.pass_context
def cli(ctx: click.Context, /, **options: Any) -> None:
    """Safe PostgreSQL backups and rollbacks around deployments.

    Back up before you migrate; roll back schema (Alembic), data (from a verified
    backup) or both when a deploy goes wrong. Every rollback takes a safety backup
    first and never drops the live database before its replacement is validated.

    \b
    Examples:
      db-rollback backup create --label "before v42"
      db-rollback backup list
      db-rollback -e production --yes rollback full --to-revision ae1027a6acf --backup-file F
    """
    log_format = options["log_format"] or ("console" if sys.stderr.isatty() else "json")
    try:
        environment = validate_environment(options["environment"])
    except UsageError as exc:
        raise click.BadParameter(exc.message, param_hint="--environment") from None
    ctx.obj = App(
        database_url=options["database_url"],
        restore_url=options["restore_url"],
        environment=environment,
        storage_options=StorageConfig(
            backup_dir=options["backup_dir"],
            storage=options["storage"],
            s3_endpoint_url=options["s3_endpoint_url"],
            s3_region=options["s3_region"],
            s3_sse=options["s3_sse"],
            s3_kms_key_id=options["s3_kms_key_id"],
            s3_storage_class=options["s3_storage_class"],
            keep_local=options["keep_local"],
        ),
        pg_bin_dir=options["pg_bin_dir"],
        alembic_config=options["alembic_config"],
        log_dir=options["log_dir"],
        log_format=log_format,
        log_level=options["log_level"],
        dry_run=options["dry_run"],
        yes=options["yes"],
        json_output=options["json_output"],
        interactive=sys.stdin.isatty() and sys.stdout.isatty(),
    )


for command in (backup, rollback, status, validate_cmd, cleanup_artifacts_cmd):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="db-rollback", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("db-rollback: interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except click.ClickException as exc:
        _show_scrubbed(exc, sys.argv[1:] if argv is None else argv)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception:
        _print_scrubbed_traceback()
        sys.exit(int(ExitCode.UNEXPECTED))
    sys.exit(0)
