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
from click.core import ParameterSource

from rollback_cli import __version__
from rollback_cli.cli import legacy
from rollback_cli.cli.backup import backup
from rollback_cli.cli.checks import cleanup_artifacts_cmd, status, validate_cmd
from rollback_cli.cli.drill import drill
from rollback_cli.cli.options import App, F
from rollback_cli.cli.rollback import rollback
from rollback_cli.cli.runner import ARGV_META_KEY, stdout_closed
from rollback_cli.errors import EXIT_CODE_HELP, ExitCode, UsageError
from rollback_cli.settings import StorageConfig, validate_environment

#: marks a command that already takes the global options after its name
_GLOBALS_ADDED = "_rollback_cli_global_options"
#: ``ctx.meta`` keys: the global options' values, and the names given after the command
GLOBALS_META_KEY = "rollback_cli.global_options"
NAMED_META_KEY = "rollback_cli.named_options"

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


# The global options: (parameter declarations, attributes). The group takes them before the
# command; every command and sub-group takes them after it too (``backup create -e
# production``), hidden from its help, without defaults or environment variables of its
# own, so that only what the command line gives there overrides the group's value.
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--database-url",),
        {
            "envvar": "DATABASE_URL",
            "metavar": "URL",
            "help": "postgresql://user@host:port/db (password: in the URL, PGPASSWORD or "
            "~/.pgpass). Default: libpq PG* variables.",
        },
    ),
    (
        ("--restore-url",),
        {
            "envvar": "DB_ROLLBACK_RESTORE_URL",
            "metavar": "URL",
            "help": "Connect restores (pg_restore/psql) as this role, e.g. the database owner: "
            "a role without superuser rights, so nothing a backup holds can run on the "
            "server's host.",
        },
    ),
    (
        ("--environment", "-e"),
        {
            "envvar": "DB_ROLLBACK_ENVIRONMENT",
            "default": "staging",
            "show_default": True,
            "help": "Environment name recorded in backups and logs; 'production' needs --yes.",
        },
    ),
    (
        ("--backup-dir",),
        {
            "envvar": "DB_ROLLBACK_BACKUP_DIR",
            "type": click.Path(path_type=Path),
            "default": Path("backups"),
            "show_default": True,
            "help": "Local backup directory (and staging area for remote storage).",
        },
    ),
    (
        ("--storage",),
        {
            "envvar": "DB_ROLLBACK_STORAGE",
            "metavar": "URI",
            "help": "file:///path or s3://bucket/prefix. Default: the backup directory.",
        },
    ),
    (
        ("--log-dir",),
        {
            "envvar": "DB_ROLLBACK_LOG_DIR",
            "type": click.Path(path_type=Path),
            "default": Path("logs"),
            "show_default": True,
            "help": "Directory of the run's JSON log file "
            "(rollback_{environment}_{UTC timestamp}.log, mode 0600).",
        },
    ),
    (
        ("--log-format",),
        {
            "envvar": "DB_ROLLBACK_LOG_FORMAT",
            "type": click.Choice(["json", "console"]),
            "help": "Log format on stderr. Default: console on a terminal, json otherwise.",
        },
    ),
    (
        ("--log-level",),
        {
            "envvar": "DB_ROLLBACK_LOG_LEVEL",
            "type": click.Choice(["debug", "info", "warning", "error"]),
            "help": "Least severe event shown on stderr. Default: info for json; on a "
            "console, warnings and one line per finished step. The log file always "
            "holds info and above.",
        },
    ),
    (
        ("--verbose", "-v"),
        {
            "is_flag": True,
            "envvar": "DB_ROLLBACK_VERBOSE",
            "help": "Show the structured log on stderr too (same as --log-level info).",
        },
    ),
    (
        ("--alembic-config",),
        {
            "envvar": "DB_ROLLBACK_ALEMBIC_CONFIG",
            "type": click.Path(path_type=Path),
            "default": Path("alembic.ini"),
            "show_default": True,
            "help": "The project's Alembic configuration (script location, env.py). "
            "Named explicitly and missing, `status` fails its alembic check.",
        },
    ),
    (
        ("--alembic-script-location",),
        {
            "envvar": "DB_ROLLBACK_ALEMBIC_SCRIPT_LOCATION",
            "metavar": "PKG:PATH|DIR",
            "help": "The migration scripts when there is no ini file, e.g. "
            "myapp:migrations (an installed package's directory) or a directory; with "
            "--alembic-config too, it replaces that file's script_location.",
        },
    ),
    (
        ("--pg-bin-dir",),
        {
            "envvar": "DB_ROLLBACK_PG_BIN_DIR",
            "type": click.Path(path_type=Path, file_okay=False),
            "help": "Directory with pg_dump/pg_restore/psql to use (must be >= the server major).",
        },
    ),
    (
        ("--s3-endpoint-url",),
        {"envvar": "AWS_ENDPOINT_URL", "metavar": "URL", "help": "S3-compatible endpoint."},
    ),
    (
        ("--s3-region",),
        {
            "envvar": "DB_ROLLBACK_S3_REGION",
            "help": "S3 region of the bucket. Default: boto3's (AWS_REGION, ~/.aws/config).",
        },
    ),
    (
        ("--s3-sse",),
        {
            "envvar": "DB_ROLLBACK_S3_SSE",
            "type": click.Choice(["AES256", "aws:kms"]),
            "help": "Server-side encryption.",
        },
    ),
    (
        ("--s3-kms-key-id",),
        {"envvar": "DB_ROLLBACK_S3_KMS_KEY_ID", "help": "KMS key of --s3-sse aws:kms."},
    ),
    (
        ("--s3-storage-class",),
        {
            "envvar": "DB_ROLLBACK_S3_STORAGE_CLASS",
            "help": "Storage class of uploaded backups, e.g. STANDARD_IA.",
        },
    ),
    (
        ("--keep-local",),
        {
            "is_flag": True,
            "envvar": "DB_ROLLBACK_KEEP_LOCAL",
            "help": "Keep the local copy after uploading to remote storage.",
        },
    ),
    (
        ("--dry-run",),
        {
            "is_flag": True,
            "envvar": "DB_ROLLBACK_DRY_RUN",
            "help": "Run every read-only check and print the plan; change nothing.",
        },
    ),
    (
        ("--yes", "-y"),
        {
            "is_flag": True,
            "envvar": "DB_ROLLBACK_YES",
            "help": "Confirm operations in protected environments without a prompt.",
        },
    ),
    (
        ("--json", "json_output"),
        {"is_flag": True, "help": "Print one JSON result document on stdout."},
    ),
]


