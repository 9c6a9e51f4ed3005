"""Alembic from code: resolve revisions, render downgrade SQL offline, downgrade in-process.

alembic and sqlalchemy are imported inside the functions that use them: they are heavy.

The URL handed to env.py names the installed driver (``postgresql+psycopg2://``) unless
the user chose one, because SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3.
The run's timeouts are set on the connection env.py configures Alembic with (see
environment.py), not in the URL: async drivers reject libpq's ``options``.
"""

from __future__ import annotations

import configparser
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli.errors import ConfigError, OperationFailed, Refused, RollbackError, UsageError
from rollback_cli.log import get_logger
from rollback_cli.rollback.environment import (
    OwnedEnvironment,
    isolated_from_application,
    owned_environment,
)

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from rollback_cli.settings import ConnInfo, Target

BASE = "base"
_DROP = re.compile(r"\bDROP\s+(TABLE|COLUMN)\b(?:\s+IF\s+EXISTS)?\s+([\w.\"]+)?", re.IGNORECASE)
# ALTER TABLE t DROP [COLUMN] [IF EXISTS] c, but not DROP CONSTRAINT (no data goes with it).
_ALTER_DROP = re.compile(
    r"\bALTER\s+TABLE\s+([\w.\"]+)\s+DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?"
    r"(?!CONSTRAINT\b)([\w\"]+)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Timeouts:
    lock_timeout_ms: int = 5000
    statement_timeout_ms: int = 0


@dataclass
class RevisionStep:
    revision: str
    down_revision: str | None
    message: str
    sql: str = ""
    drops: list[str] = field(default_factory=list)
    empty: bool = False
    irreversible: str | None = None
    #: why the downgrade cannot render offline (it looks at the live connection): it is
    #: not irreversible, its SQL is only known once it runs
    online_only: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "down_revision": self.down_revision,
            "message": self.message,
            "drops": self.drops,
            "empty": self.empty,
            "irreversible": self.irreversible,
            "online_only": self.online_only,
            "sql": self.sql,
        }


def alembic_url(conninfo: ConnInfo) -> str:
    return conninfo.to_url(driver=conninfo.driver or "psycopg2")


def load_config(
    path: Path, url: str | None = None, *, script_location: str | None = None
) -> Config:
    """The project's Alembic config: ``path`` (an ini file), or only ``script_location``
    (``package.module:path`` of an installed package, or a directory) when there is no ini.

    A relative ``script_location`` that does not exist from the working directory is read
    from the ini's own directory: packaged ini files are written that way."""
    from alembic.config import Config

    if script_location is None and not path.is_file():
        raise ConfigError(
            f"Alembic config {path} not found (set --alembic-config, or "
            "--alembic-script-location for migrations without an ini file)"
        )
    config = Config(str(path)) if path.is_file() else Config()
    # The template env.py calls fileConfig(), which would replace our log handlers.
    config.attributes["configure_logger"] = False
    try:
        config.file_config  # noqa: B018 - parse now, so a malformed file is a config error
        if script_location is not None:
            config.set_main_option("script_location", script_location.replace("%", "%%"))
        elif path.is_file():
            _anchor_to_ini(config, path)
        if url is not None:
            config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    except configparser.Error as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"Alembic config {path} cannot be read: {reason}") from None
    return config


def target_config(target: Target, url: str | None = None) -> Config:
    """The Alembic config of ``target``'s project (``--alembic-config`` and
    ``--alembic-script-location``)."""
    return load_config(target.alembic_config, url, script_location=target.alembic_script_location)


def _anchor_to_ini(config: Config, path: Path) -> None:
    """Resolve a relative ``script_location`` from the ini's directory when it does not
    exist from the working directory (Alembic reads it from the working directory)."""
    location = config.get_main_option("script_location")
    if not location or _is_package_location(location):
        return
    given = Path(location)
    if given.is_absolute() or given.is_dir():
        return
    anchored = path.resolve().parent / given
    if anchored.is_dir():
        config.set_main_option("script_location", str(anchored).replace("%", "%%"))


