"""``backup create``: a snapshot-consistent pg_dump, hashed while it streams, with a manifest.

The dump is written under a temporary name and renamed when complete; the manifest is
written last, atomically. Row counts come from the same snapshot as the dump
(``pg_export_snapshot()`` + ``pg_dump --snapshot``) and are counted while pg_dump runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from rollback_cli import __version__, pg
from rollback_cli.errors import ConfigError, OperationFailed, UsageError
from rollback_cli.log import get_logger, step
from rollback_cli.manifest import (
    BACKUP_FORMATS,
    BACKUP_TYPES,
    FORMAT_EXTENSIONS,
    Manifest,
    manifest_key,
)
from rollback_cli.storage import Storage, open_storage
from rollback_cli.storage.base import CHUNK_SIZE, sha256_tree, tree_size
from rollback_cli.storage.local import TEMP_PREFIX, LocalStorage, ensure_private_dir

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo, Settings

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


@dataclass(frozen=True)
class BackupResult:
    key: str
    uri: str
    local_path: Path | None
    manifest: Manifest
    location: str


def backup_name(
    environment: str, backup_type: str, fmt: str, when: datetime, kind: str | None
) -> str:
    stamp = when.strftime("%Y%m%d_%H%M%S")
    suffix = "" if backup_type == "full" else f"_{backup_type}"
    if kind:
        suffix += f"_{kind}"
    return f"backup_{environment}_{stamp}{suffix}{FORMAT_EXTENSIONS[fmt]}"


def _reserve_name(
    name: str, staging: Path, storage: Storage, *, directory: bool
) -> tuple[str, Path]:
    """A name no backup, manifest or running dump uses, and its temp path, created here
    (O_EXCL / mkdir) so that two runs in the same second cannot pick the same one."""
    stem, dot, ext = name.rpartition(".")
    candidate, counter = name, 1
    while True:
        taken = (
            any((staging / claimed).exists() for claimed in _claimed_names(candidate))
            or storage.stat(candidate) is not None
            or storage.stat(manifest_key(candidate)) is not None
        )
        if not taken:
            temp_path = staging / f"{TEMP_PREFIX}{candidate}"
            try:
                if directory:
                    temp_path.mkdir(mode=0o700)
                else:
                    os.close(os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            else:
                return candidate, temp_path
        candidate = f"{stem}_{counter}{dot}{ext}"
        counter += 1


def _claimed_names(name: str) -> tuple[str, ...]:
    """The names a backup called ``name`` occupies in the staging directory."""
    return (name, f"{TEMP_PREFIX}{name}", manifest_key(name))


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
    tools: pg.ClientTools, request: BackupRequest, snapshot: str | None, output: Path | None
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


class _RowCounter(threading.Thread):
    """Counts rows in the exported snapshot while pg_dump streams."""

    def __init__(self, conn: PgConnection) -> None:
        super().__init__(name="row-counter", daemon=True)
        self.conn = conn
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.counts = pg.table_row_counts(self.conn)
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


def create_backup(
    settings: Settings,
    request: BackupRequest,
    *,
    conninfo: ConnInfo | None = None,
    storage: Storage | None = None,
    progress: ProgressCallback | None = None,
) -> BackupResult:
    """Dump the database named by ``settings`` and store it with its manifest."""
    request.check()
    conninfo = conninfo or settings.conninfo()
    own_storage = storage is None
    storage = storage or open_storage(settings)
    try:
        return _create(settings, request, conninfo, storage, progress)
    finally:
        if own_storage:
            storage.close()


def _create(
    settings: Settings,
    request: BackupRequest,
    conninfo: ConnInfo,
    storage: Storage,
    progress: ProgressCallback | None,
) -> BackupResult:
    log = get_logger()
    with step("connect"):
        snap_conn = pg.connect(conninfo, autocommit=False)
    try:
        major = pg.server_major(snap_conn)
        server_version = pg.server_version_text(snap_conn)
        tools = pg.find_client(major, settings.pg_bin_dir)
        log.info(
            "client selected",
            pg_dump=tools.pg_dump,
            client_version=tools.version,
            server_version=server_version,
        )
        request_compress = compress_args(request.compress, tools.major)  # validate early
        del request_compress

        # Remote backends upload from the local backup directory, which doubles as staging.
        staging = storage.root if isinstance(storage, LocalStorage) else settings.backup_dir
        ensure_private_dir(staging)
        created = datetime.now(timezone.utc)
        base_name = backup_name(
            settings.environment, request.backup_type, request.fmt, created, request.kind
        )

        snap_conn.rollback()
        snap_conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with snap_conn.cursor() as cur:
            cur.execute("SELECT pg_export_snapshot()")
            row = cur.fetchone()
            snapshot = str(row[0]) if row else None
        revisions = pg.alembic_revisions(snap_conn)

        name, temp_path = _reserve_name(
            base_name, staging, storage, directory=request.fmt == "directory"
        )
        final_path = staging / name
        started = time.monotonic()
        with step("dump", backup=name, type=request.backup_type, format=request.fmt) as details:
            counter = _RowCounter(snap_conn) if request.backup_type != "schema" else None
            try:
                sha256, size, archive_version = _run_pg_dump(
                    tools, request, snapshot, conninfo, temp_path, counter, progress
                )
            except BaseException:
                _remove(temp_path)
                raise
            row_counts = counter.counts if counter else {}
            details.update(size=size, sha256=sha256, tables=len(row_counts))
        snap_conn.rollback()
        temp_path.rename(final_path)
        manifest = Manifest(
            file_name=name,
            size=size,
            sha256=sha256,
            created_at=created.isoformat(),
            environment=settings.environment,
            database=conninfo.dbname,
            host=conninfo.display_host,
            server_version=server_version,
            pg_dump_version=tools.version,
            type=request.backup_type,
            format=request.fmt,
            compression=request.compress,
            alembic_revisions=revisions,
            row_counts=row_counts,
            tool_version=__version__,
            label=request.label,
            git_commit=os.environ.get("GITHUB_SHA") or None,
            archive_version=archive_version,
            snapshot=snapshot,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        with step("store", backup=name, storage=storage.uri()):
            try:
                storage.upload(final_path, name, sha256=sha256 if final_path.is_file() else None)
                storage.write_text(manifest_key(name), manifest.to_json())
            except BaseException as exc:
                if storage.local_path(name) != final_path.resolve():
                    with contextlib.suppress(Exception):  # the server may be gone
                        storage.delete(name)
                _remove(final_path)
                if isinstance(exc, OSError):
                    # The manifest is written atomically: when writing it failed, there is none.
                    reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                    raise OperationFailed(
                        f"cannot store the backup {name}: {reason}; partial files removed"
                    ) from None
                raise
        if storage.local_path(name) == final_path.resolve():
            _fsync_dir(staging)  # the renames of the dump and its manifest survive a crash
        local_path: Path | None = final_path
        if storage.local_path(name) is None:
            if settings.keep_local:
                (staging / manifest_key(name)).write_text(manifest.to_json(), encoding="utf-8")
                (staging / manifest_key(name)).chmod(0o600)
            else:
                _remove(final_path)
                local_path = None
        log.info(
            "backup created",
            backup=name,
            uri=storage.uri(name),
            size=size,
            sha256=sha256,
            alembic_revisions=revisions,
        )
        return BackupResult(name, storage.uri(name), local_path, manifest, storage.location)
    finally:
        snap_conn.close()


def _run_pg_dump(
    tools: pg.ClientTools,
    request: BackupRequest,
    snapshot: str | None,
    conninfo: ConnInfo,
    temp_path: Path,
    counter: _RowCounter | None,
    progress: ProgressCallback | None,
) -> tuple[str, int, str | None]:
    directory = request.fmt == "directory"
    argv = pg_dump_argv(tools, request, snapshot, temp_path if directory else None)
    with pg.child_environment(conninfo) as env, tempfile.TemporaryFile() as stderr_file:
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
            reason = pg.error_tail(stderr_file)
            if "invalid compression specification" in reason:
                raise UsageError(f"--compress {request.compress}: {reason}")
            raise OperationFailed(f"pg_dump failed (exit {process.returncode}): {reason}")
        if counter is not None and counter.error is not None:
            raise OperationFailed(f"counting rows failed: {pg.first_line(counter.error)}")
    if directory:
        temp_path.chmod(0o700)
        with (temp_path / "toc.dat").open("rb") as toc:
            archive_version = archive_version_from_header(toc.read(8))
        return sha256_tree(temp_path), tree_size(temp_path), archive_version
    assert sha256 is not None and size is not None
    return sha256, size, archive_version


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync directories; the data itself is synced
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def plan_backup(settings: Settings, request: BackupRequest) -> list[dict[str, str]]:
    """The read-only checks of ``create_backup`` and what it would write."""
    request.check()
    conninfo = settings.conninfo()
    storage = open_storage(settings)
    try:
        conn = pg.connect(conninfo)
        try:
            major = pg.server_major(conn)
            tools = pg.find_client(major, settings.pg_bin_dir)
            compress_args(request.compress, tools.major)
            revisions = pg.alembic_revisions(conn)
        finally:
            conn.close()
        staging = storage.root if isinstance(storage, LocalStorage) else settings.backup_dir
        _check_writable(staging)
        name = backup_name(
            settings.environment,
            request.backup_type,
            request.fmt,
            datetime.now(timezone.utc),
            request.kind,
        )
        argv = pg_dump_argv(tools, request, "<snapshot>", staging / name)
        return [
            {"step": "connect", "detail": f"{conninfo.redacted_url()} (PostgreSQL {major})"},
            {"step": "snapshot", "detail": "export a REPEATABLE READ snapshot; count rows in it"},
            {"step": "dump", "detail": " ".join(argv)},
            {
                "step": "store",
                "detail": f"{storage.uri(name)} then its manifest "
                f"(revision {','.join(revisions) or 'none'})",
            },
        ]
    finally:
        storage.close()


def _check_writable(directory: Path) -> None:
    """What ``ensure_private_dir`` would find, without creating anything (for dry runs)."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create directory {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"directory {existing} is not writable by this user")
