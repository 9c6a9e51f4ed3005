"""``status``: the preflight a rollback needs, as a list of checks."""

from __future__ import annotations

import configparser
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rollback_cli.checks import FAIL, INFO, OK, WARNING, Check, summary
from rollback_cli.errors import ConfigError, Refused, RollbackError
from rollback_cli.log import get_logger
from rollback_cli.postgres.catalog import (
    owns_database,
    risky_sessions,
    role_privileges,
)
from rollback_cli.postgres.checks import UnreadableTable, missing_client_tools, readable_revisions
from rollback_cli.postgres.clients import ClientTools, find_client
from rollback_cli.postgres.connection import (
    connect,
    database_error,
    first_line,
    server_major,
    server_version_text,
)
from rollback_cli.postgres.lock import lock_holder
from rollback_cli.rollback.artifacts import kept_databases, undo_candidate
from rollback_cli.rollback.migrations import known_revision, script_directory, target_config

if TYPE_CHECKING:
    from rollback_cli.settings import Target

LONG_RUNNING_SECONDS = 300


@dataclass
class StatusReport:
    checks: list[Check] = field(default_factory=list)
    current_revision: str | None = None
    head_revision: str | None = None

    def add(self, name: str, status: str, detail: str, **extra: Any) -> None:
        self.checks.append(Check(name, status, detail, extra))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def document(self) -> dict[str, Any]:
        """What ``status --json`` prints of a failed preflight: every check, failing first."""
        return {
            "checks": [c.to_dict() for c in by_severity(self.checks)],
            "revision_before": self.current_revision,
            "revision_after": self.current_revision,
            "head_revision": self.head_revision,
        }


def by_severity(checks: list[Check]) -> list[Check]:
    """Failed checks first, then warnings, then the rest, each in the order they ran."""
    rank = {FAIL: 0, WARNING: 1}
    return sorted(checks, key=lambda check: rank.get(check.status, 2))


class _CarriesReport(RollbackError):
    """A failed preflight that carries its checklist: the command line shows every check."""

    def __init__(self, message: str, report: StatusReport) -> None:
        super().__init__(message)
        self.report = report

    @property
    def document(self) -> dict[str, Any]:
        return self.report.document()


class PreflightRefused(_CarriesReport, Refused):
    """A check a rollback needs failed (exit 7)."""


class PreflightConfigError(_CarriesReport, ConfigError):
    """The connection or the Alembic configuration failed its check (exit 3)."""


def preflight(target: Target, *, require_alembic_config: bool = False) -> StatusReport:
    """Run every check; raise when a rollback could not run (exit 3 or 7), else return.

    ``require_alembic_config``: the user named the Alembic configuration, so a missing
    file fails the alembic check instead of leaving the head revision unknown."""
    logger = get_logger()
    report = StatusReport()
    conninfo = target.conninfo
    conn = connect(conninfo)
    try:
        major = server_major(conn)
        report.add(
            "connection",
            OK,
            f"{conninfo.redacted_url()} (PostgreSQL {server_version_text(conn)})",
        )
        try:
            _client(find_client(major, target.pg_bin_dir), report)
        except RollbackError as exc:
            report.add("client", FAIL, exc.one_line())
        checks: list[tuple[str, Callable[[], None]]] = [
            ("privileges", lambda: _privileges(conn, conninfo.dbname, report)),
            (
                "revision",
                lambda: _revisions(target, conn, report, require_alembic_config),
            ),
            ("lock", lambda: _lock(conn, conninfo.dbname, report)),
            ("sessions", lambda: _sessions(conn, conninfo.dbname, report)),
            ("undo", lambda: _kept_databases(conn, conninfo.dbname, report)),
        ]
        for name, run_check in checks:
            try:
                run_check()
            except database_error() as exc:
                # One unreadable catalog or table must not hide the other checks.
                report.add(name, FAIL, f"cannot check: {first_line(exc)}")
    finally:
        conn.close()
    for check in report.checks:
        logger.info("check", check=check.name, status=check.status, detail=check.detail)
    failures = report.failures
    if failures:
        text = summary(failures)
        if any(c.name in ("connection", "alembic") for c in failures):
            raise PreflightConfigError(f"preflight failed: {text}", report)
        raise PreflightRefused(f"preflight failed: {text}", report)
    return report


def _client(tools: ClientTools, report: StatusReport) -> None:
    """pg_dump was found; a rollback needs pg_restore and psql from the same directory."""
    missing = missing_client_tools(tools)
    if missing:
        report.add(
            "client",
            FAIL,
            f"{', '.join(missing)} missing or not executable in {tools.bin_dir} "
            f"(pg_dump {tools.version} is there; install postgresql-client-{tools.major} "
            "or point --pg-bin-dir at a directory holding pg_dump, pg_restore and psql)",
            missing=missing,
        )
    else:
        report.add(
            "client", OK, f"pg_dump {tools.version} in {tools.bin_dir} (with pg_restore, psql)"
        )