def _is_package_location(location: str) -> bool:
    """``package.module:path`` (Alembic resolves it through the installed package)."""
    head, sep, _ = location.partition(":")
    return bool(sep) and bool(re.fullmatch(r"[A-Za-z_][\w.]*", head)) and len(head) > 1


def script_directory(config: Config) -> ScriptDirectory:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        script = ScriptDirectory.from_config(config)
        # Loading the revision files imports application code: keep it off our logging.
        with isolated_from_application():
            script.revision_map.heads  # noqa: B018 - load them now, isolated
        return script
    except (CommandError, configparser.Error) as exc:
        raise ConfigError(f"Alembic scripts cannot be loaded: {exc}") from None


@dataclass
class Project:
    """A migration environment as its env.py sets it up: the scripts (with the version
    locations env.py adds at run time), the version table it keeps its revisions in and the
    revisions that table holds now."""

    script: ScriptDirectory
    heads: list[str]
    version_table: str = "alembic_version"
    version_schema: str | None = None

    @property
    def version_table_name(self) -> str:
        schema = self.version_schema
        return f"{schema}.{self.version_table}" if schema else self.version_table


def probe(config: Config, expected: ConnInfo, timeouts: Timeouts) -> Project:
    """Run env.py once, read-only, the way ``alembic current`` does: its connection
    proven to reach ``expected`` and bounded by the run's timeouts; nothing is written
    (Alembic's ``dont_mutate``). A Refused when env.py connects elsewhere; a
    ConfigError when env.py cannot run."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        # Not loaded yet: env.py may add version locations to it (or to the config) first.
        script = ScriptDirectory.from_config(config)
    except (CommandError, configparser.Error) as exc:
        raise ConfigError(f"Alembic scripts cannot be loaded: {exc}") from None
    locations = config.get_main_option("version_locations")
    seen: dict[str, Any] = {}

    def read_heads(rev: Any, context: Any) -> list[Any]:
        seen["heads"] = list(context.get_current_heads())
        opts = context.opts
        seen["table"] = opts.get("version_table") or "alembic_version"
        seen["schema"] = opts.get("version_table_schema")
        return []

    url = config.get_main_option("sqlalchemy.url") or ""
    try:
        with (
            database_url_env(url),
            owned_environment(
                expected,
                timeouts.lock_timeout_ms,
                timeouts.statement_timeout_ms,
                url=url,
                read_only=True,
            ),
            isolated_from_application(),
            EnvironmentContext(config, script, fn=read_heads, dont_mutate=True),
        ):
            script.run_env()
    except RollbackError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        if "read-only transaction" in reason and "heads" in seen:
            # env.py writes after Alembic's work (refused: this read is read-only); what
            # it configured has been seen.
            get_logger().warning("env.py tried to write while its revision was read", error=reason)
        else:
            raise ConfigError(
                f"the migration environment (env.py) cannot run: {type(exc).__name__}: {reason}"
            ) from None
    if "heads" not in seen:
        raise ConfigError(
            "the migration environment (env.py) ran no migration context: nothing to read "
            "the current revision from"
        )
    if config.get_main_option("version_locations") != locations:
        script = ScriptDirectory.from_config(config)  # env.py added version locations
    try:
        with isolated_from_application():
            script.revision_map.heads  # noqa: B018 - load them now, isolated
    except (CommandError, configparser.Error) as exc:
        raise ConfigError(f"Alembic scripts cannot be loaded: {exc}") from None
    return Project(script, sorted(seen["heads"]), seen["table"], seen["schema"])


def known_revision(script: ScriptDirectory, revision: str) -> bool:
    """Whether ``script`` has ``revision`` (a database can be ahead of the checkout)."""
    from alembic.script.revision import RevisionError
    from alembic.util.exc import CommandError

    try:
        return script.get_revision(revision) is not None
    except (CommandError, RevisionError):
        return False


@contextmanager
def database_url_env(url: str) -> Iterator[None]:
    """env.py files often read DATABASE_URL; hand them the driver-qualified URL meanwhile."""
    previous = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = previous


class NotBehind(Refused):
    """The target revision is not an ancestor of the current one."""


def resolve_target(script: ScriptDirectory, target: str, current: list[str]) -> str:
    """The full id of ``target``: a revision, a unique prefix of one, ``branch@rev`` or
    ``base``. An unknown or ambiguous target is a usage error (exit 2) that names the
    choices; a database at a revision these scripts do not know, or a target that is not
    behind the current revision, is refused (exit 7)."""
    from alembic.script.revision import RevisionError
    from alembic.util.exc import CommandError

    if not target or not target.strip():
        raise UsageError("--to-revision must not be empty")
    heads = ",".join(script.get_heads()) or "none"
    here = ",".join(current) or "none"
    if not current:
        raise Refused(
            f"the database has no Alembic revision; cannot downgrade to {target} (heads {heads})"
        )
    for head in current:
        if not known_revision(script, head):
            raise Refused(
                f"the database is at revision {head}, which these Alembic scripts do not know "
                f"(heads {heads}): point --alembic-config/--alembic-script-location at the "
                "scripts of the deployed code (or check out the release that added it); "
                "nothing was changed"
            )
    if target == BASE:
        return BASE
    try:
        found = script.get_revisions(target)
    except (CommandError, RevisionError) as exc:
        reason = " ".join(str(exc).split())
        if "multiple" in reason.lower():
            raise UsageError(
                f"ambiguous revision {target!r}: {reason}; give more characters "
                f"(current {here}, heads {heads})"
            ) from None
        raise UsageError(
            f"unknown revision {target!r} (current {here}, heads {heads}): {reason}"
        ) from None
    if len(found) != 1 or found[0] is None:
        choices = ", ".join(r.revision for r in found if r is not None) or "none"
        raise UsageError(
            f"revision {target!r} names {len(found)} revisions ({choices}): name one of them"
        )
    full = found[0].revision
    ancestors: set[str] = set()
    for head in current:
        ancestors.update(r.revision for r in script.iterate_revisions(head, BASE))
    if full not in ancestors:
        raise NotBehind(
            f"revision {full} is not an ancestor of the current revision {here} "
            f"(heads {heads}); a schema rollback only goes back"
        )
    return full


def steps_to(script: ScriptDirectory, current: list[str], target: str) -> list[RevisionStep]:
    """The revisions a downgrade from ``current`` to ``target`` reverts, in the order
    Alembic runs them (with several heads, only the branches that descend from
    ``target``, and what depends on them)."""
    steps: list[RevisionStep] = []
    scripts = script.iterate_revisions(tuple(current), target, select_for_downgrade=True)
    for rev in scripts:
        if rev.revision == target:
            continue
        down = rev.down_revision
        down_text = down if isinstance(down, str) or down is None else ",".join(down)
        steps.append(RevisionStep(rev.revision, down_text, rev.doc or ""))
    return steps


def render_downgrade_sql(config: Config, steps: list[RevisionStep], url: str) -> None:
    """Fill each step's offline SQL and flag drops, empty and irreversible downgrades."""
    for item in steps:
        buffer = io.StringIO()
        try:
            _render_offline(config, "downgrade", item, url, buffer)
        except NotImplementedError as exc:
            item.irreversible = str(exc) or "downgrade raises NotImplementedError"
        except Exception as exc:
            # Offline rendering is a preview, never a verdict: a downgrade that looks at the
            # live connection cannot render offline, and runs fine online.
            item.online_only = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        item.sql = buffer.getvalue()
        statements = _migration_statements(item.sql)
        item.empty = not statements and item.irreversible is None and item.online_only is None
        item.drops = sorted({_describe_drop(s) for s in statements if _is_drop(s)})


