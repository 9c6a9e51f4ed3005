"""The storage interface every backend implements.

Keys are names relative to the storage root, using ``/`` separators. A key may
name a single file (``backup_x.dump``) or a directory-format backup
(``backup_x.dir``); backends store a directory as the files below it.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    """One backup artifact as a backend sees it (a file, or a whole directory)."""

    key: str
    size: int
    modified: datetime
    is_dir: bool = False


class ArtifactStream(Protocol):
    """An artifact sent while it is written: ``write`` each chunk in order, then
    ``finish`` (stored and checked) or ``abort`` (nothing left behind)."""

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> object: ...

    def abort(self) -> None: ...


class Storage(ABC):
    """Where backups live. Nothing outside ``storage/`` knows which backend is in use."""

    #: short name shown in ``backup list``'s location column
    location: str
    #: for a remote backend, the local directory where backups are staged and kept with
    #: ``--keep-local``; ``backup list`` shows what is there too
    staging: Path | None = None

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """A URI naming ``key`` (or the root), without credentials."""

    @abstractmethod
    def list_objects(self) -> list[StoredObject]:
        """Top-level artifacts under the root; a directory backup counts as one object."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """The artifact at ``key``, or None when it does not exist."""

    @abstractmethod
    def upload(self, source: Path, key: str, *, sha256: str | None = None) -> None:
        """Store the local file or directory ``source`` under ``key``.

        When ``sha256`` is given for a file, the backend checks what it stored.
        """

    @abstractmethod
    def download(self, key: str, destination: Path, *, sha256: str | None = None) -> None:
        """Copy the artifact at ``key`` to the local path ``destination``.

        With ``sha256`` (``sha256_artifact`` of the original) the copy is checked while it
        is written; on a mismatch BackupError is raised and nothing is left at
        ``destination``. A missing artifact raises FileNotFoundError.
        """

    @abstractmethod
    def read_text(self, key: str) -> str:
        """Read a small text object (a manifest)."""

    @abstractmethod
    def write_text(self, key: str, text: str) -> None:
        """Write a small text object atomically: readers see all of it or nothing."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the artifact at ``key`` (a file or a whole directory); missing is fine."""

    def local_path(self, key: str) -> Path | None:
        """The artifact's path when it is already on the local filesystem, else None."""
        return None

    def stream(self, key: str) -> ArtifactStream | None:
        """An upload of the single-file artifact ``key`` that takes it while it is being
        written (a remote backend: the upload overlaps the dump), or None: then
        :meth:`upload` stores it once it is complete."""
        return None

    def cleanup_incomplete(self, older_than_seconds: float, *, dry_run: bool = False) -> list[str]:
        """Remove leftovers of interrupted writes older than the cutoff; return what was
        removed (with ``dry_run``: what would be)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients and connections."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """A checksum of a directory: every file's relative name and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(4, "big") + name)
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_SIZE):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_artifact(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def join_key(*parts: Iterable[str] | str) -> str:
    flat: list[str] = []
    for part in parts:
        if isinstance(part, str):
            flat.append(part)
        else:
            flat.extend(part)
    return "/".join(p.strip("/") for p in flat if p and p.strip("/"))
