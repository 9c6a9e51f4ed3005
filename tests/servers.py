"""The test suite's PostgreSQL servers; they live in ``devtools/postgres.py``.

Re-exported here so the test modules keep importing them from ``tests.servers``. The script
is ``python -m devtools.postgres``.
"""

from __future__ import annotations

from devtools.postgres import (
    DEFAULT_PASSWORD,
    ClusterError,
    PostgresCluster,
    TestDatabase,
    debian_bin_dir,
    embedded_bin_dir,
    free_port,
    server_major,
    temporary_database,
)

__all__ = [
    "DEFAULT_PASSWORD",
    "ClusterError",
    "PostgresCluster",
    "TestDatabase",
    "debian_bin_dir",
    "embedded_bin_dir",
    "free_port",
    "server_major",
    "temporary_database",
]
