"""db-rollback: safe PostgreSQL backups and rollbacks around deployments."""

from __future__ import annotations

__version__ = "0.1.0"