def _privileges(conn: Any, dbname: str, report: StatusReport) -> None:
    privileges = role_privileges(conn)
    owner = owns_database(conn, dbname)
    parts = [
        f"{name}={'yes' if value else 'no'}"
        for name, value in (
            ("superuser", privileges["superuser"]),
            ("createdb", privileges["createdb"]),
            ("owner", owner),
            ("terminate backends", privileges["can_terminate"]),
        )
    ]
    swap_ready = privileges["createdb"] and (owner or privileges["superuser"])
    if swap_ready and privileges["can_terminate"]:
        report.add("privileges", OK, ", ".join(parts), **privileges, owner=owner)
    elif owner or privileges["superuser"]:
        report.add(
            "privileges",
            WARNING,
            ", ".join(parts) + " (swap rollback unavailable: use --strategy in-place)",
            **privileges,
            owner=owner,
        )
    else:
        report.add(
            "privileges",
            FAIL,
            ", ".join(parts) + " (the role must own the database or be superuser)",
            **privileges,
            owner=owner,
        )


def _revisions(target: Target, conn: Any, report: StatusReport, required: bool = False) -> None:
    alembic_config = target.alembic_config
    located = target.alembic_script_location is not None
    try:
        current = readable_revisions(conn)
    except UnreadableTable as exc:
        report.add("revision", FAIL, f"cannot check: {exc.reason} ({exc.hint})")
        return
    report.current_revision = ",".join(current) or None
    head: str | None = None
    unknown: list[str] = []
    if required and not alembic_config.exists() and not located:
        report.add(
            "alembic",
            FAIL,
            f"{alembic_config} not found (named by --alembic-config or "
            "DB_ROLLBACK_ALEMBIC_CONFIG; the head revision cannot be read)",
        )
    elif alembic_config.exists() or located:
        try:
            config = target_config(target)
        except RollbackError as exc:  # the file itself is malformed
            report.add("alembic", FAIL, exc.one_line())
            config = None
        try:
            if config is not None:
                script = script_directory(config)
                head = ",".join(script.get_heads()) or None
                unknown = [rev for rev in current if not known_revision(script, rev)]
        except RollbackError as exc:
            report.add("alembic", WARNING, exc.one_line())
        except (configparser.Error, UnicodeDecodeError, OSError) as exc:
            reason = " ".join(str(exc).split())[:200]
            report.add("alembic", FAIL, f"{alembic_config} cannot be read: {reason}")
    report.head_revision = head
    detail = f"current {report.current_revision or 'none'}"
    if head is not None:
        detail += f", head {head}"
    elif not alembic_config.exists() and not located:
        detail += " (head unknown)" if required else f" (no {alembic_config}: head unknown)"
    if unknown:
        # Usually newer code was deployed than the migrations checked out here.
        detail += f" (revision {','.join(unknown)} is not in {alembic_config}'s scripts)"
    report.add(
        "revision",
        OK if (current or head is None) and not unknown else WARNING,
        detail,
        current=report.current_revision,
        head=head,
    )


def _lock(conn: Any, dbname: str, report: StatusReport) -> None:
    holder = lock_holder(conn, dbname)
    if holder is None:
        report.add("lock", OK, "no rollback running")
    else:
        report.add("lock", FAIL, f"a rollback is running: {holder}")


def _sessions(conn: Any, dbname: str, report: StatusReport) -> None:
    rows = risky_sessions(conn, dbname, LONG_RUNNING_SECONDS)
    if not rows:
        report.add("sessions", OK, "no long-running or idle-in-transaction sessions")
        return
    described = ", ".join(
        f"pid {pid} {app or '?'} {state} {age}s" for pid, app, state, age in rows[:5]
    )
    report.add("sessions", WARNING, f"{len(rows)} session(s) may block a rollback: {described}")


def _kept_databases(conn: Any, dbname: str, report: StatusReport) -> None:
    kept = kept_databases(conn, dbname)
    if kept:
        candidate = undo_candidate(conn, dbname)
        undo = (
            f"`rollback undo` would swap back {candidate.name}"
            if candidate
            else "the one kept by the last rollback is gone: `rollback undo` would refuse"
        )
        report.add(
            "undo",
            INFO,
            f"{len(kept)} pre-rollback database(s) kept; {undo}",
            databases=[a.name for a in kept],
        )
