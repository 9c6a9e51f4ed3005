"""Running pg_dump: its command line, the stream hashed while it is written, row counts
counted in the same snapshot meanwhile.

No wait here is unbounded: pg_dump gets ``--lock-wait-timeout`` and the snapshot connection
``lock_timeout`` (both ``BackupRequest.lock_timeout_ms``); on an interrupt pg_dump is stopped
and the row count running on the snapshot connection is cancelled, its thread joined with a
timeout.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rollback_cli.backups.manifest import BACKUP_FORMATS, BACKUP_TYPES
from rollback_cli.errors import OperationFailed, UsageError
from rollback_cli.log import get_logger, redactor
from rollback_cli.postgres.catalog import free_connection_slots, table_row_counts, user_tables
from rollback_cli.postgres.clients import (
    ClientTools,
    child_environment,
    error_tail,
    offline_environment,
)
from rollback_cli.postgres.connection import first_line
from rollback_cli.storage.base import CHUNK_SIZE, sha256_tree, tree_size

if TYPE_CHECKING:
    from psycopg2.extensions import connection as PgConnection

    from rollback_cli.settings import ConnInfo

ProgressCallback = Callable[[int, float], None]
COMPRESS_METHODS = ("gzip", "lz4", "zstd", "none")
#: the default --compress: the best method the selected pg_dump supports (resolve_compress)
AUTO_COMPRESS = "auto"
DEFAULT_LOCK_TIMEOUT_MS = 5000
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of lock_timeout (and NOWAIT) failures
# After an interrupt or a failed pg_dump: how long pg_dump gets to cancel its own query
# (SIGTERM) before it is killed, how long a row count still running gets to end by itself,
# and how long cancelling it may take. Together well under the 5 s an interrupt may take.
TERMINATE_GRACE_SECONDS = 1.0
COUNTER_GRACE_SECONDS = 0.5
COUNTER_STOP_SECONDS = 2.0
# A compression probe is a pg_dump that fails at once (before connecting): generous bound.
PROBE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class BackupRequest:
    backup_type: str = "full"
    fmt: str = "custom"
    #: pg_dump --jobs (directory format); None: auto (:func:`auto_jobs`) for directory, 1
    #: for the single-file formats
    jobs: int | None = None
    compress: str | None = None
    label: str | None = None
    kind: str | None = None  # "safety" for backups taken by a rollback
    # How long pg_dump and the row counts wait for each table lock; 0 waits forever.
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    #: dump this database of the target's server instead of the target's own, recorded as
    #: a backup of the target (the database a swap kept holds the target's previous state)
    source_database: str | None = None
    #: dump the planner statistics too (``--statistics``: pg_dump 18+, a server 18+, full
    #: backups), so a restored copy plans queries well from its first one, no ANALYZE
    statistics: bool = False

    def check(self) -> None:
        if self.lock_timeout_ms < 0:
            raise UsageError("--lock-timeout must not be negative (0 waits forever)")
        if self.backup_type not in BACKUP_TYPES:
            raise UsageError(f"unknown backup type {self.backup_type!r}: use full, schema or data")
        if self.fmt not in BACKUP_FORMATS:
            raise UsageError(f"unknown format {self.fmt!r}: use custom, plain or directory")
        if self.jobs is not None and self.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if self.jobs is not None and self.jobs > 1 and self.fmt != "directory":
            raise UsageError(
                "--jobs > 1 needs --format directory (pg_dump dumps in parallel only then)"
            )
        if self.compress is None or self.compress == AUTO_COMPRESS:
            return
        method, colon, level = self.compress.partition(":")
        if not (method.isdigit() and not colon) and (
            method not in COMPRESS_METHODS or (colon and not level.isdigit())
        ):
            raise UsageError(
                f"cannot read --compress {self.compress!r}: use auto, or METHOD[:LEVEL] with "
                "METHOD gzip, lz4, zstd or none, or a level 0-9"
            )
        if self.fmt == "plain" and compresses(self.compress):
            # verify and restore read a plain backup as SQL text; refused before anything
            # is written rather than stored as a backup nothing could use.
            raise UsageError(
                f"--format plain is written uncompressed: --compress {self.compress} needs "
                "--format custom or directory (or leave --compress out)"
            )


def compresses(spec: str | None) -> bool:
    """Whether ``spec`` (not ``auto``) asks for compressed output: not none, not level 0."""
    if spec is None:
        return False
    method, _, level = spec.partition(":")
    if method.isdigit():
        return int(method) != 0
    return method != "none" and not (method == "gzip" and level.isdigit() and int(level) == 0)


_ACCEPTED: dict[tuple[str, str], bool] = {}


def supported_compression(tools: ClientTools) -> tuple[str, ...]:
    """The --compress methods ``tools``' pg_dump accepts: gzip (levels) and none before 16;
    from 16 on, lz4 and zstd as well when it was built with them."""
    return tuple(m for m in COMPRESS_METHODS if accepts_compression(tools, m))


def accepts_compression(tools: ClientTools, method: str) -> bool:
    """Whether ``tools``' pg_dump accepts ``--compress METHOD`` (probed once per binary)."""
    if method in ("gzip", "none"):
        return True
    if tools.major < 16:
        return False
    key = (tools.pg_dump, method)
    if key not in _ACCEPTED:
        _ACCEPTED[key] = _probe(tools, method)
    return _ACCEPTED[key]


