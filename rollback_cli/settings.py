"""Settings resolved once from options, environment variables and defaults, split by meaning:
the target database, the storage configuration and the run options.

Credentials come only from the database URL, libpq ``PG*`` variables or a
passfile. ``ConnInfo`` never shows its password in ``repr`` or ``str``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from rollback_cli.errors import ConfigError, UsageError

DEFAULT_ENVIRONMENT = "staging"
PROTECTED_ENV_VAR = "DB_ROLLBACK_PROTECTED_ENVIRONMENTS"
_URL_SCHEMES = ("postgresql", "postgres")
_ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class ConnInfo:
    """Where and how to connect. ``password`` is kept out of ``repr``."""

    dbname: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None
    passfile: str | None = None
    driver: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    def with_dbname(self, dbname: str) -> ConnInfo:
        return replace(self, dbname=dbname)

    @property
    def display_host(self) -> str:
        return self.host or "local socket"

    @property
    def same_machine(self) -> bool:
        """Whether the server runs on this machine (a socket, localhost or a loopback
        address): then its sessions share this machine's cores with the client tools."""
        host = self.host or ""
        if not host or host.startswith("/") or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def redacted_url(self) -> str:
        """The URL with the password replaced, safe to log."""
        return self.to_url(include_password=False)

    def to_url(self, *, include_password: bool = True, driver: str | None = None) -> str:
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        auth = ""
        if self.user:
            auth = quote(self.user, safe="")
            if self.password:
                auth += ":" + (quote(self.password, safe="") if include_password else "***")
            auth += "@"
        host = self.host or ""
        query = [(k, v) for k, v in self.options]
        if host.startswith("/"):
            query.append(("host", host))
            host = ""
        elif ":" in host:
            host = f"[{host}]"  # an IPv6 address
        netloc = auth + host + (f":{self.port}" if self.port and host else "")
        if self.port and not host:
            query.append(("port", str(self.port)))
        if self.sslmode:
            query.append(("sslmode", self.sslmode))
        if self.passfile:
            # Not a secret itself, and the only password source of some set-ups.
            query.append(("passfile", self.passfile))
        url = f"{scheme}://{netloc}/{quote(self.dbname, safe='')}"
        if query:
            url += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query)
        return url

    def psycopg_kwargs(self, dbname: str | None = None) -> dict[str, object]:
        kwargs: dict[str, object] = {"dbname": dbname or self.dbname}
        for key in ("host", "port", "user", "password", "sslmode", "passfile"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        kwargs.update(dict(self.options))
        return kwargs


def parse_database_url(url: str) -> ConnInfo:
    """Parse a ``postgresql://`` URL; errors never repeat the URL (it may hold a password)."""
    try:
        parts = urlsplit(url.strip())
        scheme, _, driver = parts.scheme.partition("+")
        if scheme not in _URL_SCHEMES:
            raise ConfigError(
                "database URL must start with postgresql:// (got scheme "
                f"{parts.scheme or 'none'!r})"
            )
        port = parts.port
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
    except ValueError as exc:
        # urllib's messages can echo the netloc; keep only the kind of problem.
        reason = "invalid port" if "port" in str(exc).lower() else "malformed URL"
        raise ConfigError(f"database URL is not valid: {reason}") from None
    dbname = unquote(parts.path.lstrip("/")) or query.pop("dbname", "")
    if not dbname:
        raise ConfigError("database URL names no database (expected postgresql://host/DBNAME)")
    host = unquote(parts.hostname) if parts.hostname else query.pop("host", None)
    if "port" in query and port is None:
        try:
            port = int(query.pop("port"))
        except ValueError:
            raise ConfigError("database URL is not valid: invalid port") from None
    return ConnInfo(
        dbname=dbname,
        host=host,
        port=port,
        user=unquote(parts.username) if parts.username else query.pop("user", None),
        password=unquote(parts.password) if parts.password else query.pop("password", None),
        sslmode=query.pop("sslmode", None),
        passfile=query.pop("passfile", None),
        driver=driver or None,
        options=tuple(sorted(query.items())),
    )


def conninfo_from_environ(environ: dict[str, str] | os._Environ[str]) -> ConnInfo:
    """Build a ConnInfo from libpq's PG* variables."""
    dbname = environ.get("PGDATABASE", "")
    if not dbname:
        raise ConfigError(
            "no database given: pass --database-url, set DATABASE_URL, or set PGDATABASE"
        )
    port_text = environ.get("PGPORT")
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise ConfigError(f"PGPORT is not a number: {port_text!r}") from None
    return ConnInfo(
        dbname=dbname,
        host=environ.get("PGHOST") or None,
        port=port,
        user=environ.get("PGUSER") or None,
        password=environ.get("PGPASSWORD") or None,
        sslmode=environ.get("PGSSLMODE") or None,
        passfile=environ.get("PGPASSFILE") or None,
    )


def resolve_conninfo(
    database_url: str | None, environ: dict[str, str] | os._Environ[str] | None = None
) -> ConnInfo:
    """The URL's settings, with libpq's PG* variables filling what it leaves out (as libpq
    itself does), so that our connections and pg_dump's reach the same server as the same
    user."""
    environ = os.environ if environ is None else environ
    if not database_url:
        return conninfo_from_environ(environ)
    info = parse_database_url(database_url)
    port = info.port
    if port is None and environ.get("PGPORT"):
        try:
            port = int(environ["PGPORT"])
        except ValueError:
            raise ConfigError(f"PGPORT is not a number: {environ['PGPORT']!r}") from None
    return replace(
        info,
        host=info.host or environ.get("PGHOST") or None,
        port=port,
        user=info.user or environ.get("PGUSER") or None,
        password=info.password or environ.get("PGPASSWORD") or None,
        sslmode=info.sslmode or environ.get("PGSSLMODE") or None,
        passfile=info.passfile or environ.get("PGPASSFILE") or None,
    )


def protected_environments() -> frozenset[str]:
    extra = os.environ.get(PROTECTED_ENV_VAR, "")
    names = {name.strip() for name in extra.split(",") if name.strip()}
    return frozenset({"production", *names})


def validate_environment(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise UsageError(
            f"environment name {name!r} is not valid: use letters, digits, '.', '_' or '-'"
        )
    return name


def parse_duration(text: str) -> float:
    """Parse '30d', '12h', '15m', '45s', '2w' or a bare number of days into seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise UsageError(
            f"cannot read duration {text!r}: expected a number with a unit s, m, h, d or w "
            "(for example 30d)"
        )
    value = float(match.group(1))
    unit = match.group(2) or "d"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def parse_timeout_ms(text: str) -> int:
    """Parse a PostgreSQL-style timeout ('5s', '500ms', '2min', '0') into milliseconds."""
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s|min|m|h)?\s*", text)
    if not match:
        raise UsageError(f"cannot read timeout {text!r}: expected for example 5s, 500ms or 2min")
    value = int(match.group(1))
    unit = match.group(2) or "ms"
    factor = {"ms": 1, "s": 1000, "min": 60_000, "m": 60_000, "h": 3_600_000}[unit]
    return value * factor


@dataclass(frozen=True)
class Target:
    """The database a command works on, its connection resolved once, and where it lives.

    ``environment`` names the deployment stage recorded in backups and logs; it decides
    whether the production guard applies and under which prefix remote backups live.
    """

    conninfo: ConnInfo
    environment: str = DEFAULT_ENVIRONMENT
    pg_bin_dir: Path | None = None
    alembic_config: Path = Path("alembic.ini")
    #: who the restores connect as (pg_restore/psql), when not the role above: a role
    #: without superuser rights, so that nothing a backup holds can run on the server's
    #: host (``COPY ... TO PROGRAM`` needs a superuser; ``SET ROLE`` is no boundary)
    restore_conninfo: ConnInfo | None = None
    #: the migration scripts without an ini file: ``package.module:path`` of an installed
    #: package, or a directory (overrides the ini's ``script_location`` when both are given)
    alembic_script_location: str | None = None

    @classmethod
    def resolve(
        cls,
        database_url: str | None = None,
        *,
        environment: str = DEFAULT_ENVIRONMENT,
        pg_bin_dir: Path | None = None,
        alembic_config: Path = Path("alembic.ini"),
        environ: dict[str, str] | os._Environ[str] | None = None,
        restore_url: str | None = None,
        alembic_script_location: str | None = None,
    ) -> Target:
        """A target from a URL (or libpq's PG* variables); raises ConfigError (exit 3).
        ``restore_url`` names the role restores connect as (its host, port and TLS settings
        default to the target's; its database name is not used)."""
        conninfo = resolve_conninfo(database_url, environ)
        restore = None
        if restore_url:
            given = parse_database_url(restore_url)
            restore = replace(
                given,
                host=given.host or conninfo.host,
                port=given.port or conninfo.port,
                sslmode=given.sslmode or conninfo.sslmode,
            )
        return cls(
            conninfo,
            validate_environment(environment),
            pg_bin_dir,
            alembic_config,
            restore,
            alembic_script_location or None,
        )

    @property
    def restore_as(self) -> ConnInfo:
        """The connection restores use (the target's database)."""
        if self.restore_conninfo is None:
            return self.conninfo
        return self.restore_conninfo.with_dbname(self.conninfo.dbname)

    @property
    def dbname(self) -> str:
        return self.conninfo.dbname

    @property
    def is_protected(self) -> bool:
        return self.environment in protected_environments()


SIGNING_KEY_VAR = "DB_ROLLBACK_SIGNING_KEY"
SIGNING_KEY_FILE_VAR = "DB_ROLLBACK_SIGNING_KEY_FILE"
PREVIOUS_KEYS_VAR = "DB_ROLLBACK_PREVIOUS_SIGNING_KEYS"
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class SigningKeys:
    """Keys that authenticate backups (HMAC-SHA256). The first signs new manifests; every
    one is accepted when verifying, so a key can be rotated: sign with the new one, keep the
    old one among the previous keys until its backups have expired.

    Keys come only from the environment (never a flag): ``DB_ROLLBACK_SIGNING_KEY``, or
    ``DB_ROLLBACK_SIGNING_KEY_FILE`` (one key per line, the first signs), plus
    ``DB_ROLLBACK_PREVIOUS_SIGNING_KEYS`` (comma-separated, verify only).
    """

    keys: tuple[str, ...] = field(default=(), repr=False)
    source: str = "none"

    @classmethod
    def from_environment(
        cls, environ: dict[str, str] | os._Environ[str] | None = None
    ) -> SigningKeys:
        environ = os.environ if environ is None else environ
        keys: list[str] = []
        sources: list[str] = []
        if environ.get(SIGNING_KEY_VAR):
            keys.append(environ[SIGNING_KEY_VAR].strip())
            sources.append(SIGNING_KEY_VAR)
        key_file = environ.get(SIGNING_KEY_FILE_VAR)
        if key_file:
            try:
                lines = Path(key_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read {SIGNING_KEY_FILE_VAR}: {exc.strerror}") from None
            keys += [line.strip() for line in lines if line.strip()]
            sources.append(SIGNING_KEY_FILE_VAR)
        previous = environ.get(PREVIOUS_KEYS_VAR, "")
        keys += [key.strip() for key in previous.split(",") if key.strip()]
        short = [key for key in keys if len(key) < MIN_KEY_LENGTH]
        if short:
            raise ConfigError(
                f"a signing key is shorter than {MIN_KEY_LENGTH} characters; use a random "
                "key of 32 or more (for example: openssl rand -hex 32)"
            )
        return cls(tuple(keys), ", ".join(sources) or "none")

    @property
    def active(self) -> str | None:
        return self.keys[0] if self.keys else None

    def __bool__(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True)
class StorageConfig:
    """Where backups are kept: a local directory, or a remote storage staged through it."""

    backup_dir: Path = Path("backups")
    storage: str | None = None  # file:///path or s3://bucket/prefix; None: backup_dir
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_sse: str | None = None
    s3_kms_key_id: str | None = None
    s3_storage_class: str | None = None
    keep_local: bool = False
    #: keys that sign new manifests and authenticate stored ones (empty: not configured)
    signing: SigningKeys = field(default_factory=SigningKeys, repr=False)

    @property
    def display(self) -> str:
        return self.storage or str(self.backup_dir)


Prompt = Callable[[str], str]


@dataclass(frozen=True)
class RunOptions:
    """How a command runs: dry run, confirmation of protected environments."""

    dry_run: bool = False
    yes: bool = False
    #: asks the operator to type the database name; None (or not interactive): no prompt
    prompt: Prompt | None = field(default=None, compare=False)
    interactive: bool = False
