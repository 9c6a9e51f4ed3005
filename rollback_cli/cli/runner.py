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


def stdout_closed() -> None:
    """The reader of stdout went away (``db-rollback backup list | head -1``): not an error.
    Point stdout at /dev/null so that no later write, nor the interpreter's last flush at
    exit, fails again (Python's documented pattern for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a file: a caller's stream
        pass
    finally:
        os.close(devnull)


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
    from rollback_cli.cli.render import step_progress

    log.set_progress_sink(step_progress(app))
    started = time.monotonic()
    result, code, outcome, message = _call(app, command, call, api, log)
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
    try:
        if app.json_output:
            # Values are scrubbed above (the JSON text itself is not: a replacement could cut
            # an escape sequence); what json cannot encode is shown as its scrubbed str().
            click.echo(json.dumps(document, indent=2, default=lambda o: redactor.scrub(str(o))))
        elif render is not None and (code == ExitCode.OK or result):
            # A failure that carries its partial result (the checklist of a failed status
            # or validate) is shown too, before the error line.
            with _scrubbed_stdout(redactor):
                render(document)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()
    if message is not None:
        if app.log_format == "console":
            from rollback_cli.cli.render import end_live_line

            end_live_line()
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
    app: App,
    command: str,
    call: Callable[[ModuleType], Result],
    api: ModuleType,
    log: ModuleType,
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
        log.outcome_logger().error(message, exit_code=int(exc.exit_code), outcome=exc.outcome)
        # A failure may carry what it found (the checklist of a failed status or validate).
        partial = getattr(exc, "document", None)
        return (
            (dict(partial) if isinstance(partial, dict) else {}),
            exc.exit_code,
            exc.outcome,
            (message),
        )
    except KeyboardInterrupt:
        interrupted = Interrupted(interrupted_state(command, log.step_states()))
        log.outcome_logger().error(
            "interrupted", exit_code=int(interrupted.exit_code), state=interrupted.message
        )
        return {}, interrupted.exit_code, interrupted.outcome, interrupted.message
    except Exception as exc:
        message = f"unexpected error: {log.redactor.scrub(f'{type(exc).__name__}: {exc}')}"
        log.outcome_logger().exception("unexpected error", exit_code=int(ExitCode.UNEXPECTED))
        return {}, ExitCode.UNEXPECTED, "error", " ".join(message.split())
    finally:
        signal.signal(signal.SIGTERM, previous)


#: steps that change the live database, and what an interrupt during each leaves
_CHANGING_STEPS = {
    "stop-writers": "while writers were being stopped: the database's data is unchanged",
    "restore-in-place": "during the in-place restore, which runs as one transaction: it was "
    "rolled back and the database holds what it held before",
    "downgrade": "during the Alembic downgrade: its transaction was rolled back unless the "
    "migration environment commits each revision on its own (`db-rollback status` shows "
    "the revision the database is at)",
    "swap": "at the swap, which holds signals until its renames are done: the database is "
    "the restored copy if the swap completed, else the untouched original (`db-rollback "
    "status` shows which, and the kept database `rollback undo` would swap back)",
}
#: commands that may change a database (the others only read it)
_CHANGING_COMMANDS = ("rollback", "cleanup-artifacts")


def interrupted_state(command: str, steps: dict[str, str]) -> str:
    """What an interrupted run left, in words, from how far its steps got."""
    if not command.startswith(_CHANGING_COMMANDS):
        return "interrupted; no database was changed and partial files are removed"
    changing = {name: state for name, state in steps.items() if name in _CHANGING_STEPS}
    unfinished = [name for name, state in changing.items() if state != "finished"]
    if unfinished:
        return f"interrupted {_CHANGING_STEPS[unfinished[-1]]}"
    if changing:
        return (
            f"interrupted after the live database was changed ({', '.join(changing)} "
            "finished); the steps after it did not run: check it with `db-rollback validate`"
        )
    return (
        "interrupted before any change: the live database is as it was (scratch copies and "
        "partial files are removed)"
    )


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