def root_options(func: F) -> F:
    """The global options on the group, in the order of :data:`GLOBAL_OPTIONS`."""
    for decls, attrs in reversed(GLOBAL_OPTIONS):
        shown: dict[str, Any] = {"show_envvar": True} if "envvar" in attrs else {}
        func = click.option(*decls, **attrs, **shown)(func)
    return func


def _given_after_command(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A global option given after the command: it overrides the group's value."""
    options = ctx.meta.get(GLOBALS_META_KEY)
    if options is None or ctx.get_parameter_source(str(param.name)) is not (
        ParameterSource.COMMANDLINE
    ):
        return value
    options[str(param.name)] = value
    ctx.meta.setdefault(NAMED_META_KEY, set()).add(str(param.name))
    ctx.obj = build_app(options)
    return value


def accept_global_options(command: click.Command) -> None:
    """Let ``command`` (and, for a group, its commands) take the global options after its
    name too; an option the command defines itself (--dry-run, --yes, --json) stays its own."""
    taken = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    for decls, attrs in GLOBAL_OPTIONS:
        if taken & {d for d in decls if d.startswith("-")}:
            continue
        kept = {k: v for k, v in attrs.items() if k in ("type", "is_flag", "metavar", "help")}
        command.params.append(
            click.Option(
                list(decls),
                hidden=True,
                expose_value=False,
                callback=_given_after_command,
                **kept,
            )
        )
    note = "Global options (see db-rollback --help) are accepted here too."
    command.epilog = f"{command.epilog}\n\n{note}" if command.epilog else note
    if isinstance(command, click.Group):
        for sub_command in command.commands.values():
            accept_global_options(sub_command)


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
        except BrokenPipeError:  # --help or --version read by `head`
            stdout_closed()
            raise click.exceptions.Exit(0) from None
        ctx.meta[ARGV_META_KEY] = given
        return ctx

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        # Only the command that runs takes the global options after its name: made here,
        # not at import, so that --help stays fast.
        if command is not None and not getattr(command, _GLOBALS_ADDED, False):
            accept_global_options(command)
            setattr(command, _GLOBALS_ADDED, True)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            _scrub_click_error(exc, ctx.meta.get(ARGV_META_KEY, []))
            raise
        except BrokenPipeError:  # a command's help read by `head`
            stdout_closed()
            raise click.exceptions.Exit(0) from None


@click.group(
    cls=RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\n" + EXIT_CODE_HELP + "\n\n\b\n" + LEGACY_HELP,
)
@root_options
@click.version_option(__version__, "--version", prog_name="db-rollback")
@click.pass_context
def cli(ctx: click.Context, /, **options: Any) -> None:
    """Safe PostgreSQL backups and rollbacks around deployments.

    Back up before you migrate; roll back schema (Alembic), data (from a verified
    backup) or both when a deploy goes wrong. Every rollback takes a safety backup
    first and never drops the live database before its replacement is validated.
    The global options below may also follow the command.

    \b
    Examples:
      db-rollback backup create --label "before v42"
      db-rollback backup list
      db-rollback rollback full -e production --yes --to-revision ae1027a6acf --backup-file F
    """
    ctx.meta[GLOBALS_META_KEY] = options
    ctx.obj = build_app(options)


def build_app(options: dict[str, Any]) -> App:
    """The App of the global options' values (given before or after the command)."""
    log_format = options["log_format"] or ("console" if sys.stderr.isatty() else "json")
    try:
        environment = validate_environment(options["environment"])
    except UsageError as exc:
        raise click.BadParameter(exc.message, param_hint="--environment") from None
    # On a terminal the console shows results, warnings and step progress; the structured
    # log goes to the log file, and to stderr too when asked for.
    verbose = options["verbose"] or log_format == "json"
    return App(
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
        alembic_config_named=_named("alembic_config"),
        alembic_script_location=options["alembic_script_location"],
        log_dir=options["log_dir"],
        log_format=log_format,
        log_level=options["log_level"] or ("info" if verbose else "warning"),
        dry_run=options["dry_run"],
        yes=options["yes"],
        json_output=options["json_output"],
        interactive=sys.stdin.isatty() and sys.stdout.isatty(),
    )


def _named(name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or in its variable)."""
    context = click.get_current_context(silent=True)
    if context is None:
        return False
    source = context.find_root().get_parameter_source(name)
    return name in context.meta.get(NAMED_META_KEY, ()) or source in (
        ParameterSource.COMMANDLINE,
        ParameterSource.ENVIRONMENT,
    )


for command in (backup, rollback, status, validate_cmd, cleanup_artifacts_cmd, drill):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="db-rollback", standalone_mode=False)
    except BrokenPipeError:  # before Click's own handler, which would exit 1
        stdout_closed()
        sys.exit(0)
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
