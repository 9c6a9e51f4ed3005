"""Running one command: the one place where results and exceptions become output and the
process's exit status.

The core is imported here, when a command runs, and not when the command line is parsed:
``db-rollback --help`` stays fast and never loads psycopg2, alembic or boto3.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType, ModuleType
from typing import Any, Protocol

import click

from rollback_cli import __version__
from rollback_cli.cli.options import App
from rollback_cli.errors import ExitCode, Interrupted, RollbackError
from rollback_cli.settings import PREVIOUS_KEYS_VAR, SIGNING_KEY_VAR

Renderer = Callable[[dict[str, Any]], None]
#: ``ctx.meta`` key of the command line's words as given (before Click converts them)
ARGV_META_KEY = "rollback_cli.argv"


class Result(Protocol):
    def to_document(self) -> dict[str, Any]: ...


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def execute(
    app: App,
    command: str,
    call: Callable[[ModuleType], Result],
    render: Renderer | None = None,
) -> None:
    """Run ``call(api)`` with logging set up, print its result, exit with the documented
    code."""
    sys.exit(int(run(app, command, call, render)))


def run(
    app: App,
    command: str,
    call: Callable[[ModuleType], Result],
    render: Renderer | None = None,
) -> ExitCode:
    """``call(api)`` as one logged, audited run; print the result; return the exit code."""
    from rollback_cli import log

    # Before anything can fail or print: every password this run knows of.
    register_secrets(app, log.redactor)
    from rollback_cli import api

    run_id = log.new_run_id()
    log_file = log.configure(
        log_dir=app.log_dir,
        environment=app.environment,
        command=command,
        log_format=app.log_format,
        level=app.log_level,
        run_id=run_id,
    )
    started = time.monotonic()
    result, code, outcome, message = _call(app, call, api, log)
    document = _document(command, code, outcome, run_id, app.environment, log_file, message)
    if code == ExitCode.OK:
        document["outcome"] = result.pop("outcome", outcome)
    document.update({k: v for k, v in result.items() if k not in ("command", "exit_code")})
    log.get_logger().info(
        "audit",
        outcome=document["outcome"],
        exit_code=int(code),
        duration_ms=round((time.monotonic() - started) * 1000),
        message=message,
        backup_file=document["backup_file"],
        revision_before=document["revision_before"],
        revision_after=document["revision_after"],
        dry_run=app.dry_run,
    )
    log.shutdown()
    redactor = log.redactor
    document = redactor.scrub_value(document)
    if app.json_output:
        # Values are scrubbed above (the JSON text itself is not: a replacement could cut an
        # escape sequence); what json cannot encode is shown as its scrubbed str().
        click.echo(json.dumps(document, indent=2, default=lambda o: redactor.scrub(str(o))))
    elif code == ExitCode.OK and render is not None:
        with _scrubbed_stdout(redactor):
            render(document)
    if message is not None:
        click.echo(redactor.scrub(f"db-rollback: error: {message}"), err=True)
    return code


def register_secrets(app: App, redactor: Any) -> None:
    """Hand the redactor every password this run can know before it connects anywhere:
    the database's (URL or PG* variables, as the target resolves them), the AWS keys in the
    environment, and the password of every URL-shaped value on the command line (options,
    arguments, and the process's argv), e.g. ``--storage gs://KEY:SECRET@bucket``."""
    from rollback_cli.settings import resolve_conninfo

    texts: list[Any] = [
        app.database_url,
        app.storage_options.storage,
        app.storage_options.s3_endpoint_url,
        *sys.argv[1:],
    ]
    context = click.get_current_context(silent=True)
    if context is not None:
        texts += context.meta.get(ARGV_META_KEY, [])
    while context is not None:
        texts += [*context.params.values(), *context.args]
        context = context.parent
    for text in _strings(texts):
        redactor.add_url_secrets(text)
    for name in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", SIGNING_KEY_VAR):
        redactor.add_secret(os.environ.get(name))
    for key in os.environ.get(PREVIOUS_KEYS_VAR, "").split(","):
        redactor.add_secret(key.strip())
    # A bad configuration is reported by the run itself (redacted); here it only has no
    # password to add.
    with contextlib.suppress(Exception):
        redactor.add_secret(resolve_conninfo(app.database_url).password)


def _strings(values: list[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list | tuple):
            yield from _strings(list(value))
        elif value is not None and not isinstance(value, bool | int | float):
            yield str(value)


@contextlib.contextmanager
def _scrubbed_stdout(redactor: Any) -> Iterator[None]:
    """What a renderer prints, scrubbed as a whole before it reaches stdout."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue()
        if text:
            click.echo(redactor.scrub(text), nl=False)


def _call(
    app: App, call: Callable[[ModuleType], Result], api: ModuleType, log: ModuleType
) -> tuple[dict[str, Any], ExitCode, str, str | None]:
    """Run the command: its document, exit code, outcome and error message (if any)."""
    logger = log.get_logger()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        logger.info(
            "command started",
            version=__version__,
            dry_run=app.dry_run,
            storage=app.storage_options.display,
        )
        result = call(api).to_document()
        return result, ExitCode.OK, "dry_run" if app.dry_run else "success", None
    except RollbackError as exc:
        # exc.one_line(), scrubbed before its whitespace is collapsed (a password can hold
        # runs of spaces, and a collapsed one would no longer match).
        text = exc.message if not exc.hint else f"{exc.message} ({exc.hint})"
        message = " ".join(log.redactor.scrub(text).split())
        logger.error(message, exit_code=int(exc.exit_code), outcome=exc.outcome)
        return {}, exc.exit_code, exc.outcome, message
    except KeyboardInterrupt:
        interrupted = Interrupted("interrupted; the database is left as the log describes")
        logger.error("interrupted", exit_code=int(interrupted.exit_code))
        return {}, interrupted.exit_code, interrupted.outcome, interrupted.message
    except Exception as exc:
        message = f"unexpected error: {log.redactor.scrub(f'{type(exc).__name__}: {exc}')}"
        logger.exception("unexpected error", exit_code=int(ExitCode.UNEXPECTED))
        return {}, ExitCode.UNEXPECTED, "error", " ".join(message.split())
    finally:
        signal.signal(signal.SIGTERM, previous)


def _document(
    command: str,
    code: ExitCode,
    outcome: str,
    run_id: str,
    environment: str,
    log_file: Any,
    message: str | None,
) -> dict[str, Any]:
    """The fields every result document has, whatever the command."""
    return {
        "command": command,
        "outcome": outcome,
        "exit_code": int(code),
        "run_id": run_id,
        "environment": environment,
        "log_file": str(log_file) if log_file else None,
        "message": message,
        "backup_file": None,
        "backup_sha256": None,
        "backup_uri": None,
        "revision_before": None,
        "revision_after": None,
        "plan": None,
    }
