"""structlog set-up: JSON lines (or a console renderer on a TTY) on stderr, JSON in a log file.

Configured once per run by the command line's runner (or by a library user calling
:func:`configure`), never at import time: until then the tool logs nothing. Standard
library loggers (alembic, botocore) go through the same processors, so every line of a
run has one format and carries run_id, environment, command, step and actor.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import structlog

from rollback_cli.files import ensure_private_dir

_SENSITIVE_KEYS = re.compile(
    r"(password|passwd|secret|token|credential|authorization|api_key|private_key|"
    r"database_url|aws_secret_access_key|aws_session_token)",
    re.IGNORECASE,
)
# URL user-info, the pattern pass after the exact one: the password runs to the LAST "@"
# before the path (a raw "@" in a password is common; "/" ends the host part).
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/:@\s]*):(?P<pw>[^\s/]*)@"
)
# A URL whose user-info is a single token (https://TOKEN@host, s3://KEY@bucket): the token
# is the secret. PostgreSQL URLs name a user there, which is not.
_URL_TOKEN = re.compile(
    r"(?P<scheme>(?<![A-Za-z0-9+.-])(?!(?i:postgres(?:ql)?(?:\+[a-z0-9]+)?)://)"
    r"[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<token>[^/:@\s]+)@"
)
_KV_PASSWORD = re.compile(
    r"""(?P<key>\b(?:password|passwd|pgpassword|aws_secret_access_key|aws_session_token)"""
    r"""\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""",
    re.IGNORECASE,
)
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql"})
REDACTED = "***"
_MIN_SECRET = 3

_handlers: list[logging.Handler] = []
#: the steps of the current run and how far each got: started, finished or failed
_step_states: dict[str, str] = {}
#: the logger of a run's final error event: the command line prints that error as its one
#: error line, so the console leaves the event out (it is in the log file)
OUTCOME_LOGGER = "rollback_cli.outcome"
_STEP_EVENTS = frozenset({"step started", "step finished", "step failed"})
# Fields every event carries: the console's short lines leave them out.
_CONTEXT_FIELDS = frozenset(
    {"event", "run_id", "environment", "command", "step", "actor", "timestamp", "level", "logger"}
)
_CLEAR_LINE = "\r\x1b[K"
# A library stays silent until its user configures logging (the standard library's advice).
logging.getLogger("rollback_cli").addHandler(logging.NullHandler())


def secret_forms(secret: str) -> set[str]:
    """Every spelling of ``secret`` that output can hold: raw, percent-encoded (as a URL
    carries it), with its whitespace collapsed (one-line messages), escaped by repr or JSON."""
    escaped = secret.replace("\\", "\\\\")  # inside a repr() of a longer string
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret, safe=""),
        " ".join(secret.split()),
        repr(secret)[1:-1],
        escaped,
        escaped.replace("'", "\\'"),
        escaped.replace('"', '\\"'),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    return {form for form in forms if len(form) >= _MIN_SECRET}


def url_passwords(text: str, *, whole: bool = False) -> list[str]:
    """The passwords of the URLs in ``text`` (raw and percent-decoded), read generously: a
    password may hold a raw "@", "/", "?", "#" or ":", so every "@" after the user name
    ends one candidate and all are returned (the redactor replaces the longest first).

    ``whole``: ``text`` is one value (an argument, an option), so a password may hold
    spaces too; in free text a URL ends at whitespace.
    """
    found: list[str] = []
    for match in _URL_START.finditer(text):
        scheme = match.group().removesuffix("://").partition("+")[0].lower()
        rest = text[match.end() :]
        if not whole:
            rest = rest.split(None, 1)[0] if rest.strip() else ""
        user, colon, after = rest.partition(":")
        candidates: list[str] = []
        if colon and not any(c in user for c in "/@?#"):
            candidates = [after[:at] for at, char in enumerate(after) if char == "@"]
        elif scheme not in _POSTGRES_SCHEMES:
            # A single-token user-info (no ":"): the token is the credential.
            host_part = re.split(r"[/?#\s]", rest, maxsplit=1)[0]
            if "@" in host_part:
                candidates = [host_part.rpartition("@")[0]]
        for candidate in candidates:
            found += [candidate, unquote(candidate)]
    return [value for value in dict.fromkeys(found) if len(value) >= _MIN_SECRET]


class Redactor:
    """Scrubs credentials from text and events.

    Exact known secrets go first, in every spelling :func:`secret_forms` lists, longest
    first in one pass; the patterns (URL user-info, key=value passwords) only after, so a
    password holding "@", ":", "/" or "%" is never cut by a pattern before the exact pass
    sees it whole.
    """

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add_secret(self, value: str | None) -> None:
        if value and len(value) >= _MIN_SECRET and value not in self._secrets:
            self._secrets.add(value)
            self._pattern = None

    def add_url_secrets(self, text: str | None, *, whole: bool = True) -> None:
        """Register the password of every URL in ``text`` (see :func:`url_passwords`)."""
        if text and "://" in text:
            for password in url_passwords(text, whole=whole):
                self.add_secret(password)

    def clear(self) -> None:
        self._secrets.clear()
        self._pattern = None

    def _exact(self) -> re.Pattern[str] | None:
        if self._pattern is None and self._secrets:
            forms = set().union(*(secret_forms(s) for s in self._secrets))
            ordered = sorted(forms, key=lambda form: (-len(form), form))
            self._pattern = re.compile("|".join(map(re.escape, ordered)))
        return self._pattern

    def scrub(self, text: str) -> str:
        exact = self._exact()
        if exact is not None:
            text = exact.sub(REDACTED, text)
        text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
        text = _URL_TOKEN.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
        return _KV_PASSWORD.sub(lambda m: f"{m['key']}{REDACTED}", text)

    def scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {
                self.scrub(k) if isinstance(k, str) else k: self._scrub_item(str(k), v)
                for k, v in value.items()
            }
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(self.scrub_value(v) for v in value))
        if isinstance(value, list | tuple | set | frozenset):
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
    _step_states.clear()
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


def _scrub_text(_logger: Any, _method: str, text: Any) -> Any:
    """The last step of a plain-text renderer: its line, scrubbed once more as a whole.
    (JSON lines are not: a replacement could cut an escape sequence; their values were
    scrubbed just before rendering.)"""
    return redactor.scrub(text) if isinstance(text, str) else text


class _TerminalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Console lines on stderr. On a terminal each line first clears the current one (a
    progress bar, or the step still running); with ``live_steps``, a step that starts is
    shown on a line of its own that the next line replaces (and not at all elsewhere)."""

    def __init__(self, stream: Any, *, live_steps: bool = False) -> None:
        super().__init__(stream)
        self.live_steps = live_steps

    def emit(self, record: logging.LogRecord) -> None:
        try:
            live = self.stream.isatty()
            started = self.live_steps and _event_name(record) == "step started"
            if started and not live:
                return
            text = self.format(record)
            self.stream.write(
                (_CLEAR_LINE if live else "") + text + ("" if started else self.terminator)
            )
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _event_name(record: logging.LogRecord) -> str | None:
    event = record.msg.get("event") if isinstance(record.msg, dict) else None
    return event if isinstance(event, str) else None


class _OperatorFilter(logging.Filter):
    """The default console: step progress and warnings; never the final error event (the
    command line prints that error once, as its last line)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OUTCOME_LOGGER:
            return False
        return record.levelno >= self.level or _event_name(record) in _STEP_EVENTS


def _operator_line(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    """One short line for a person: ``✓ dump (1.2 s)``, ``! message (key=value)``."""
    event = str(event_dict.get("event", ""))
    step_name = event_dict.get("step", "")
    if event in _STEP_EVENTS:
        duration = event_dict.get("duration_ms")
        took = f" ({duration / 1000:.1f} s)" if isinstance(duration, int | float) else ""
        mark = {"step started": "…", "step finished": "✓", "step failed": "✗"}[event]
        return f"  {mark} {step_name}{took}"
    fields = ", ".join(
        f"{key}={value}"
        for key, value in event_dict.items()
        if key not in _CONTEXT_FIELDS and not key.startswith("_") and key != "exception"
    )
    mark = "!" if method == "warning" else "✗"
    return f"  {mark} {event}" + (f" ({fields})" if fields else "")


def _stderr_handler(log_format: str, level: int) -> logging.Handler:
    # Exceptions are rendered by the formatters, after the shared chain: scrub them again
    # once they are text (an exception's message can hold a URL with a password).
    handler: logging.Handler
    if log_format == "console" and level >= logging.WARNING:
        # The default on a terminal: step progress and warnings, one short line each.
        handler = _TerminalHandler(sys.stderr, live_steps=True)
        handler.addFilter(_OperatorFilter(level))
        handler.setFormatter(_formatter(redactor, _operator_line, _scrub_text))
        handler.setLevel(logging.DEBUG)
        return handler
    if log_format == "console":
        handler = _TerminalHandler(sys.stderr)
        handler.addFilter(_OperatorFilter(logging.DEBUG))
        console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        handler.setFormatter(
            _formatter(structlog.processors.format_exc_info, redactor, console, _scrub_text)
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
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


def outcome_logger() -> Any:
    """The logger of a run's final error event (see :data:`OUTCOME_LOGGER`)."""
    return get_logger(OUTCOME_LOGGER)


def step_states() -> dict[str, str]:
    """The steps of the current run and how far each got (started, finished, failed)."""
    return dict(_step_states)


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
    _step_states[name] = "started"
    logger.info("step started", **fields)
    try:
        yield details
    except BaseException as exc:
        _step_states[name] = "failed"
        logger.warning(
            "step failed",
            duration_ms=round((time.monotonic() - started) * 1000),
            error=type(exc).__name__,
            **details,
        )
        raise
    else:
        _step_states[name] = "finished"
        logger.info(
            "step finished", duration_ms=round((time.monotonic() - started) * 1000), **details
        )
    finally:
        structlog.contextvars.bind_contextvars(step=previous)


#: Who shows progress of long steps (``label, done, total, unit``): the command line sets
#: one on a terminal; without one, progress is not measured at all.
ProgressSink = Callable[[str, int, "int | None", str], None]
_progress_sink: ContextVar[ProgressSink | None] = ContextVar("progress_sink", default=None)


def set_progress_sink(sink: ProgressSink | None) -> None:
    _progress_sink.set(sink)


def progress_sink() -> ProgressSink | None:
    """The sink to report a long step's progress to, or None (then nothing is counted)."""
    return _progress_sink.get()
