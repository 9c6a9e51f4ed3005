"""Running pg_dump: its command line, the stream hashed while it is written, row counts
counted in the same snapshot meanwhile."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rollback_cli.backups.manifest import BACKUP_FORMATS, BACKUP_TYPES
from rollback_cli.errors import OperationFailed, UsageError
from rollback_cli.postgres.catalog import table_row_counts
from rollback_cli.postgres.clients import ClientTools, child_environment, error_tail
from rollback_cli.postgres.connection import first_line
from rollback_cli.storage.base import CHUNK_SIZE, sha256_tree, tree_size

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo

ProgressCallback = Callable[[int, float], None]
COMPRESS_METHODS = ("gzip", "lz4", "zstd", "none")


@dataclass(frozen=True)
class BackupRequest:
    backup_type: str = "full"
    fmt: str = "custom"
    jobs: int = 1
    compress: str | None = None
    label: str | None = None
    kind: str | None = None  # "safety" for backups taken by a rollback

    def check(self) -> None:
        if self.backup_type not in BACKUP_TYPES:
            raise UsageError(f"unknown backup type {self.backup_type!r}: use full, schema or data")
        if self.fmt not in BACKUP_FORMATS:
            raise UsageError(f"unknown format {self.fmt!r}: use custom, plain or directory")
        if self.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if self.jobs > 1 and self.fmt != "directory":
            raise UsageError(
                "--jobs > 1 needs --format directory (pg_dump dumps in parallel only then)"
            )
        if self.compress is not None:
            method, colon, level = self.compress.partition(":")
            if method.isdigit() and not colon:
                return
            if method not in COMPRESS_METHODS or (colon and not level.isdigit()):
                raise UsageError(
                    f"cannot read --compress {self.compress!r}: use METHOD[:LEVEL] with METHOD "
                    "gzip, lz4, zstd or none, or a level 0-9"
                )


def compress_args(spec: str | None, client_major: int) -> list[str]:
    if spec is None:
        return []
    method, _, level = spec.partition(":")
    if method.isdigit():
        return [f"--compress={method}"]
    if client_major >= 16:
        return [f"--compress={spec}"]
    if method == "gzip":
        return [f"--compress={level or '6'}"]
    if method == "none":
        return ["--compress=0"]
    raise UsageError(f"pg_dump {client_major} supports only gzip compression; got {spec!r}")


def pg_dump_argv(
    tools: ClientTools, request: BackupRequest, snapshot: str | None, output: Path | None
) -> list[str]:
    argv = [tools.pg_dump, "--no-password", f"--format={request.fmt}"]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    if request.backup_type == "schema":
        argv.append("--schema-only")
    elif request.backup_type == "data":
        argv.append("--data-only")
    argv += compress_args(request.compress, tools.major)
    if request.fmt == "directory":
        assert output is not None
        argv += [f"--jobs={request.jobs}", f"--file={output}"]
    return argv


class RowCounter(threading.Thread):
    """Counts rows in the exported snapshot while pg_dump streams."""

    def __init__(self, conn: PgConnection) -> None:
        super().__init__(name="row-counter", daemon=True)
        self.conn = conn
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.counts = table_row_counts(self.conn)
        except BaseException as exc:
            self.error = exc


def _stream_dump(
    process: subprocess.Popen[bytes],
    destination: Path,
    progress: ProgressCallback | None,
) -> tuple[str, int, str | None]:
    """Copy pg_dump's stdout to ``destination`` while hashing it.

    Returns the sha256, the size and the archive format version from the header.
    """
    digest = hashlib.sha256()
    size = 0
    header = b""
    started = time.monotonic()
    last_report = started
    assert process.stdout is not None
    fd = os.open(destination, os.O_WRONLY | os.O_TRUNC)  # reserved by _reserve_name
    with os.fdopen(fd, "wb") as out:
        read = process.stdout.read
        while chunk := read(CHUNK_SIZE):
            if len(header) < 8:
                header += chunk[:8]
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
            if progress is not None and time.monotonic() - last_report >= 0.5:
                last_report = time.monotonic()
                progress(size, last_report - started)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size, archive_version_from_header(header)


def archive_version_from_header(header: bytes) -> str | None:
    """``PGDMP`` + major, minor, revision bytes: the custom/directory archive format version."""
    if len(header) >= 8 and header.startswith(b"PGDMP"):
        return f"{header[5]}.{header[6]}.{header[7]}"
    return None


def run_pg_dump(
    tools: ClientTools,
    request: BackupRequest,
    snapshot: str | None,
    conninfo: ConnInfo,
    temp_path: Path,
    counter: RowCounter | None,
    progress: ProgressCallback | None,
) -> tuple[str, int, str | None]:
    directory = request.fmt == "directory"
    argv = pg_dump_argv(tools, request, snapshot, temp_path if directory else None)
    with child_environment(conninfo) as env, tempfile.TemporaryFile() as stderr_file:
        # umask 077: the files pg_dump creates itself (directory format) are private too.
        process = subprocess.Popen(
            argv,
            stdout=None if directory else subprocess.PIPE,
            stderr=stderr_file,
            env=env,
            umask=0o077,
        )
        if counter is not None:
            counter.start()
        try:
            if directory:
                process.wait()
                sha256 = size = None
                archive_version = None
            else:
                sha256, size, archive_version = _stream_dump(process, temp_path, progress)
                process.wait()
        except OSError as exc:
            process.kill()
            process.wait()
            if exc.errno == errno.ENOSPC:
                raise OperationFailed(
                    f"disk full while writing the backup to {temp_path.parent}; "
                    "partial file removed"
                ) from None
            raise OperationFailed(f"cannot write the backup: {exc.strerror}") from None
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            if counter is not None:
                counter.join()
        if process.returncode != 0:
            reason = error_tail(stderr_file)
            if "invalid compression specification" in reason:
                raise UsageError(f"--compress {request.compress}: {reason}")
            raise OperationFailed(f"pg_dump failed (exit {process.returncode}): {reason}")
        if counter is not None and counter.error is not None:
            raise OperationFailed(f"counting rows failed: {first_line(counter.error)}")
    if directory:
        temp_path.chmod(0o700)
        with (temp_path / "toc.dat").open("rb") as toc:
            archive_version = archive_version_from_header(toc.read(8))
        return sha256_tree(temp_path), tree_size(temp_path), archive_version
    assert sha256 is not None and size is not None
    return sha256, size, archive_version
