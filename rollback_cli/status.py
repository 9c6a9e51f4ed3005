"""``status``: the preflight a rollback needs, as a list of checks."""

from __future__ import annotations

import configparser
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rollback_cli import pg
from rollback_cli.errors import ConfigError, Refused, RollbackError
from rollback_cli.log import get_logger
from rollback_cli.restore import role_privileges

if TYPE_CHECKING:
    from rollback_cli.settings import Settings

LONG_RUNNING_SECONDS = 300


@dataclass
class StatusReport:
    checks: list[dict[str, Any]] = field(default_factory=list)
    current_revision: str | None = None
    head_revision: str | None = None

    def add(self, name: str, status: str, detail: str, **extra: Any) -> None:
        self.checks.append({"name": name, "status": status, "detail": detail, **extra})

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["status"] == "fail"]


def preflight(settings: Settings) -> StatusReport:
    """Run every check; raise when a rollback could not run (exit 3 or 7), else return."""
    import psycopg2

    logger = get_logger()
    report = StatusReport()
    conninfo = settings.conninfo()
    conn = pg.connect(conninfo)
    try:
        major = pg.server_major(conn)
        report.add(
            "connection",
            "ok",
            f"{conninfo.redacted_url()} (PostgreSQL {pg.server_version_text(conn)})",
        )
        try:
            tools = pg.find_client(major, settings.pg_bin_dir)
            report.add("client", "ok", f"pg_dump {tools.version} in {tools.bin_dir}")
        except RollbackError as exc:
            report.add("client", "fail", exc.one_line())
        checks: list[tuple[str, Callable[[], None]]] = [
            ("privileges", lambda: _privileges(conn, conninfo.dbname, report)),
            ("revision", lambda: _revisions(settings, conn, report)),
            ("lock", lambda: _lock(conn, conninfo.dbname, report)),
            ("sessions", lambda: _sessions(conn, conninfo.dbname, report)),
            ("undo", lambda: _kept_databases(conn, conninfo.dbname, report)),
        ]
        for name, run_check in checks:
            try:
                run_check()
            except psycopg2.Error as exc:
                # One unreadable catalog or table must not hide the other checks.
                report.add(name, "fail", f"cannot check: {pg.first_line(exc)}")
    finally:
        conn.close()
    for check in report.checks:
        logger.info("check", check=check["name"], status=check["status"], detail=check["detail"])
    failures = report.failures
    if failures:
        summary = "; ".join(f"{c['name']}: {c['detail']}" for c in failures)
        error: RollbackError = Refused(f"preflight failed: {summary}")
        if any(c["name"] in ("connection", "alembic") for c in failures):
            error = ConfigError(f"preflight failed: {summary}")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _privileges(conn: Any, dbname: str, report: StatusReport) -> None:
    privileges = role_privileges(conn)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database "
            "WHERE datname = %s",
            (dbname,),
        )
        row = cur.fetchone()
    owner = bool(row and row[0])
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
        report.add("privileges", "ok", ", ".join(parts), **privileges, owner=owner)
    elif owner or privileges["superuser"]:
        report.add(
            "privileges",
            "warning",
            ", ".join(parts) + " (swap rollback unavailable: use --strategy in-place)",
            **privileges,
            owner=owner,
        )
    else:
        report.add(
            "privileges",
            "fail",
            ", ".join(parts) + " (the role must own the database or be superuser)",
            **privileges,
            owner=owner,
        )


def _revisions(settings: Settings, conn: Any, report: StatusReport) -> None:
    current = pg.alembic_revisions(conn)
    report.current_revision = ",".join(current) or None
    head: str | None = None
    unknown: list[str] = []
    if settings.alembic_config.exists():
        from rollback_cli.schema import load_config, script_directory

        try:
            config = load_config(settings)
        except RollbackError as exc:  # the file itself is malformed
            report.add("alembic", "fail", exc.one_line())
            config = None
        try:
            if config is not None:
                script = script_directory(config)
                head = ",".join(script.get_heads()) or None
                unknown = [rev for rev in current if not _known_revision(script, rev)]
        except RollbackError as exc:
            report.add("alembic", "warning", exc.one_line())
        except (configparser.Error, UnicodeDecodeError, OSError) as exc:
            reason = " ".join(str(exc).split())[:200]
            report.add("alembic", "fail", f"{settings.alembic_config} cannot be read: {reason}")
    report.head_revision = head
    detail = f"current {report.current_revision or 'none'}"
    if head is not None:
        detail += f", head {head}"
    elif not settings.alembic_config.exists():
        detail += f" (no {settings.alembic_config}: head unknown)"
    if unknown:
        # Usually newer code was deployed than the migrations checked out here.
        detail += f" (revision {','.join(unknown)} is not in {settings.alembic_config}'s scripts)"
    report.add(
        "revision",
        "ok" if (current or head is None) and not unknown else "warning",
        detail,
        current=report.current_revision,
        head=head,
    )


def _known_revision(script: Any, revision: str) -> bool:
    from alembic.script.revision import RevisionError
    from alembic.util.exc import CommandError

    try:
        return script.get_revision(revision) is not None
    except (CommandError, RevisionError):
        return False


def _lock(conn: Any, dbname: str, report: StatusReport) -> None:
    from rollback_cli.lock import lock_holder

    holder = lock_holder(conn, dbname)
    if holder is None:
        report.add("lock", "ok", "no rollback running")
    else:
        report.add("lock", "fail", f"a rollback is running: {holder}")


def _sessions(conn: Any, dbname: str, report: StatusReport) -> None:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT pid, coalesce(application_name, ''), state,
                   extract(epoch FROM now() - xact_start)::int
            FROM pg_stat_activity
            WHERE datname = %s AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
              AND (state = 'idle in transaction' OR now() - xact_start > make_interval(secs => %s))
            ORDER BY xact_start
            """,
            (dbname, LONG_RUNNING_SECONDS),
        )
        rows = cur.fetchall()
    if not rows:
        report.add("sessions", "ok", "no long-running or idle-in-transaction sessions")
        return
    described = ", ".join(
        f"pid {pid} {app or '?'} {state} {age}s" for pid, app, state, age in rows[:5]
    )
    report.add("sessions", "warning", f"{len(rows)} session(s) may block a rollback: {described}")


def _kept_databases(conn: Any, dbname: str, report: StatusReport) -> None:
    from rollback_cli.artifacts import kept_databases

    kept = kept_databases(conn, dbname)
    if kept:
        newest = kept[0]
        report.add(
            "undo",
            "info",
            f"{len(kept)} pre-rollback database(s) kept; `rollback undo` would swap back {newest}",
            databases=kept,
        )
