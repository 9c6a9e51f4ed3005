"""Exit codes and the exception family that carries them.

Every failure the tool knows about is a :class:`RollbackError` subclass whose
``exit_code`` is one of :class:`ExitCode`. The entry point (``cli.main``) is the
only place that turns exceptions into exit statuses and one-line messages.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG = 3
    BACKUP_INVALID = 4
    FAILED_UNCHANGED = 5
    MANUAL_ATTENTION = 6
    REFUSED = 7
    INTERRUPTED = 130


EXIT_CODE_HELP = """\
Exit codes:
  0    ok
  1    unexpected error
  2    usage error
  3    configuration or connection error
  4    backup missing, corrupt or failing verification
  5    operation failed, database unchanged
  6    operation failed after a change began: manual attention (see the log)
  7    refused by a safety guard (production confirmation, lock held,
       version mismatch, cross-environment restore)
  130  interrupted"""


class RollbackError(Exception):
    """Base of every error the tool reports with a documented exit code."""

    exit_code: ExitCode = ExitCode.UNEXPECTED
    outcome: str = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class UsageError(RollbackError):
    exit_code = ExitCode.USAGE
    outcome = "usage_error"


class ConfigError(RollbackError):
    """Bad configuration, or the database/storage cannot be reached."""

    exit_code = ExitCode.CONFIG
    outcome = "config_error"


class BackupError(RollbackError):
    """A backup is missing, corrupt or fails verification."""

    exit_code = ExitCode.BACKUP_INVALID
    outcome = "backup_invalid"


class OperationFailed(RollbackError):
    """The operation failed and the live database was not changed."""

    exit_code = ExitCode.FAILED_UNCHANGED
    outcome = "failed_unchanged"


class ManualAttention(RollbackError):
    """The operation failed after a change began; the message says what state things are in."""

    exit_code = ExitCode.MANUAL_ATTENTION
    outcome = "manual_attention"


class Refused(RollbackError):
    """A safety guard refused the operation."""

    exit_code = ExitCode.REFUSED
    outcome = "refused"


class Interrupted(RollbackError):
    exit_code = ExitCode.INTERRUPTED
    outcome = "interrupted"