def upgrade_changes(config: Config, item: RevisionStep, url: str) -> bool | None:
    """Whether the revision's upgrade, rendered offline, runs any statement (None when it
    cannot render offline)."""
    buffer = io.StringIO()
    try:
        _render_offline(config, "upgrade", item, url, buffer)
    except Exception:
        return None
    return bool(_migration_statements(buffer.getvalue()))


def _render_offline(
    config: Config, direction: str, item: RevisionStep, url: str, buffer: io.StringIO
) -> None:
    """Alembic's offline SQL (``--sql``) of one revision's upgrade or downgrade, written to
    ``buffer``; raises what the migration raises."""
    from alembic import command

    down = item.down_revision or BASE
    steps = f"{item.revision}:{down}" if direction == "downgrade" else f"{down}:{item.revision}"
    config.output_buffer = buffer
    try:
        with database_url_env(url), isolated_from_application():
            getattr(command, direction)(config, steps, sql=True)
    finally:
        config.output_buffer = None


def _migration_statements(sql: str) -> list[str]:
    """The statements of offline SQL besides the version table's and the transaction's."""
    return [
        s
        for s in _statements(sql)
        if "alembic_version" not in s.lower() and not s.upper().startswith(("BEGIN", "COMMIT"))
    ]


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if line.strip() and not line.startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _is_drop(statement: str) -> bool:
    return bool(_DROP.search(statement) or _ALTER_DROP.search(statement))


