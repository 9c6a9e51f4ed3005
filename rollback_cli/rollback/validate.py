"""Post-rollback validation: connectivity, revision, manifest row counts, SQL checks.

The operator's SQL checks run read-only, one transaction each, under a statement timeout
(``postgres.checks.run_read_only_check``); a dry run reads and parses them but runs none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rollback_cli.backups.catalog import locate, read_manifest
from rollback_cli.checks import INFO, Check, failures, summary
from rollback_cli.errors import OperationFailed, UsageError
from rollback_cli.log import get_logger, step
from rollback_cli.postgres.checks import (
    CHECK_TIMEOUT_MS,
    readable_revisions,
    readable_row_counts,
    run_read_only_check,
)
from rollback_cli.postgres.connection import connect

if TYPE_CHECKING:
    from rollback_cli.backups.manifest import Manifest
    from rollback_cli.settings import ConnInfo, StorageConfig, Target

_NAME = re.compile(r"^--\s*name:\s*(.+)$", re.IGNORECASE | re.MULTILINE)


@dataclass
class ValidationReport:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check.of(name, ok, detail))

    def plan(self, name: str, sql: str) -> None:
        """A check of the checks file that a dry run lists without running it."""
        text = " ".join(sql.split())
        self.checks.append(
            Check(
                name,
                INFO,
                f"planned, not run (dry run): {text[:200]}",
                {"planned": True, "sql": sql},
            )
        )

    @property
    def planned(self) -> list[Check]:
        return [c for c in self.checks if c.extra.get("planned")]

    @property
    def failures(self) -> list[Check]:
        return failures(self.checks)

    def summary(self) -> str:
        return summary(self.checks)


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
    dry_run: bool = False,
    check_timeout_ms: int = CHECK_TIMEOUT_MS,
) -> ValidationReport:
    """Run every check and return the report; the caller decides what a failure means.

    The checks file's queries run read-only with ``check_timeout_ms`` each; with
    ``dry_run`` they are read and parsed but only listed as planned. A table the role may
    not read raises ConfigError (exit 3)."""
    logger = get_logger()
    report = ValidationReport()
    checks = read_checks_file(checks_file) if checks_file else []
    with step("validate"):
        conn = connect(conninfo)
        try:
            report.add("connectivity", True, f"connected to {conninfo.dbname}")
            if expected_revisions is not None:
                revisions = readable_revisions(conn)
                ok = sorted(revisions) == sorted(expected_revisions)
                report.add(
                    "revision",
                    ok,
                    f"alembic_version {','.join(revisions) or 'none'}"
                    + ("" if ok else f", expected {','.join(expected_revisions) or 'none'}"),
                )
            if manifest is not None and manifest.has_data:
                counts = readable_row_counts(conn)
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
                if dry_run:
                    report.plan(name, sql)
                else:
                    report.add(name, *run_read_only_check(conn, sql, timeout_ms=check_timeout_ms))
        finally:
            conn.close()
    for check in report.checks:
        logger.info("validation check", check=check.name, ok=check.ok, detail=check.detail)
    return report


def validate(
    target: Target,
    storage: StorageConfig,
    *,
    backup_ref: str | None = None,
    expected_revision: str | None = None,
    checks_file: Path | None = None,
    dry_run: bool = False,
) -> list[Check]:
    """The checks of ``validate``: raises OperationFailed (exit 5) when one fails. A dry run
    lists the checks file's queries as planned (status info) instead of running them."""
    manifest = None
    if backup_ref:
        store, key = locate(storage, target.environment, backup_ref)
        try:
            manifest = read_manifest(store, key)
        finally:
            store.close()
    report = validate_database(
        target.conninfo,
        expected_revisions=[expected_revision] if expected_revision else None,
        manifest=manifest,
        checks_file=checks_file,
        dry_run=dry_run,
    )
    if report.failures:
        raise OperationFailed(f"validation failed: {report.summary()}")
    return report.checks
