"""pg_dump, pg_restore and psql: matched to the server, run with private environments.

Passwords reach the client tools through a temporary 0600 passfile named in the child's
environment (``PGPASSFILE``); connection details go through ``PG*`` variables, so a
child's argv never holds a URL or a password.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rollback_cli.errors import ConfigError, Refused
from rollback_cli.log import redactor
from rollback_cli.postgres.connection import run_application_name

if TYPE_CHECKING:
    from rollback_cli.settings import ConnInfo

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_VERSION = re.compile(r"\(PostgreSQL\)\s+((\d+)(?:\.\d+)?\S*)")


@dataclass(frozen=True)
class ClientTools:
    """pg_dump, pg_restore and psql from one installation."""

    bin_dir: Path
    major: int
    version: str

    @property
    def pg_dump(self) -> str:
        return str(self.bin_dir / "pg_dump")

    @property
    def pg_restore(self) -> str:
        return str(self.bin_dir / "pg_restore")

    @property
    def psql(self) -> str:
        return str(self.bin_dir / "psql")


def newer_client(first: ClientTools, second: ClientTools) -> ClientTools:
    """The newer of two client installations (the one that reads both's archives)."""
    return second if second.major > first.major else first


def client_version(pg_dump: Path) -> tuple[int, str] | None:
    try:
        out = subprocess.run(
            [str(pg_dump), "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
            env=offline_environment(),
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out)
    if not match:
        return None
    return int(match.group(2)), match.group(1)


def _candidate_dirs(pg_bin_dir: Path | None) -> list[tuple[str, Path]]:
    candidates: list[tuple[str, Path]] = []
    if DEBIAN_PG_ROOT.is_dir():
        majors = sorted(
            (int(p.name) for p in DEBIAN_PG_ROOT.iterdir() if p.name.isdigit()), reverse=False
        )
        candidates += [
            (f"{DEBIAN_PG_ROOT}/{m}/bin", DEBIAN_PG_ROOT / str(m) / "bin") for m in majors
        ]
    on_path = shutil.which("pg_dump")
    if on_path:
        # A symlink into an installation (Homebrew) resolves to a bin dir holding pg_restore
        # and psql too; Debian's /usr/bin/pg_dump resolves to pg_wrapper, so keep /usr/bin.
        resolved = Path(on_path).resolve().parent
        directory = resolved if (resolved / "pg_dump").is_file() else Path(on_path).parent
        candidates.append(("PATH", directory))
    return candidates


def find_client(
    server_major_version: int, pg_bin_dir: Path | None = None, *, purpose: str = "server"
) -> ClientTools:
    """Pick client binaries able to dump a server of ``server_major_version``.

    Order: ``--pg-bin-dir``, then ``/usr/lib/postgresql/N/bin`` (the matching major first,
    then the nearest newer one), then PATH. A client older than the server is refused.
    """
    if pg_bin_dir is not None:
        found = client_version(pg_bin_dir / "pg_dump")
        if found is None:
            raise ConfigError(f"no usable pg_dump in --pg-bin-dir {pg_bin_dir}")
        major, version = found
        if major < server_major_version:
            raise Refused(
                f"pg_dump {version} in {pg_bin_dir} is older than the {purpose} "
                f"(PostgreSQL {server_major_version})",
                hint=f"install postgresql-client-{server_major_version} or point --pg-bin-dir "
                "at a newer client",
            )
        return ClientTools(pg_bin_dir, major, version)

    seen: list[str] = []
    usable: list[ClientTools] = []
    for label, directory in _candidate_dirs(pg_bin_dir):
        found = client_version(directory / "pg_dump")
        if found is None:
            continue
        major, version = found
        seen.append(f"{version} ({label})")
        if major >= server_major_version:
            usable.append(ClientTools(directory, major, version))
    if usable:
        # The closest newer major behaves most like the server's own tools.
        return min(usable, key=lambda tools: tools.major)
    detail = ", ".join(seen) if seen else "none found"
    raise Refused(
        f"no PostgreSQL client >= {server_major_version} for the {purpose} "
        f"(PostgreSQL {server_major_version}; found: {detail})",
        hint=f"install postgresql-client-{server_major_version} or pass --pg-bin-dir / "
        "DB_ROLLBACK_PG_BIN_DIR",
    )


_CHILD_OVERRIDDEN = frozenset(
    {
        "PGPASSWORD",
        "PGPASSFILE",
        "PGDATABASE",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGSSLMODE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGAPPNAME",
        "PGCONNECT_TIMEOUT",
    }
)


def _options_escape(value: str) -> str:
    """A value inside libpq's ``options``: spaces and backslashes escaped with a backslash."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _passfile_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


@contextmanager
def child_environment(
    conninfo: ConnInfo,
    dbname: str | None = None,
    *,
    lock_timeout_ms: int | None = None,
    role: str | None = None,
) -> Iterator[ChildEnv]:
    """An environment for pg_dump/pg_restore/psql connecting to ``dbname``: the minimal
    environment of :func:`offline_environment` plus the connection settings.

    The password goes into a temporary 0600 passfile that is removed afterwards. With
    ``lock_timeout_ms`` every lock wait of the child's session is bounded; with ``role``
    the session acts as that role (what it creates, that role owns).
    """
    # Connection settings come from ``conninfo`` alone (it already holds what the PG*
    # variables supplied); other libpq variables (PGSSLROOTCERT, PGOPTIONS, ...) pass through
    # as they do for our own connections.
    env = offline_environment()
    env.update(
        {k: v for k, v in os.environ.items() if k.startswith("PG") and k not in _CHILD_OVERRIDDEN}
    )
    env["PGDATABASE"] = dbname or conninfo.dbname
    env["PGAPPNAME"] = run_application_name()
    env["PGCONNECT_TIMEOUT"] = "10"
    if conninfo.host:
        env["PGHOST"] = conninfo.host
    if conninfo.port:
        env["PGPORT"] = str(conninfo.port)
    if conninfo.user:
        env["PGUSER"] = conninfo.user
    if conninfo.sslmode:
        env["PGSSLMODE"] = conninfo.sslmode
    for key, value in conninfo.options:
        libpq_var = {
            "sslrootcert": "PGSSLROOTCERT",
            "sslcert": "PGSSLCERT",
            "sslkey": "PGSSLKEY",
            "target_session_attrs": "PGTARGETSESSIONATTRS",
            "options": "PGOPTIONS",
        }.get(key)
        if libpq_var:
            env[libpq_var] = value
    extra = []
    if lock_timeout_ms is not None:
        extra.append(f"-c lock_timeout={int(lock_timeout_ms)}")
    if role is not None:
        extra.append(f"-c role={_options_escape(role)}")
    if extra:
        env["PGOPTIONS"] = " ".join([env.get("PGOPTIONS", ""), *extra]).strip()
    child = ChildEnv(env)
    secret: _SecretFile | None = None
    if conninfo.password:
        secret = _SecretFile(f"*:*:*:*:{_passfile_escape(conninfo.password)}\n")
        child["PGPASSFILE"] = secret.path
        child.pass_fds = secret.pass_fds
    elif conninfo.passfile:
        child["PGPASSFILE"] = conninfo.passfile
    try:
        yield child
    finally:
        if secret is not None:
            secret.close()


def error_tail(stderr_file: IO[bytes], default: str = "no error output") -> str:
    """The first error line a client tool wrote to ``stderr_file``, credentials removed."""
    stderr_file.seek(0)
    lines = [
        line.strip()
        for line in stderr_file.read().decode("utf-8", "replace").splitlines()
        if line.strip()
    ]
    errors = [line for line in lines if "error" in line.lower()] or lines
    return redactor.scrub(errors[0] if errors else default)


def dbname_conninfo(dbname: str) -> str:
    """``dbname='...'``: a database name as a libpq connection string that names only it."""
    escaped = dbname.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


def offline_environment() -> dict[str, str]:
    """The minimal environment every client tool gets: no connection settings, no password,
    no DATABASE_URL, no cloud credentials: only what a program needs to run (PATH, locale,
    time zone, home and temp directory)."""
    return {
        key: value
        for key, value in os.environ.items()
        if key in _CHILD_KEEP or key.startswith("LC_")
    }


_CHILD_KEEP = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})


class ChildEnv(dict[str, str]):
    """A child's environment, and the descriptors it must inherit (the password file)."""

    pass_fds: tuple[int, ...] = ()


class _SecretFile:
    """The passfile libpq reads. On Linux an anonymous memory file (memfd) that the child
    inherits and opens as ``/proc/self/fd/N``: it has no name anywhere, so nothing of it is
    left when the processes holding it end, even under SIGKILL. Elsewhere a 0600 file in a
    private temp directory, removed afterwards and swept by ``cleanup-artifacts``."""

    def __init__(self, content: str) -> None:
        data = content.encode("utf-8")
        self.pass_fds: tuple[int, ...] = ()
        self._path: Path | None = None
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("db-rollback-pgpass")
            os.write(fd, data)
            os.fchmod(fd, 0o600)  # libpq ignores a passfile others may read
            self.pass_fds = (fd,)
            self.path = f"/proc/self/fd/{fd}"
            return
        handle, name = tempfile.mkstemp(prefix="db-rollback-", suffix=".pgpass")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        self._path = Path(name)
        self._path.chmod(0o600)
        self.path = name

    def close(self) -> None:
        for fd in self.pass_fds:
            os.close(fd)
        if self._path is not None:
            self._path.unlink(missing_ok=True)
