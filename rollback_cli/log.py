"""structlog set-up: JSON lines (or a console renderer on a TTY) on stderr, JSON in a log file.

Configured once per run by the command line's runner (or by a library user calling
:func:`configure`), never at import time: until then the tool logs nothing. Standard
library loggers (alembic, botocore) go through the same processors, so every line of a
run has one format and carries run_id, environment, command, step and actor.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from rollback_cli.files import ensure_private_dir

_SENSITIVE_KEYS = re.compile(
    r"(password|passwd|secret|token|credential|authorization|api_key|private_key|"
    r"database_url|aws_secret_access_key|aws_session_token)",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/:@\s]*):(?P<pw>[^@\s/]*)@"
)
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:password|PGPASSWORD)\s*=\s*)(?P<value>'[^']*'|\S+)")
REDACTED = "***"

_handlers: list[logging.Handler] = []
# A library stays silent until its user configures logging (the standard library's advice).
logging.getLogger("rollback_cli").addHandler(logging.NullHandler())


class Redactor:
    """Scrubs credentials from every event: URL user-info, key=value pairs, known secrets."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add_secret(self, value: str | None) -> None:
        if value and len(value) >= 3:
            self._secrets.add(value)

    def clear(self) -> None:
        self._secrets.clear()

    def scrub(self, text: str) -> str:
        text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
        text = _KV_PASSWORD.sub(lambda m: f"{m['key']}{REDACTED}", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_item(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub_value(v) for v in value)
        if isinstance(value, Path):
            return self.scrub(str(value))
        return value

    def _scrub_item(self, key: str, value: Any) -> Any:
        if _SENSITIVE_KEYS.search(key) and value not in (None, ""):
            return REDACTED
        return self.scrub_value(value)

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            event_dict[key] = self._scrub_item(key, event_dict[key])
        return event_dict


redactor = Redactor()
# Structured tracebacks without local variables: locals can hold connection secrets.
_dict_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
_json_renderer = structlog.processors.JSONRenderer(sort_keys=False)


def actor() -> str:
    github_actor = os.environ.get("GITHUB_ACTOR")
    if github_actor:
        return github_actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def log_file_path(log_dir: Path, environment: str, started: datetime) -> Path:
    """A new, empty 0600 log file of its own (created here, so that runs started in the same
    second never share one)."""
    stamp = started.strftime("%Y%m%d_%H%M%S")
    candidate = log_dir / f"rollback_{environment}_{stamp}.log"
    counter = 1
    while True:
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            candidate = log_dir / f"rollback_{environment}_{stamp}_{counter}.log"
            counter += 1
        else:
            return candidate


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor,
    ]


_LOGGER_PROCESSORS: list[Any] = [
    *_shared_processors(),
    structlog.processors.StackInfoRenderer(),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


def configure(
    *,
    log_dir: Path | None,
    environment: str,
    command: str,
    log_format: str,
    level: str = "info",
    run_id: str | None = None,
) -> Path | None:
    """Set up logging for one run and return the log file's path (None when it cannot be made).

    Safe to call more than once in a process (tests do): earlier handlers are replaced.
    """
    shutdown()
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        run_id=run_id or new_run_id(),
        environment=environment,
        command=command,
        step="main",
        actor=actor(),
    )
    _handlers.append(_stderr_handler(log_format, numeric_level))
    log_path: Path | None = None
    if log_dir is not None:
        try:
            ensure_private_dir(log_dir)
            log_path = log_file_path(log_dir, environment, datetime.now(timezone.utc))
            _handlers.append(_file_handler(log_path, min(numeric_level, logging.INFO)))
        except Exception:
            log_path = None
    root = logging.getLogger()
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(min(numeric_level, logging.INFO))
    _quiet_third_parties(numeric_level)
    if log_path is None and log_dir is not None:
        get_logger().warning("log file could not be created", log_dir=str(log_dir))
    return log_path


def _formatter(*processors: Any) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *processors],
    )


def _stderr_handler(log_format: str, level: int) -> logging.Handler:
    # Exceptions are rendered by the formatters, after the shared chain: scrub them again
    # once they are text (an exception's message can hold a URL with a password).
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "console":
        console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        handler.setFormatter(_formatter(structlog.processors.format_exc_info, redactor, console))
    else:
        handler.setFormatter(_formatter(_dict_tracebacks, redactor, _json_renderer))
    handler.setLevel(level)
    return handler


def _file_handler(path: Path, level: int) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_formatter(_dict_tracebacks, redactor, _json_renderer))
    handler.setLevel(level)
    return handler


def _quiet_third_parties(level: int) -> None:
    """Third-party chatter only when asked for (debug)."""
    noisy_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "sqlalchemy"):
        logging.getLogger(name).setLevel(noisy_level)
    # Alembic's "Running downgrade X -> Y" lines are part of the record; its plugin set-up
    # ("setup plugin alembic.autogenerate...") is not.
    logging.getLogger("alembic").setLevel(logging.INFO)
    logging.getLogger("alembic.runtime.plugins").setLevel(noisy_level)


def shutdown() -> None:
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()


def get_logger(name: str = "rollback_cli") -> Any:
    """A structlog logger over the standard library logger ``name``.

    Its processors are its own, not structlog's global configuration: an application that
    configures structlog for itself (or a migration environment that does) changes
    neither where this tool's events go nor what they look like. Until :func:`configure`
    adds handlers, events go nowhere (``rollback_cli`` has a NullHandler), so the library
    is silent when imported.
    """
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_LOGGER_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    )


def bound_context() -> dict[str, Any]:
    return dict(structlog.contextvars.get_contextvars())


@contextmanager
def step(name: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log a step's start and end with its duration; extra fields added to the yielded dict
    are logged with the finish event."""
    logger = get_logger()
    previous = structlog.contextvars.get_contextvars().get("step", "main")
    structlog.contextvars.bind_contextvars(step=name)
    started = time.monotonic()
    details: dict[str, Any] = {}
    logger.info("step started", **fields)
    try:
        yield details
    except BaseException as exc:
        logger.warning(
            "step failed",
            duration_ms=round((time.monotonic() - started) * 1000),
            error=type(exc).__name__,
            **details,
        )
        raise
    else:
        logger.info(
            "step finished", duration_ms=round((time.monotonic() - started) * 1000), **details
        )
    finally:
        structlog.contextvars.bind_contextvars(step=previous)
