"""Private files and directories: 0700 directories, temp names of unfinished writes."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def writing_in(directory: Path) -> Iterator[None]:
    """Hold the directory's writers lock (a shared flock on the directory itself) while
    writing temp files in it: cleanup then knows whether a temp file belongs to a run that
    is still going. The kernel drops the lock when the process dies, even under SIGKILL."""
    ensure_private_dir(directory)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextmanager
def no_writers_in(directory: Path) -> Iterator[bool]:
    """True (and no run can start writing until the block ends) when no run writes temp
    files in ``directory``; False when one does."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
