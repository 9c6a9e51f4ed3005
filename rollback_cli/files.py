"""Private files and directories: 0700 directories, temp names of unfinished writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rollback_cli.errors import ConfigError

#: the prefix of files and directories still being written (never listed, never used)
TEMP_PREFIX = ".tmp-"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (0700) or fail with a configuration error that names it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"directory {path} is not writable by this user")


def remove_path(path: Path) -> None:
    """Remove a file or a whole directory; missing is fine; a symlink is removed, not followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