def _probe(tools: ClientTools, method: str) -> bool:
    """pg_dump checks a compression specification before it connects: no server needed.
    A pg_dump that does not answer within a few seconds is taken not to support it."""
    argv = [
        tools.pg_dump,
        "--no-password",
        "--format=custom",
        f"--compress={method}",
        f"--file={os.devnull}",
        "--host=/nonexistent/db-rollback-compression-probe",
        "--dbname=probe",
    ]
    try:
        done = subprocess.run(
            argv,
            env=offline_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    # Accepted: it went on to connect (and failed); refused: a compression error.
    return "compress" not in done.stderr


def resolve_compress(request: BackupRequest, tools: ClientTools) -> str | None:
    """The --compress pg_dump gets (None: pg_dump's own default), recorded in the manifest.

    ``auto`` (also when none is given): uncompressed for plain; else zstd, then lz4, when
    this pg_dump supports them (16+, built with them); else gzip, at level 1 for a
    rollback's safety backup (speed over size) and pg_dump's default level otherwise. An
    explicit method is passed on as given: one this pg_dump lacks makes it fail before it
    writes anything, and that is a usage error naming what it supports."""
    spec = request.compress
    safety = request.kind == "safety"
    if spec is None or spec == AUTO_COMPRESS:
        if request.fmt == "plain":
            return None
        if accepts_compression(tools, "zstd"):
            return "zstd:1" if safety else "zstd"
        if accepts_compression(tools, "lz4"):
            return "lz4"
        return "gzip:1" if safety else None
    return spec


def compress_args(spec: str | None, client_major: int) -> list[str]:
    if spec is None:
        return []
    method, _, level = spec.partition(":")
    if method.isdigit():
        return [f"--compress={method}"]
    if method == AUTO_COMPRESS:
        raise ValueError("resolve_compress() first")
    if client_major >= 16:
        return [f"--compress={spec}"]
    if method == "gzip":
        return [f"--compress={level or '6'}"]
    if method == "none":
        return ["--compress=0"]
    raise UsageError(
        f"--compress {spec}: pg_dump {client_major} supports gzip, none; use one of those or auto"
    )


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
    if request.statistics:
        argv.append("--statistics")
    if request.lock_timeout_ms:
        argv.append(f"--lock-wait-timeout={request.lock_timeout_ms}ms")
    if request.fmt == "directory":
        assert output is not None
        argv += [f"--jobs={request.jobs or 1}", f"--file={output}"]
    return argv


def format_ms(ms: int) -> str:
    """``5000`` → ``5s``, ``120000`` → ``2min``, ``1500`` → ``1500ms``."""
    if ms >= 60_000 and ms % 60_000 == 0:
        return f"{ms // 60_000}min"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def lock_timeout_failed(
    who: str, table: str | None, timeout_ms: int, candidates: list[str] | None = None
) -> OperationFailed:
    """The one-line error of a lock wait that reached ``timeout_ms``: the table when known,
    else the few it was one of."""
    if table:
        what = f"table {table}"
    elif candidates and len(candidates) <= 3:
        what = f"one of the tables {', '.join(candidates)}"
    elif candidates:
        what = f"one of {len(candidates)} tables"
    else:
        what = "a table"
    return OperationFailed(
        f"{who} could not lock {what} within {format_ms(timeout_ms)}: another session holds "
        "it; retry or raise --lock-timeout"
    )


def is_lock_timeout(exc: BaseException | None) -> bool:
    """A PostgreSQL error raised because a lock was not granted in time (psycopg2 not
    imported: its errors carry the SQLSTATE as ``pgcode``)."""
    return exc is not None and getattr(exc, "pgcode", None) == LOCK_NOT_AVAILABLE


_COUNTED_TABLE = re.compile(r'\bFROM\s+"((?:[^"]|"")*)"\."((?:[^"]|"")*)"')


def locked_table(exc: BaseException) -> str | None:
    """``schema.table`` of the query that ``exc`` ended, when its text names one table."""
    query = getattr(getattr(exc, "cursor", None), "query", None)
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    match = _COUNTED_TABLE.search(query) if isinstance(query, str) else None
    if match is None:
        return None
    schema, name = (part.replace('""', '"') for part in match.groups())
    return f"{schema}.{name}"


def machine_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: the most parallel jobs ``auto`` picks: one restore or dump rarely gains beyond this,
#: and each job is a server connection
MAX_AUTO_JOBS = 8


def auto_jobs(tables: int, cores: int | None = None) -> int:
    """Parallel pg_dump/pg_restore jobs for ``tables`` tables (those holding rows, for a
    restore): one per core of this machine, no more than the tables, at most
    :data:`MAX_AUTO_JOBS`; the caller bounds it by the server's free connection slots."""
    if cores is None:
        cores = machine_cores()
    return max(1, min(cores, tables, MAX_AUTO_JOBS))


def bounded_jobs(conn: PgConnection, jobs: int, tool: str) -> int:
    """``jobs``, but never more connections than the server has free (half of them: the
    rest stays for the application and for us): --jobs 500 must not lock everyone out."""
    if jobs <= 1:
        return jobs
    bound = max(1, free_connection_slots(conn) // 2)
    if jobs > bound:
        get_logger().warning(f"parallel {tool} jobs capped", asked=jobs, jobs=bound)
        return bound
    return jobs


#: the first pg_dump and server that dump and restore planner statistics
STATISTICS_MAJOR = 18


def dumps_statistics(request: BackupRequest, tools: ClientTools, server_major: int) -> bool:
    """Whether a backup carries the planner statistics: full backups when pg_dump and the
    server are both 18+ (older servers could not restore them)."""
    return (
        request.backup_type == "full"
        and tools.major >= STATISTICS_MAJOR
        and server_major >= STATISTICS_MAJOR
    )


def dump_jobs(conn: PgConnection, request: BackupRequest) -> int:
    """pg_dump's --jobs for ``request``: 1 for the single-file formats; for a directory
    dump the jobs asked for, or :func:`auto_jobs` for its tables; within free slots."""
    if request.fmt != "directory":
        return 1
    jobs = request.jobs if request.jobs is not None else auto_jobs(len(user_tables(conn)))
    return bounded_jobs(conn, jobs, "dump")


def counting_workers(cores: int) -> int:
    """Parallel workers a row count may use beside a running pg_dump on a server of this
    machine: the cores left once pg_dump and its server session have one each."""
    return max(0, cores - 2)


class RowCounter(threading.Thread):
    """Counts rows in the exported snapshot while pg_dump streams.

    A daemon thread using the snapshot connection: it must never keep the process alive.
    ``stop()`` cancels its query (``conn.cancel()`` is safe from another thread) and joins it
    with a timeout; the connection must not be closed while the thread still runs (psycopg2
    would wait for the query to end).
    """

    def __init__(self, conn: PgConnection, *, same_machine: bool = False) -> None:
        super().__init__(name="row-counter", daemon=True)
        self.conn = conn
        #: the server shares this machine's cores with pg_dump: the count takes only
        #: the parallel workers that leaves (a remote server's own settings decide else)
        self.workers = counting_workers(machine_cores()) if same_machine else None
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                # No JIT: its compilation is pure overhead for a count. On a server of this
                # machine pg_dump's session and its compression take two cores; parallel
                # workers only from cores beyond those (measured at 755 MB on 2 cores: a
                # parallel count lengthened the dump by 0.12 s, a serial one by 0.08 s).
                cur.execute("SELECT set_config('jit', 'off', true)")
                if self.workers is not None:
                    cur.execute(
                        "SELECT set_config('max_parallel_workers_per_gather', %s, true)",
                        (str(self.workers),),
                    )
            self.counts = table_row_counts(self.conn)
        except BaseException as exc:
            self.error = exc

    def stop(self, timeout: float = COUNTER_STOP_SECONDS) -> None:
        """Cancel the running count and wait at most ``timeout`` seconds for the thread.

        Cancelled again until the thread ends: a cancel that arrives between two counts
        cancels nothing, and the next count would wait for its lock.
        """
        deadline = time.monotonic() + timeout
        while self.is_alive():
            with contextlib.suppress(Exception):  # the server may be gone
                self.conn.cancel()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.join(min(0.2, remaining))

    def wait(self) -> None:
        """Join the thread; an interrupt while waiting cancels the count first."""
        try:
            self.join()
        except BaseException:
            self.stop()
            raise


class DumpCancel:
    """Lets another thread stop a dump that runs in a thread of its own: ``cancel()``
    ends its pg_dump (SIGTERM, then SIGKILL) and its row count; the dump then fails in its
    own thread, removing what it wrote."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._counter: RowCounter | None = None
        self.cancelled = False

    def attach(self, process: subprocess.Popen[bytes], counter: RowCounter | None) -> None:
        with self._lock:
            self._process, self._counter = process, counter
            cancelled = self.cancelled
        if cancelled:  # cancelled before pg_dump started
            _stop_dump(process, counter)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            process, counter = self._process, self._counter
        if process is not None:
            _stop_dump(process, counter)


def _stream_dump(
    process: subprocess.Popen[bytes],
    destination: Path,
    progress: ProgressCallback | None,
    tee: Callable[[bytes], None] | None = None,
) -> tuple[str, int, str | None]:
    """Copy pg_dump's stdout to ``destination`` (and ``tee``) while hashing it.

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
            if tee is not None:
                tee(chunk)
            size += len(chunk)
            if progress is not None and time.monotonic() - last_report >= 0.5:
                last_report = time.monotonic()
                progress(size, last_report - started)
        if progress is not None and size:
            progress(size, time.monotonic() - started)  # the final size, however fast
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size, archive_version_from_header(header)


def archive_version_from_header(header: bytes) -> str | None:
    """``PGDMP`` + major, minor, revision bytes: the custom/directory archive format version."""
    if len(header) >= 8 and header.startswith(b"PGDMP"):
        return f"{header[5]}.{header[6]}.{header[7]}"
    return None


def _stop_dump(process: subprocess.Popen[bytes], counter: RowCounter | None) -> None:
    """End pg_dump, then the row count running beside it, whatever the first does."""
    try:
        _end_process(process)
    finally:
        if counter is not None:
            counter.stop()


def _end_process(process: subprocess.Popen[bytes]) -> None:
    """Stop pg_dump: SIGTERM first (it cancels its own query on the server, so no lock
    request of it stays queued there), SIGKILL when it has not ended within the grace."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(TERMINATE_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_LOCK_STATEMENT = re.compile(r"query was: LOCK TABLE (?P<tables>.+?) IN ACCESS SHARE MODE", re.I)
_QUALIFIED_NAME = re.compile(r'(?:"(?:[^"]|"")*"|[^\s,."]+)\.(?:"(?:[^"]|"")*"|[^\s,."]+)')


def pg_dump_lock_tables(stderr: str) -> list[str] | None:
    """The tables of the ``LOCK TABLE`` pg_dump gave up on after ``--lock-wait-timeout``
    (None when pg_dump failed for another reason). pg_dump 18 locks many in one statement."""
    if "timeout" not in stderr:
        return None
    match = _LOCK_STATEMENT.search(stderr)
    if match is None:
        return None
    return _QUALIFIED_NAME.findall(match.group("tables"))


def _stderr_text(stderr_file: IO[bytes]) -> str:
    stderr_file.seek(0)
    return redactor.scrub(stderr_file.read().decode("utf-8", "replace"))


def _pg_dump_failed(
    tools: ClientTools,
    request: BackupRequest,
    returncode: int,
    stderr_file: IO[bytes],
    counter: RowCounter | None,
) -> OperationFailed | UsageError:
    reason = error_tail(stderr_file)
    if "invalid compression specification" in reason:
        return UsageError(
            f"--compress {request.compress}: pg_dump {tools.version} ({tools.bin_dir}) "
            f"supports {', '.join(supported_compression(tools))}; use one of those or auto "
            f"({reason})"
        )
    tables = pg_dump_lock_tables(_stderr_text(stderr_file)) if request.lock_timeout_ms else None
    if tables is not None:
        if len(tables) == 1:
            busy: str | None = tables[0]
        elif counter is not None and is_lock_timeout(counter.error):
            # pg_dump locked several tables in one statement; the row count waited on the
            # same lock at the same time and knows which one.
            assert counter.error is not None
            busy = locked_table(counter.error)
        else:
            busy = None
        return lock_timeout_failed("pg_dump", busy, request.lock_timeout_ms, tables)
    return OperationFailed(f"pg_dump failed (exit {returncode}): {reason}")


def run_pg_dump(
    tools: ClientTools,
    request: BackupRequest,
    snapshot: str | None,
    conninfo: ConnInfo,
    temp_path: Path,
    counter: RowCounter | None,
    progress: ProgressCallback | None,
    tee: Callable[[bytes], None] | None = None,
    cancel: DumpCancel | None = None,
) -> tuple[str, int, str | None]:
    """pg_dump into ``temp_path`` (hashed while it streams); ``tee`` gets every chunk too
    (a streaming upload) for the single-file formats. ``cancel`` stops it from another
    thread."""
    directory = request.fmt == "directory"
    argv = pg_dump_argv(tools, request, snapshot, temp_path if directory else None)
    with child_environment(conninfo) as env, tempfile.TemporaryFile() as stderr_file:
        # umask 077: the files pg_dump creates itself (directory format) are private too.
        process = subprocess.Popen(
            argv,
            stdout=None if directory else subprocess.PIPE,
            stderr=stderr_file,
            env=env,
            pass_fds=env.pass_fds,
            umask=0o077,
        )
        if counter is not None:
            counter.start()
        if cancel is not None:
            cancel.attach(process, counter)
        try:
            if directory:
                process.wait()
                sha256 = size = None
                archive_version = None
            else:
                sha256, size, archive_version = _stream_dump(process, temp_path, progress, tee)
                process.wait()
        except BaseException as exc:
            # An interrupt (SIGINT, or SIGTERM via the runner) or a write error: nothing
            # here may wait without bound, or the process outlives the signal.
            _stop_dump(process, counter)
            if isinstance(exc, OSError):
                if exc.errno == errno.ENOSPC:
                    raise OperationFailed(
                        f"disk full while writing the backup to {temp_path.parent}; "
                        "partial file removed"
                    ) from None
                raise OperationFailed(f"cannot write the backup: {exc.strerror}") from None
            raise
        if cancel is not None and cancel.cancelled:
            if counter is not None:
                counter.stop()
            raise OperationFailed("pg_dump stopped: the dump was cancelled")
        if process.returncode != 0:
            if counter is not None:
                counter.join(COUNTER_GRACE_SECONDS)  # its own lock timeout names the table
                counter.stop()
            raise _pg_dump_failed(tools, request, process.returncode, stderr_file, counter)
        if counter is not None:
            counter.wait()
            if is_lock_timeout(counter.error):
                assert counter.error is not None
                raise lock_timeout_failed(
                    "counting rows", locked_table(counter.error), request.lock_timeout_ms
                )
            if counter.error is not None:
                raise OperationFailed(f"counting rows failed: {first_line(counter.error)}")
    if directory:
        temp_path.chmod(0o700)
        with (temp_path / "toc.dat").open("rb") as toc:
            archive_version = archive_version_from_header(toc.read(8))
        return sha256_tree(temp_path), tree_size(temp_path), archive_version
    assert sha256 is not None and size is not None
    return sha256, size, archive_version
