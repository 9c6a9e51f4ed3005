"""The command line: parse options, build Settings, call one core function, render its result.

Heavy modules (alembic, sqlalchemy, boto3, psycopg2) are imported inside commands so that
``db-rollback --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from rollback_cli import __version__, legacy
from rollback_cli.errors import EXIT_CODE_HELP, ExitCode, Interrupted, RollbackError, UsageError
from rollback_cli.settings import Settings, validate_environment

F = TypeVar("F", bound=Callable[..., Any])

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


# Click repeats offending values in its messages ("No such command 'postgresql://u:pw@h/db'");
# scrub URL credentials from them. Kept here, not in log.py, so --help stays light.
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*):[^@\s]*@")


def _scrub_click_error(exc: click.ClickException) -> None:
    # Click marks message Final, but its show() reads it back: replacing it is the way.
    exc.message = _URL_CREDENTIALS.sub(r"\g<head>:***@", exc.message)  # type: ignore[misc]


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
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            _scrub_click_error(exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            _scrub_click_error(exc)
            raise


@dataclasses.dataclass
class App:
    """What the group callback hands to every command."""

    settings: Settings
    log_level: str

    def with_flags(self, dry_run: bool, yes: bool, json_output: bool) -> Settings:
        s = self.settings
        return dataclasses.replace(
            s,
            dry_run=s.dry_run or dry_run,
            yes=s.yes or yes,
            json_output=s.json_output or json_output,
        )


pass_app = click.make_pass_decorator(App)


def run_flags(func: F) -> F:
    """``--dry-run``, ``--yes`` and ``--json`` are accepted after the command too."""
    func = click.option(
        "--json", "json_output", is_flag=True, help="Print one JSON result on stdout."
    )(func)
    func = click.option("--yes", "-y", is_flag=True, help="Confirm protected environments.")(func)
    return click.option("--dry-run", is_flag=True, help="Check everything, change nothing.")(func)


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
    settings = Settings(
        database_url=options["database_url"],
        environment=environment,
        backup_dir=options["backup_dir"],
        storage=options["storage"],
        log_dir=options["log_dir"],
        log_format=log_format,
        log_level=options["log_level"],
        alembic_config=options["alembic_config"],
        dry_run=options["dry_run"],
        yes=options["yes"],
        json_output=options["json_output"],
        pg_bin_dir=options["pg_bin_dir"],
        s3_endpoint_url=options["s3_endpoint_url"],
        s3_region=options["s3_region"],
        s3_sse=options["s3_sse"],
        s3_kms_key_id=options["s3_kms_key_id"],
        s3_storage_class=options["s3_storage_class"],
        keep_local=options["keep_local"],
        interactive=sys.stdin.isatty() and sys.stdout.isatty(),
    )
    ctx.obj = App(settings=settings, log_level=options["log_level"])


# --- running a command: the one place where exceptions become exit statuses -------------


class _Terminated(BaseException):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def execute(
    settings: Settings,
    command: str,
    func: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run ``func`` with logging set up; print its result; exit with the documented code."""
    from rollback_cli import log

    run_id = log.new_run_id()
    log_file = log.configure(
        log_dir=settings.log_dir,
        environment=settings.environment,
        command=command,
        log_format=settings.log_format,
        level=settings.log_level,
        run_id=run_id,
    )
    logger = log.get_logger()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    result: dict[str, Any] = {}
    message: str | None = None
    try:
        logger.info(
            "command started",
            version=__version__,
            dry_run=settings.dry_run,
            storage=settings.storage or str(settings.backup_dir),
        )
        result = func()
        code = ExitCode.OK
        outcome = "dry_run" if settings.dry_run else "success"
    except RollbackError as exc:
        code, outcome, message = exc.exit_code, exc.outcome, exc.one_line()
        logger.error(message, exit_code=int(code), outcome=outcome)
    except KeyboardInterrupt:
        interrupted = Interrupted("interrupted; the database is left as the log describes")
        code, outcome, message = interrupted.exit_code, interrupted.outcome, interrupted.message
        logger.error("interrupted", exit_code=int(code))
    except Exception as exc:
        code, outcome = ExitCode.UNEXPECTED, "error"
        message = f"unexpected error: {log.redactor.scrub(f'{type(exc).__name__}: {exc}')}"
        message = " ".join(message.split())
        logger.exception("unexpected error", exit_code=int(code))
    finally:
        signal.signal(signal.SIGTERM, previous)
    document = {
        "command": command,
        "outcome": result.pop("outcome", outcome) if code == ExitCode.OK else outcome,
        "exit_code": int(code),
        "run_id": run_id,
        "environment": settings.environment,
        "log_file": str(log_file) if log_file else None,
        "message": message,
        "backup_file": None,
        "backup_sha256": None,
        "backup_uri": None,
        "revision_before": None,
        "revision_after": None,
        "plan": None,
    }
    document.update({k: v for k, v in result.items() if k not in ("command", "exit_code")})
    logger.info(
        "audit",
        outcome=document["outcome"],
        exit_code=int(code),
        duration_ms=round((time.monotonic() - started) * 1000),
        message=message,
        backup_file=document["backup_file"],
        revision_before=document["revision_before"],
        revision_after=document["revision_after"],
        dry_run=settings.dry_run,
    )
    log.shutdown()
    document = log.redactor.scrub_value(document)
    if settings.json_output:
        click.echo(json.dumps(document, indent=2, default=str))
    elif code == ExitCode.OK and render is not None:
        render(document)
    if message is not None:
        click.echo(f"db-rollback: error: {message}", err=True)
    sys.exit(int(code))


