"""Pytest fixtures for a real S3 server: SeaweedFS (``devtools.s3``), on loopback.

``s3_server``, ``s3_bucket`` and ``s3_env`` are loaded from ``tests/conftest.py`` through
``pytest_plugins``. The server class itself lives in ``devtools/s3.py`` so that benchmarks
can start one outside pytest.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest

from devtools.s3 import SeaweedServer, empty_bucket, free_ports

# Re-exported for the test modules that import them from here.
__all__ = ["SeaweedServer", "empty_bucket", "free_ports", "s3_bucket", "s3_env", "s3_server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS server for the whole test session."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedServer) -> Iterator[str]:
    """A fresh, empty bucket; removed with its contents afterwards."""
    client = s3_server.client()
    name = "test-" + uuid.uuid4().hex[:16]
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        try:
            empty_bucket(client, name)
            client.delete_bucket(Bucket=name)
        except Exception as exc:  # teardown must not hide the test's result
            print(f"could not remove bucket {name}: {exc}", file=sys.stderr)
        client.close()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedServer) -> SeaweedServer:
    """Point the standard AWS credential chain at ``s3_server`` for one test."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
    ):
        monkeypatch.delenv(name, raising=False)
    # Keep the developer's ~/.aws and instance metadata out of the test.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
