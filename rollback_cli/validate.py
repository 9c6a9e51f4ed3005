"""Post-rollback validation: connectivity, revision, manifest row counts, SQL checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollback_cli import pg
from rollback_cli.errors import UsageError
from rollback_cli.log import get_logger, step

if TYPE_CHECKING:
    from rollback_cli.manifest import Manifest
    from rollback_cli.settings import ConnInfo

_NAME = re.compile(r"^--\s*name:\s*(.+)$", re.IGNORECASE | re.MULTILINE)


@dataclass
class ValidationReport:
    checks: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": ok, "detail": detail})

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["ok"]]

    def summary(self) -> str:
        return "; ".join(f"{c['check']}: {c['detail']}" for c in self.failures)


def read_checks_file(path: Path) -> list[tuple[str, str]]:
    """SQL checks separated by ';', each returning one boolean; '-- name: X' names one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read checks file {path}: {exc.strerror}") from None
    checks = []
    for number, chunk in enumerate((c for c in text.split(";") if c.strip()), 1):
        match = _NAME.search(chunk)
        body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--"))
        if body.strip():
            checks.append((match.group(1).strip() if match else f"check {number}", body.strip()))
    if not checks:
        raise UsageError(f"checks file {path} holds no SQL")
    return checks


def validate_database(
    conninfo: ConnInfo,
    *,
    expected_revisions: list[str] | None = None,
    manifest: Manifest | None = None,
    checks_file: Path | None = None,
) -> ValidationReport:
    """Run every check and return the report; the caller decides what a failure means."""
    logger = get_logger()
    report = ValidationReport()
    checks = read_checks_file(checks_file) if checks_file else []
    with step("validate"):
        conn = pg.connect(conninfo)
        try:
            report.add("connectivity", True, f"connected to {conninfo.dbname}")
            revisions = pg.alembic_revisions(conn)
            if expected_revisions is not None:
                ok = sorted(revisions) == sorted(expected_revisions)
                report.add(
                    "revision",
                    ok,
                    f"alembic_version {','.join(revisions) or 'none'}"
                    + ("" if ok else f", expected {','.join(expected_revisions) or 'none'}"),
                )
            if manifest is not None and manifest.has_data:
                counts = pg.table_row_counts(conn)
                diffs = [
                    f"{table}: {counts.get(table, 'missing')} rows, manifest {expected}"
                    for table, expected in sorted(manifest.row_counts.items())
                    if counts.get(table) != expected
                ]
                report.add(
                    "row counts",
                    not diffs,
                    "; ".join(diffs[:5])
                    if diffs
                    else f"{len(manifest.row_counts)} tables match the manifest",
                )
            for name, sql in checks:
                report.add(name, *_run_check(conn, sql))
        finally:
            conn.close()
    for check in report.checks:
        logger.info(
            "validation check", check=check["check"], ok=check["ok"], detail=check["detail"]
        )
    return report


def _run_check(conn: Any, sql: str) -> tuple[bool, str]:
    import psycopg2

    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
    except psycopg2.Error as exc:
        conn.rollback() if not conn.autocommit else None
        return False, f"query failed: {str(exc).strip().splitlines()[0]}"
    if row is None or len(row) != 1 or not isinstance(row[0], bool):
        return False, f"expected one boolean, got {row!r}"
    return bool(row[0]), "true" if row[0] else "returned false"