def _prompt(text: str) -> str:
    return str(click.prompt(text, default="", show_default=False, err=True))


def _progress_printer(settings: Settings) -> Callable[[int, float], None] | None:
    if settings.json_output or not sys.stderr.isatty():
        return None

    def show(size: int, elapsed: float) -> None:
        rate = size / elapsed / 1048576 if elapsed else 0.0
        click.echo(f"\r  dumped {size / 1048576:,.1f} MiB ({rate:,.1f} MiB/s)", err=True, nl=False)

    return show


def _human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{size} B"


# --- backup ---------------------------------------------------------------------------


@cli.group()
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
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Parallel dump jobs (directory format only).",
)
@click.option("--compress", metavar="METHOD[:LEVEL]", help="gzip, lz4, zstd or none, e.g. zstd:3.")
@click.option("--label", help="Free text stored in the manifest, e.g. the release.")
@run_flags
@pass_app
def backup_create(
    app: App,
    backup_type: str,
    fmt: str,
    jobs: int,
    compress: str | None,
    label: str | None,
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
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.backup import BackupRequest, create_backup, plan_backup

        request = BackupRequest(backup_type, fmt, jobs, compress, label)
        if settings.dry_run:
            return {"plan": plan_backup(settings, request)}
        created = create_backup(settings, request, progress=_progress_printer(settings))
        return {
            "backup_file": str(created.local_path) if created.local_path else created.key,
            "backup_key": created.key,
            "backup_sha256": created.manifest.sha256,
            "backup_uri": created.uri,
            "backup_size": created.manifest.size,
            "revision_before": created.manifest.alembic_revision,
            "revision_after": created.manifest.alembic_revision,
            "row_counts": created.manifest.row_counts,
        }

    def render(doc: dict[str, Any]) -> None:
        if doc.get("plan"):
            _render_plan(doc["plan"])
            return
        click.echo(f"backup created: {doc['backup_file']}")
        click.echo(f"  uri:      {doc['backup_uri']}")
        click.echo(f"  size:     {_human_size(doc['backup_size'])}")
        click.echo(f"  sha256:   {doc['backup_sha256']}")
        click.echo(f"  revision: {doc['revision_after'] or '-'}")

    execute(settings, "backup create", run, render)


def _render_plan(plan: list[dict[str, str]]) -> None:
    click.echo("dry run: nothing was changed. Plan:")
    for number, item in enumerate(plan, 1):
        click.echo(f"  {number}. {item['step']}: {item['detail']}")


@backup.command("list")
@run_flags
@pass_app
def backup_list(app: App, dry_run: bool, yes: bool, json_output: bool) -> None:
    """List backups with size, age, type, revision and whether they are valid.

    A backup is valid only with a parseable manifest whose size matches; run
    `backup verify` for the full checksum.
    """
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.catalog import list_backups
        from rollback_cli.storage import open_storage

        storage = open_storage(settings)
        try:
            entries = list_backups(storage)
        finally:
            storage.close()
        now = time.time()
        rows = []
        for entry in entries:
            row = entry.to_dict()
            created = entry.created
            row["age_seconds"] = max(0, round(now - created.timestamp())) if created else None
            rows.append(row)
        from rollback_cli.artifacts import kept_databases_if_reachable

        return {
            "outcome": "success",
            "backups": rows,
            "kept_databases": kept_databases_if_reachable(settings),
        }

    def render(doc: dict[str, Any]) -> None:
        from datetime import datetime

        from rollback_cli.catalog import age_text

        rows = doc["backups"]
        kept = doc["kept_databases"]
        if kept:
            click.echo("pre-rollback databases (`rollback undo` swaps back the newest):")
            for database in kept:
                click.echo(f"  {database['name']}")
            click.echo()
        if not rows:
            click.echo("no backups found")
            return
        header = ("NAME", "LOCATION", "SIZE", "AGE", "TYPE", "REVISION", "STATUS")
        table = [header] + [
            (
                r["name"],
                r["location"],
                _human_size(r["size"]),
                age_text(datetime.fromisoformat(r["created_at"]) if r["created_at"] else None),
                r["type"] or "-",
                r["alembic_revision"] or "-",
                "valid" if r["valid"] else f"INVALID: {r['problem']}",
            )
            for r in rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
            click.echo("  ".join([*cells, str(row[-1])]))

    execute(settings, "backup list", run, render)


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
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.verify import verify_backup

        # The checks only read; the restore test creates a database, so a dry run plans it.
        result = verify_backup(
            settings, backup_ref, restore_test=restore_test and not settings.dry_run
        )
        plan = None
        if restore_test and settings.dry_run:
            plan = [
                {
                    "step": "restore-test",
                    "detail": f"restore {result.key} into a scratch database, compare row "
                    "counts and revision with the manifest, drop it",
                }
            ]
        return {
            "outcome": "dry_run" if settings.dry_run else "success",
            "backup_file": result.key,
            "backup_sha256": result.manifest.sha256,
            "backup_uri": result.uri,
            "revision_after": result.manifest.alembic_revision,
            "checks": result.checks,
            "restore_test": result.restore_test,
            "plan": plan,
        }

    def render(doc: dict[str, Any]) -> None:
        click.echo(f"backup OK: {doc['backup_uri']}")
        for check in doc["checks"]:
            click.echo(f"  ✓ {check['check']}: {check['detail']}")
        if doc.get("plan"):
            _render_plan(doc["plan"])

    execute(settings, "backup verify", run, render)


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
    help="Always keep this many newest valid backups.",
)
@run_flags
@pass_app
def backup_cleanup(
    app: App, older_than: str, keep_last: int, dry_run: bool, yes: bool, json_output: bool
) -> None:
    """Apply retention to this environment's backups (the manifest goes first).

    \b
    Example:
      db-rollback backup cleanup --older-than 30d --keep-last 5 --dry-run
    """
    settings = app.with_flags(dry_run, yes, json_output)
    from rollback_cli.settings import parse_duration

    try:
        seconds = parse_duration(older_than)
    except UsageError as exc:
        raise click.BadParameter(exc.message, param_hint="--older-than") from None

    def run() -> dict[str, Any]:
        from rollback_cli.catalog import cleanup_backups
        from rollback_cli.storage import open_storage

        storage = open_storage(settings)
        try:
            result = cleanup_backups(
                storage,
                environment=settings.environment,
                older_than_seconds=seconds,
                keep_last=keep_last,
                dry_run=settings.dry_run,
            )
        finally:
            storage.close()
        return {"removed": [e.key for e in result.removed], "kept": [e.key for e in result.kept]}

    def render(doc: dict[str, Any]) -> None:
        verb = "would remove" if settings.dry_run else "removed"
        click.echo(f"{verb} {len(doc['removed'])} backup(s), kept {len(doc['kept'])}")
        for name in doc["removed"]:
            click.echo(f"  - {name}")

    execute(settings, "backup cleanup", run, render)


# --- status -------------------------------------------------------------------------------


@cli.command("status")
@run_flags
@pass_app
def status(app: App, dry_run: bool, yes: bool, json_output: bool) -> None:
    """Preflight: connection, versions, privileges, revisions, locks and sessions.

    Exits 0 when everything a rollback needs is in place.
    """
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.status import preflight

        report = preflight(settings)
        return {
            "outcome": "success",
            "checks": report.checks,
            "revision_before": report.current_revision,
            "revision_after": report.current_revision,
            "head_revision": report.head_revision,
        }

    def render(doc: dict[str, Any]) -> None:
        marks = {"ok": "✓", "warning": "!", "fail": "✗", "info": "·"}
        for check in doc["checks"]:
            click.echo(f"  {marks.get(check['status'], '?')} {check['name']}: {check['detail']}")

    execute(settings, "status", run, render)


# --- rollback -----------------------------------------------------------------------------


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


def _rollback_options(opts: dict[str, Any], strategy: str = "swap") -> Any:
    from rollback_cli.rollback import RollbackOptions
    from rollback_cli.schema import Timeouts
    from rollback_cli.settings import parse_timeout_ms

    return RollbackOptions(
        strategy=strategy,
        jobs=opts["jobs"],
        allow_cross_environment=opts["allow_cross_environment"],
        no_safety_backup=opts["no_safety_backup"],
        timeouts=Timeouts(
            parse_timeout_ms(opts["lock_timeout"]), parse_timeout_ms(opts["statement_timeout"])
        ),
        checks_file=opts["checks_file"],
    )


def _rollback_document(result: Any) -> dict[str, Any]:
    safety = result.safety_backup
    return {
        "database": result.database,
        "plan": result.plan,
        "revision_before": result.revision_before,
        "revision_after": result.revision_after,
        "backup_file": (str(safety.local_path) if safety.local_path else safety.key)
        if safety
        else None,
        "backup_sha256": safety.manifest.sha256 if safety else None,
        "backup_uri": safety.uri if safety else None,
        "backup_used": result.backup_used,
        "kept_database": result.kept_database,
        "unavailable_ms": round(result.unavailable_ms, 1)
        if result.unavailable_ms is not None
        else None,
        "reverted": result.reverted,
        "validation": result.validation,
        "warnings": result.warnings,
    }


def _render_rollback(settings: Settings) -> Callable[[dict[str, Any]], None]:
    def render(doc: dict[str, Any]) -> None:
        if settings.dry_run:
            _render_plan(doc["plan"])
            for step in doc.get("reverted") or []:
                click.echo(f"\n-- downgrade SQL of {step['revision']} ({step['message']}):")
                click.echo(step["sql"].rstrip() or "-- (empty)")
        else:
            click.echo(
                f"rollback finished: {doc['database']} "
                f"{doc['revision_before'] or '-'} → {doc['revision_after'] or '-'}"
            )
            if doc.get("backup_uri"):
                click.echo(f"  safety backup:  {doc['backup_uri']}")
            if doc.get("kept_database"):
                click.echo(
                    f"  previous database kept as {doc['kept_database']} "
                    "(`rollback undo` swaps it back)"
                )
            if doc.get("unavailable_ms") is not None:
                click.echo(f"  unavailable for {doc['unavailable_ms']} ms")
        for warning in doc.get("warnings") or []:
            click.echo(f"  ! {warning}")

    return render


@cli.group()
def rollback() -> None:
    """Roll back schema, data or both; undo the last data rollback."""


@rollback.command("schema")
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
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.rollback import rollback_schema

        return _rollback_document(
            rollback_schema(settings, to_revision, _rollback_options(opts), _prompt)
        )

    execute(settings, "rollback schema", run, _render_rollback(settings))


@rollback.command("data")
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
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.rollback import rollback_data

        return _rollback_document(
            rollback_data(settings, backup_file, _rollback_options(opts, strategy), _prompt)
        )

    execute(settings, "rollback data", run, _render_rollback(settings))


@rollback.command("full")
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
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.rollback import rollback_full

        return _rollback_document(
            rollback_full(
                settings, to_revision, backup_file, _rollback_options(opts, strategy), _prompt
            )
        )

    execute(settings, "rollback full", run, _render_rollback(settings))


@rollback.command("undo")
@run_flags
@pass_app
def rollback_undo_cmd(app: App, /, dry_run: bool, yes: bool, json_output: bool) -> None:
    """Swap the database kept by the last data rollback back in (undo it again to reverse)."""
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.rollback import RollbackOptions, rollback_undo

        return _rollback_document(rollback_undo(settings, RollbackOptions(), _prompt))

    execute(settings, "rollback undo", run, _render_rollback(settings))


@cli.command("validate")
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

    \b
    Example:
      db-rollback validate --expect-revision 1a2b3c --checks checks.sql
    """
    settings = app.with_flags(dry_run, yes, json_output)

    def run() -> dict[str, Any]:
        from rollback_cli.catalog import locate, read_manifest
        from rollback_cli.errors import OperationFailed
        from rollback_cli.validate import validate_database

        manifest = None
        if backup_file:
            storage, key = locate(settings, backup_file)
            try:
                manifest = read_manifest(storage, key)
            finally:
                storage.close()
        report = validate_database(
            settings.conninfo(),
            expected_revisions=[expect_revision] if expect_revision else None,
            manifest=manifest,
            checks_file=checks_file,
        )
        if report.failures:
            raise OperationFailed(f"validation failed: {report.summary()}")
        return {"outcome": "success", "validation": report.checks}

    def render(doc: dict[str, Any]) -> None:
        for check in doc["validation"]:
            click.echo(f"  ✓ {check['check']}: {check['detail']}")

    execute(settings, "validate", run, render)


@cli.command("cleanup-artifacts")
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
    settings = app.with_flags(dry_run, yes, json_output)
    from rollback_cli.settings import parse_duration

    try:
        temp_age = parse_duration(temp_older_than)
    except UsageError as exc:
        raise click.BadParameter(exc.message, param_hint="--temp-older-than") from None

    def run() -> dict[str, Any]:
        from rollback_cli.artifacts import cleanup_artifacts
        from rollback_cli.guard import confirm_protected
        from rollback_cli.storage import open_storage

        if not settings.dry_run:
            confirm_protected(settings, settings.conninfo().dbname, "cleanup-artifacts", _prompt)
        storage = open_storage(settings)
        try:
            report = cleanup_artifacts(
                settings,
                keep_days=keep_days,
                storage=storage,
                dry_run=settings.dry_run,
                temp_age_seconds=temp_age,
            )
        finally:
            storage.close()
        return {
            "databases": report.databases,
            "tables": report.tables,
            "files": report.files,
            "kept_databases": report.kept,
        }

    def render(doc: dict[str, Any]) -> None:
        verb = "would remove" if settings.dry_run else "removed"
        for kind in ("databases", "tables", "files"):
            click.echo(f"{verb} {len(doc[kind])} {kind}" + "".join(f"\n  - {n}" for n in doc[kind]))
        if doc["kept_databases"]:
            click.echo("kept (within --keep-days): " + ", ".join(doc["kept_databases"]))

    execute(settings, "cleanup-artifacts", run, render)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="db-rollback", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("db-rollback: interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)
