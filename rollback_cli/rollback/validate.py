"""Post-rollback validation: connectivity, revision, manifest row counts, SQL checks.

The operator's SQL checks run read-only, one transaction each, under a statement timeout
(``postgres.checks.run_read_only_check``); a dry run reads and parses them but runs none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from rollback_cli.rollback.migrations import script_directory, target_config

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

    def document(self) -> dict[str, Any]:
        """What ``validate --json`` prints: every check, failing first."""
        ordered = [c for c in self.checks if not c.ok] + [c for c in self.checks if c.ok]
        return {"validation": [c.to_dict() for c in ordered]}


class ValidationFailed(OperationFailed):
    """A validation check failed (exit 5); ``report`` holds every check that ran."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report

    @property
    def document(self) -> dict[str, Any]:
        return self.report.document()


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
    match_prefix: bool = False,
) -> ValidationReport:
    """Run every check and return the report; the caller decides what a failure means.

    The checks file's queries run read-only with ``check_timeout_ms`` each; with
    ``dry_run`` they are read and parsed but only listed as planned. A table the role may
    not read raises ConfigError (exit 3). ``match_prefix``: an expected revision that is a
    unique partial id of the database's revision (4 characters or more) matches it."""
    logger = get_logger()
    report = ValidationReport()
    checks = read_checks_file(checks_file) if checks_file else []
    with step("validate"):
        conn = connect(conninfo)
        try:
            report.add("connectivity", True, f"connected to {conninfo.dbname}")
            if expected_revisions is not None:
                revisions = readable_revisions(conn)
                if match_prefix:
                    expected_revisions = _match_prefixes(expected_revisions, revisions)
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


#: Alembic's shortest partial revision id; shorter prefixes are never matched
MIN_PARTIAL_REVISION = 4


def resolve_expected_revision(target: Target, revision: str) -> str:
    """The full id of ``revision`` (a partial id is allowed, as for ``rollback schema``),
    read from the project's Alembic scripts when there are any. An ambiguous partial id is
    a usage error (exit 2); one the scripts do not know is returned as given, to be matched
    against the database's revision by :func:`validate_database`."""
    from alembic.script.revision import RevisionError
    from alembic.util.exc import CommandError

    if target.alembic_script_location is None and not target.alembic_config.is_file():
        return revision
    script = script_directory(target_config(target))
    try:
        found = script.get_revision(revision)
    except (CommandError, RevisionError) as exc:
        reason = " ".join(str(exc).split())
        if "multiple" in reason.lower():
            raise UsageError(
                f"ambiguous revision {revision!r}: {reason}; give more characters"
            ) from None
        return revision
    return found.revision if found is not None else revision


def _match_prefixes(expected: list[str], revisions: list[str]) -> list[str]:
    """``expected`` with each partial id that is a unique prefix of one of the database's
    ``revisions`` replaced by that revision (for a project without Alembic scripts here)."""
    resolved = []
    for wanted in expected:
        matches = [r for r in revisions if r.startswith(wanted)]
        unique = wanted not in revisions and len(wanted) >= MIN_PARTIAL_REVISION
        resolved.append(matches[0] if unique and len(matches) == 1 else wanted)
    return resolved


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
    if expected_revision is not None and not expected_revision.strip():
        raise UsageError("--expect-revision must not be empty")
    report = validate_database(
        target.conninfo,
        expected_revisions=(
            [resolve_expected_revision(target, expected_revision)] if expected_revision else None
        ),
        manifest=manifest,
        checks_file=checks_file,
        dry_run=dry_run,
        match_prefix=True,
    )
    if report.failures:
        raise ValidationFailed(f"validation failed: {report.summary()}", report)
    return report.checks
