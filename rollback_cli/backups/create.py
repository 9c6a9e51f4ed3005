"""``backup create``: a snapshot-consistent pg_dump, hashed while it streams, with a manifest.

The dump is written under a temporary name and renamed when complete; the manifest is
written last, atomically. Row counts come from the same snapshot as the dump
(``pg_export_snapshot()`` + ``pg_dump --snapshot``) and are counted while pg_dump runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from rollback_cli import __version__
from rollback_cli.backups.dump import (
    BackupRequest,
    DumpCancel,
    ProgressCallback,
    RowCounter,
    compress_args,
    dump_jobs,
    dumps_statistics,
    is_lock_timeout,
    lock_timeout_failed,
    pg_dump_argv,
    resolve_compress,
    run_pg_dump,
)
from rollback_cli.backups.manifest import FORMAT_EXTENSIONS, Manifest, manifest_key, sign
from rollback_cli.errors import ConfigError, OperationFailed
from rollback_cli.files import TEMP_PREFIX, ensure_private_dir, remove_path, writing_in
from rollback_cli.log import get_logger, progress_sink, redactor, step
from rollback_cli.postgres.catalog import alembic_revisions
from rollback_cli.postgres.clients import ClientTools, find_client
from rollback_cli.postgres.connection import (
    connect,
    export_snapshot,
    server_major,
    server_version_text,
    set_lock_timeout,
)
from rollback_cli.storage import Storage, staging_dir

if TYPE_CHECKING:
    from collections.abc import Callable

    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo, SigningKeys, Target
    from rollback_cli.storage.base import ArtifactStream

__all__ = [
    "BackupRequest",
    "BackupResult",
    "check_staging_writable",
    "create_backup",
    "plan_backup",
]


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


def create_backup(
    target: Target,
    storage: Storage,
    request: BackupRequest,
    *,
    keep_local: bool = False,
    progress: ProgressCallback | None = None,
    signing: SigningKeys | None = None,
    cancel: DumpCancel | None = None,
) -> BackupResult:
    """Dump ``target`` and store it in ``storage`` with its manifest (signed with the active
    key of ``signing`` when one is configured).

    Every table lock (pg_dump's and the row counts') is waited for at most
    ``request.lock_timeout_ms``; reaching it is an OperationFailed naming the table.
    """
    request.check()
    if progress is None:
        progress = _shown_progress("safety-backup" if request.kind == "safety" else "dump")
    staging = staging_dir(storage)
    ensure_private_dir(staging)
    # Cleanup removes this run's temp files at once if it dies, never while it runs.
    with writing_in(staging):
        return _create_backup(
            target,
            storage,
            request,
            keep_local=keep_local,
            progress=progress,
            signing=signing,
            cancel=cancel,
        )


def resolved_request(
    request: BackupRequest, conn: PgConnection, tools: ClientTools, server_major: int
) -> BackupRequest:
    """``request`` as this client and server run it: ``auto`` compression picked for the
    client (a method it lacks refused now, before anything is written), the jobs, and
    whether the planner statistics come along."""
    request = replace(
        request,
        compress=resolve_compress(request, tools),
        jobs=dump_jobs(conn, request),
        statistics=dumps_statistics(request, tools, server_major),
    )
    compress_args(request.compress, tools.major)
    return request


def _shown_progress(label: str) -> ProgressCallback | None:
    """The dump's size so far, to the progress sink when one is shown (a terminal)."""
    sink = progress_sink()
    if sink is None:
        return None
    return lambda size, _elapsed: sink(label, size, None, "bytes")


