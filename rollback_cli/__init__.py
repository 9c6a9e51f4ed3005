"""db-rollback: safe PostgreSQL backups and rollbacks around deployments.

The Python API is :mod:`rollback_cli.api`; its functions and types are also available
here (``from rollback_cli import rollback_data, Target``), loaded on first use so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: the Python API (rollback_cli.api); importable from here too, loaded on first use
API = (
    "ArtifactsCleaned",
    "BackupCreated",
    "BackupListing",
    "BackupRequest",
    "BackupVerified",
    "BackupsCleaned",
    "DrillResult",
    "RollbackOptions",
    "RollbackResult",
    "RunOptions",
    "StatusResult",
    "StorageConfig",
    "Target",
    "Timeouts",
    "ValidationResult",
    "backup_cleanup",
    "backup_create",
    "backup_list",
    "backup_verify",
    "cleanup_artifacts",
    "drill",
    "rollback_data",
    "rollback_full",
    "rollback_schema",
    "rollback_undo",
    "status",
    "validate",
)
__all__ = ["API", "RollbackError", "__version__", *API]


def __getattr__(name: str) -> Any:
    if name == "RollbackError":
        return importlib.import_module("rollback_cli.errors").RollbackError
    if name in API:
        return getattr(importlib.import_module("rollback_cli.api"), name)
    raise AttributeError(f"module 'rollback_cli' has no attribute {name!r}")