def _describe_drop(statement: str) -> str:
    altered = _ALTER_DROP.search(statement)
    if altered and not statement.upper().lstrip().startswith("DROP"):
        return f"column {altered.group(1)}.{altered.group(2)}".replace('"', "")
    match = _DROP.search(statement)
    if match:
        return f"{match.group(1).lower()} {(match.group(2) or '').strip()}".replace('"', "")
    return statement[:60]


def downgrade(
    config: Config,
    target: str,
    url: str,
    expected: ConnInfo,
    timeouts: Timeouts,
    *,
    redirect_from: ConnInfo | None = None,
) -> OwnedEnvironment:
    """Run the downgrade in-process through the project's env.py, on a connection proven to
    reach ``expected`` and bounded by ``timeouts``; failures become OperationFailed (the
    caller checks state), a connection elsewhere is Refused before any statement."""
    from alembic import command

    logger = get_logger()
    owned: OwnedEnvironment | None = None
    try:
        with (
            database_url_env(url),
            owned_environment(
                expected,
                timeouts.lock_timeout_ms,
                timeouts.statement_timeout_ms,
                redirect_from=redirect_from,
                url=url,
            ) as owned,
            isolated_from_application(),
        ):
            command.downgrade(config, target)
        if owned.connections == 0:
            raise Refused(
                "the migration environment (env.py) ran no migration through a connection "
                "(offline mode?): nothing could be checked"
            )
        return owned
    except RollbackError:
        raise
    except Exception as exc:
        reason = failure_reason(exc)
        running = owned.running if owned is not None else None
        where = f" while reverting {running}" if running else ""
        logger.error("downgrade failed", error=type(exc).__name__, revision=running)
        raise OperationFailed(f"Alembic downgrade to {target} failed{where}: {reason}") from None


def failure_reason(exc: BaseException) -> str:
    """One line: the error, and the statement that failed when the driver names it."""
    text = str(exc)
    statement = None
    match = re.search(r"\[SQL: (.*?)\]\s*(\(Background|\[parameters|$)", text, re.S)
    if match:
        statement = " ".join(match.group(1).split())[:200]
    message = text.split("[SQL:")[0]
    message = " ".join(message.split("(Background on this error")[0].split())
    lowered = message.lower()
    if "lock timeout" in lowered:
        message = "lock_timeout reached: the tables are busy; retry when traffic allows"
    elif "statement timeout" in lowered:
        message = "statement_timeout reached"
    else:
        message = message[:300] or type(exc).__name__
    return f"{message} (statement: {statement})" if statement else message