def _create_backup(
    target: Target,
    storage: Storage,
    request: BackupRequest,
    *,
    keep_local: bool,
    progress: ProgressCallback | None,
    signing: SigningKeys | None,
    cancel: DumpCancel | None = None,
) -> BackupResult:
    log = get_logger()
    # What is dumped: the target's database, or the one holding its previous state.
    source = (
        target.conninfo.with_dbname(request.source_database)
        if request.source_database
        else target.conninfo
    )
    with step("connect"):
        snap_conn = connect(source, autocommit=False)
    counter = (
        RowCounter(snap_conn, same_machine=source.same_machine)
        if request.backup_type != "schema"
        else None
    )
    try:
        server_version = server_version_text(snap_conn)
        major = server_major(snap_conn)
        tools = find_client(major, target.pg_bin_dir)
        log.info(
            "client selected",
            pg_dump=tools.pg_dump,
            client_version=tools.version,
            server_version=server_version,
        )
        request = resolved_request(request, snap_conn, tools, major)
        staging = staging_dir(storage)
        ensure_private_dir(staging)
        created = datetime.now(timezone.utc)
        snapshot = export_snapshot(snap_conn)
        # Inside the snapshot transaction: it lasts as long as the queries it bounds.
        set_lock_timeout(snap_conn, request.lock_timeout_ms)
        try:
            revisions = alembic_revisions(snap_conn)
        except Exception as exc:
            if is_lock_timeout(exc):
                raise lock_timeout_failed(
                    "reading the Alembic revision", "alembic_version", request.lock_timeout_ms
                ) from None
            raise
        name, temp_path = _reserve_name(
            backup_name(
                target.environment, request.backup_type, request.fmt, created, request.kind
            ),
            staging,
            storage,
            directory=request.fmt == "directory",
        )
        started = time.monotonic()
        # A remote storage takes a single-file dump while pg_dump writes it.
        stream = storage.stream(name) if request.fmt != "directory" else None
        try:
            dumped = _dump(
                tools,
                request,
                snapshot,
                source,
                counter,
                name,
                temp_path,
                progress,
                stream.write if stream is not None else None,
                cancel,
            )
        except BaseException:
            if stream is not None:
                stream.abort()
            raise
        snap_conn.rollback()
        final_path = staging / name
        temp_path.rename(final_path)
        manifest = _manifest(
            target,
            request,
            name,
            created,
            dumped,
            server_version=server_version,
            pg_dump_version=tools.version,
            revisions=revisions,
            snapshot=snapshot,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        if signing is not None and signing.active is not None:
            redactor.add_secret(signing.active)
            manifest = sign(manifest, signing.active)
        local_path = _store(storage, final_path, manifest, keep_local=keep_local, stream=stream)
        log.info(
            "backup created",
            backup=name,
            uri=storage.uri(name),
            size=dumped.size,
            sha256=dumped.sha256,
            alembic_revisions=revisions,
        )
        return BackupResult(name, storage.uri(name), local_path, manifest, storage.location)
    finally:
        if counter is not None and counter.is_alive():
            counter.stop()  # run_pg_dump already did; this is the last resort
        if counter is not None and counter.is_alive():
            # psycopg2 would wait for the running query before closing: leave the
            # connection to the process's exit rather than wait without bound.
            log.warning("row count still running; its connection is left open")
        else:
            snap_conn.close()


def _manifest(
    target: Target,
    request: BackupRequest,
    name: str,
    created: datetime,
    dumped: _Dumped,
    *,
    server_version: str,
    pg_dump_version: str,
    revisions: list[str],
    snapshot: str | None,
    duration_ms: int,
) -> Manifest:
    return Manifest(
        file_name=name,
        size=dumped.size,
        sha256=dumped.sha256,
        created_at=created.isoformat(),
        environment=target.environment,
        database=target.dbname,
        host=target.conninfo.display_host,
        server_version=server_version,
        pg_dump_version=pg_dump_version,
        type=request.backup_type,
        format=request.fmt,
        compression=request.compress,
        alembic_revisions=revisions,
        row_counts=dumped.row_counts,
        tool_version=__version__,
        label=request.label,
        git_commit=os.environ.get("GITHUB_SHA") or None,
        extra={"dumped_from": request.source_database} if request.source_database else {},
        archive_version=dumped.archive_version,
        snapshot=snapshot,
        duration_ms=duration_ms,
    )


@dataclass(frozen=True)
class _Dumped:
    sha256: str
    size: int
    archive_version: str | None
    row_counts: dict[str, int]


def _dump(
    tools: ClientTools,
    request: BackupRequest,
    snapshot: str | None,
    source: ConnInfo,
    counter: RowCounter | None,
    name: str,
    temp_path: Path,
    progress: ProgressCallback | None,
    tee: Callable[[bytes], None] | None = None,
    cancel: DumpCancel | None = None,
) -> _Dumped:
    """pg_dump into ``temp_path`` (and ``tee``) while ``counter`` counts the rows in the
    same snapshot."""
    with step(
        "dump", backup=name, type=request.backup_type, format=request.fmt, streamed=tee is not None
    ) as details:
        try:
            sha256, size, archive_version = run_pg_dump(
                tools, request, snapshot, source, temp_path, counter, progress, tee, cancel
            )
        except BaseException:
            remove_path(temp_path)
            raise
        row_counts = counter.counts if counter else {}
        details.update(size=size, sha256=sha256, tables=len(row_counts))
    return _Dumped(sha256, size, archive_version, row_counts)


def _store(
    storage: Storage,
    final_path: Path,
    manifest: Manifest,
    *,
    keep_local: bool,
    stream: ArtifactStream | None = None,
) -> Path | None:
    """Store the dump (finish its streamed upload), then its manifest; return the local
    copy that remains, if any."""
    name = manifest.file_name
    staging = final_path.parent
    with step("store", backup=name, storage=storage.uri(), streamed=stream is not None):
        try:
            if stream is not None:
                stream.finish()
            else:
                storage.upload(
                    final_path, name, sha256=manifest.sha256 if final_path.is_file() else None
                )
            storage.write_text(manifest_key(name), manifest.to_json())
        except BaseException as exc:
            if stream is not None:
                stream.abort()
            if storage.local_path(name) != final_path.resolve():
                with contextlib.suppress(Exception):  # the server may be gone
                    storage.delete(name)
            remove_path(final_path)
            if isinstance(exc, OSError):
                # The manifest is written atomically: when writing it failed, there is none.
                reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                raise OperationFailed(
                    f"cannot store the backup {name}: {reason}; partial files removed"
                ) from None
            raise
    if storage.local_path(name) == final_path.resolve():
        _fsync_dir(staging)  # the renames of the dump and its manifest survive a crash
        return final_path
    if storage.local_path(name) is None and keep_local:
        (staging / manifest_key(name)).write_text(manifest.to_json(), encoding="utf-8")
        (staging / manifest_key(name)).chmod(0o600)
        return final_path
    remove_path(final_path)
    return None


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


def plan_backup(target: Target, storage: Storage, request: BackupRequest) -> list[dict[str, str]]:
    """The read-only checks of ``create_backup`` and what it would write."""
    request.check()
    conninfo = target.conninfo
    conn = connect(conninfo)
    try:
        major = server_major(conn)
        tools = find_client(major, target.pg_bin_dir)
        request = resolved_request(request, conn, tools, major)
        revisions = alembic_revisions(conn)
    finally:
        conn.close()
    staging = staging_dir(storage)
    _check_writable(staging)
    name = backup_name(
        target.environment,
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


def check_staging_writable(directory: Path) -> None:
    """ConfigError (exit 3) when a backup could not even be staged in ``directory``:
    checked before a change whose safety backup comes after it."""
    _check_writable(directory)


def _check_writable(directory: Path) -> None:
    """What ``ensure_private_dir`` would find, without creating anything (for dry runs)."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create directory {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"directory {existing} is not writable by this user")
