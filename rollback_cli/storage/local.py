"""Backups in a local directory (the default, and the staging area for remote storage)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rollback_cli.errors import BackupError, ConfigError
from rollback_cli.files import (
    TEMP_PREFIX,
    ensure_private_dir,
    no_writers_in,
    remove_path,
    writing_in,
)
from rollback_cli.log import get_logger
from rollback_cli.storage.base import Storage, StoredObject, sha256_artifact, tree_size


class LocalStorage(Storage):
    location = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def uri(self, key: str = "") -> str:
        path = (self.root / key) if key else self.root
        return path.resolve().as_uri()

    def _path(self, key: str) -> Path:
        candidate = (self.root / key).resolve()
        root = self.root.resolve()
        if candidate != root and root not in candidate.parents:
            raise ConfigError(f"backup name {key!r} points outside the backup directory")
        return candidate

    def list_objects(self) -> list[StoredObject]:
        if not self.root.is_dir():
            return []
        objects = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                found = self.stat(entry.name)
            except ConfigError:
                # A link pointing out of the backup directory is not one of our backups.
                get_logger().warning(
                    "skipping entry outside the backup directory", entry=entry.name
                )
                continue
            if found is not None:
                objects.append(found)
        return objects

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        return StoredObject(
            key=key,
            size=tree_size(path),
            modified=datetime.fromtimestamp(info.st_mtime, tz=timezone.utc),
            is_dir=path.is_dir(),
        )

    def upload(self, source: Path, key: str, *, sha256: str | None = None) -> None:
        destination = self._path(key)
        if destination == source.resolve():
            return
        ensure_private_dir(self.root)
        temp = destination.with_name(f"{TEMP_PREFIX}{destination.name}")
        with writing_in(self.root):
            self._copy_checked(source, temp, destination, sha256)

    def _copy_checked(
        self, source: Path, temp: Path, destination: Path, sha256: str | None
    ) -> None:
        try:
            if source.is_dir():
                shutil.copytree(source, temp)
                temp.chmod(0o700)
            else:
                shutil.copyfile(source, temp)
                temp.chmod(0o600)
            # Checked before the rename: a bad copy never appears under its real name.
            if sha256 is not None and sha256_artifact(temp) != sha256:
                raise BackupError(f"copy of {source} does not match its recorded checksum")
            temp.replace(destination)
        except BaseException:
            remove_path(temp)
            raise

    def download(self, key: str, destination: Path, *, sha256: str | None = None) -> None:
        source = self._path(key)
        if not source.exists():
            raise FileNotFoundError(key)
        temp = destination.with_name(f"{TEMP_PREFIX}{destination.name}")
        try:
            if source.is_dir():
                shutil.copytree(source, temp)
            else:
                shutil.copyfile(source, temp)
            if sha256 is not None and sha256_artifact(temp) != sha256:
                raise BackupError(f"{self.uri(key)} does not match its recorded checksum")
            temp.replace(destination)
        except BaseException:
            remove_path(temp)
            raise

    def read_text(self, key: str) -> str:
        return self._path(key).read_text(encoding="utf-8")

    def write_text(self, key: str, text: str) -> None:
        destination = self._path(key)
        ensure_private_dir(destination.parent)
        with writing_in(destination.parent):
            self._write_atomically(destination, text)

    def _write_atomically(self, destination: Path, text: str) -> None:
        fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=destination.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            Path(temp_name).chmod(0o600)
            Path(temp_name).replace(destination)
        except BaseException:
            remove_path(Path(temp_name))
            raise

    def delete(self, key: str) -> None:
        remove_path(self._path(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def cleanup_incomplete(self, older_than_seconds: float, *, dry_run: bool = False) -> list[str]:
        """Temp files of interrupted writes: all of them when no run is writing here (a
        killed run's are removed at once), else only those older than the cutoff."""
        if not self.root.is_dir():
            return []
        removed = []
        cutoff = time.time() - older_than_seconds
        with no_writers_in(self.root) as idle:
            for entry in sorted(self.root.iterdir()):
                if not entry.name.startswith(TEMP_PREFIX):
                    continue
                if idle or entry.lstat().st_mtime < cutoff:
                    if not dry_run:
                        remove_path(entry)
                    removed.append(entry.name)
        return removed
