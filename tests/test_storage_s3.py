"""Backups in S3, end to end against a real SeaweedFS server on loopback.

The story: a CI job backs up to ``s3://bucket/ci`` (objects under ``ci/staging/``), lists,
verifies and prunes its backups there, and rolls the database back from an ``s3://`` URI.
Then the ways it goes wrong: the server dies mid-upload, an object rots, the bucket, the
credentials or the endpoint are wrong.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollback_cli.errors import ConfigError
from rollback_cli.storage.base import sha256_file
from rollback_cli.storage.s3 import MiB, S3Storage
from tests.fixtures_s3 import SeaweedServer, free_ports
from tests.rollback_helpers import REV_TIER, Project, bulk_orders_sql, log_events
from tests.servers import TestDatabase

PREFIX = "ci"


@pytest.fixture
def project(
    database18: TestDatabase,
    alembic_project: Path,
    tmp_path: Path,
    cli_env: dict[str, str],
    s3_env: SeaweedServer,
    s3_bucket: str,
) -> Project:
    """The example project on PostgreSQL 18; AWS_* variables point at SeaweedFS."""
    proj = Project(database18, alembic_project, tmp_path / "work")
    proj.workdir.mkdir()
    proj.upgrade(REV_TIER)
    return proj


def s3_args(bucket: str, *extra: str) -> list[str]:
    return ["--storage", f"s3://{bucket}/{PREFIX}", *extra]


def object_keys(server: SeaweedServer, bucket: str) -> list[str]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = sorted(item["Key"] for page in pages for item in page.get("Contents", []))
    client.close()
    return keys


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("db-rollback: error:")]


def storage(bucket: str, **options: Any) -> S3Storage:
    """An S3Storage on the test bucket, configured from the AWS_* environment like the CLI."""
    return S3Storage(bucket, f"{PREFIX}/staging", **options)


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, MiB))
            handle.write(chunk)
            remaining -= len(chunk)
    return path


# --- the happy path ---------------------------------------------------------------------


def test_create_list_verify_cleanup_and_rollback_from_s3(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    args = s3_args(s3_bucket)
    result, created = project.run_json(*args, "backup", "create", "--label", "before deploy")
    assert result.exit_code == 0, result.stderr
    key = created["backup_key"]
    uri = created["backup_uri"]
    assert uri == f"s3://{s3_bucket}/{PREFIX}/staging/{key}"
    assert object_keys(s3_env, s3_bucket) == [
        f"{PREFIX}/staging/{key}",
        f"{PREFIX}/staging/{key}.json",
    ]
    # Without --keep-local nothing stays in the staging directory.
    assert not [p for p in project.backup_dir.iterdir() if p.name.startswith("backup_")]

    result, listed = project.run_json(*args, "backup", "list")
    assert result.exit_code == 0, result.stderr
    assert [(b["name"], b["location"], b["valid"]) for b in listed["backups"]] == [
        (key, "s3", True)
    ]
    assert listed["backups"][0]["uri"] == uri
    assert listed["backups"][0]["sha256"] == created["backup_sha256"]

    for ref in (key, uri):  # a storage key or a full URI
        result, verified = project.run_json(*args, "backup", "verify", ref)
        assert result.exit_code == 0, result.stderr
        assert {c["check"] for c in verified["checks"]} >= {"manifest", "size", "sha256"}
    # A full URI needs no --storage: the bucket and prefix come from the URI itself.
    result, verified = project.run_json("backup", "verify", uri)
    assert result.exit_code == 0, result.stderr
    assert verified["backup_uri"] == uri
    # The download went to a temp dir that is gone again.
    assert not list(project.backup_dir.glob(".tmp-*"))

    data_before = project.data_fingerprint()
    project.db.execute("DELETE FROM orders")
    assert project.data_fingerprint() != data_before
    result, rolled = project.run_json(*args, "rollback", "data", "--backup-file", uri)
    assert result.exit_code == 0, result.stderr
    assert project.data_fingerprint() == data_before
    assert rolled["backup_used"] == uri
    # The rollback's safety backup went to S3 as well.
    result, listed = project.run_json(*args, "backup", "list")
    names = [b["name"] for b in listed["backups"]]
    assert len(names) == 2 and key in names
    assert all(b["location"] == "s3" and b["valid"] for b in listed["backups"])

    # Retention: the dry run names what would go and removes nothing.
    result, dry = project.run_json(
        *args, "--dry-run", "backup", "cleanup", "--older-than", "0s", "--keep-last", "1"
    )
    assert result.exit_code == 0, result.stderr
    assert dry["removed"] == [key]
    assert f"{PREFIX}/staging/{key}" in object_keys(s3_env, s3_bucket)
    result, done = project.run_json(
        *args, "backup", "cleanup", "--older-than", "0s", "--keep-last", "1"
    )
    assert result.exit_code == 0, result.stderr
    assert done["removed"] == [key]
    remaining = object_keys(s3_env, s3_bucket)
    assert len(remaining) == 2
    assert not [k for k in remaining if key in k]


def test_keep_local_lists_both_locations(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    args = s3_args(s3_bucket, "--keep-local")
    result, created = project.run_json(*args, "backup", "create")
    assert result.exit_code == 0, result.stderr
    key = created["backup_key"]
    assert (project.backup_dir / key).is_file()
    assert (project.backup_dir / f"{key}.json").is_file()

    result, listed = project.run_json(*args, "backup", "list")
    assert result.exit_code == 0, result.stderr
    rows = sorted((b["name"], b["location"], b["valid"]) for b in listed["backups"])
    assert rows == [(key, "local", True), (key, "s3", True)]
    text = project.run(*args, "backup", "list")
    assert text.exit_code == 0, text.stderr
    assert "LOCATION" in text.stdout.splitlines()[0]

    # Retention applies to each location; --keep-last 0 lets both copies of the older backup
    # go, while the newest full backup of the database stays in each location.
    result, newer = project.run_json(*args, "backup", "create")
    assert result.exit_code == 0, result.stderr
    result, done = project.run_json(
        *args, "backup", "cleanup", "--older-than", "0s", "--keep-last", "0"
    )
    assert result.exit_code == 0, result.stderr
    assert done["removed"] == [key, key]
    remaining = {k.rsplit("/", 1)[-1] for k in object_keys(s3_env, s3_bucket)}
    assert remaining == {newer["backup_key"], f"{newer['backup_key']}.json"}
    assert not (project.backup_dir / key).exists()
    assert (project.backup_dir / newer["backup_key"]).is_file()


def test_multipart_upload_of_a_file_larger_than_the_part_size(
    s3_env: SeaweedServer, s3_bucket: str, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "backup_staging_20260101_000000.dump", 12 * MiB + 12345)
    digest = sha256_file(source)
    store = storage(s3_bucket, part_size=5 * MiB, max_concurrency=2)
    store.upload(source, source.name, sha256=digest)

    client = s3_env.client()
    head = client.head_object(
        Bucket=s3_bucket, Key=f"{PREFIX}/staging/{source.name}", ChecksumMode="ENABLED"
    )
    assert head["ContentLength"] == source.stat().st_size
    assert head["ETag"].endswith('-3"')  # 5 + 5 + 2.01 MiB
    assert head["ChecksumCRC32"].endswith("-3")  # composite, compared after the upload
    assert head["Metadata"]["sha256"] == digest
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    target = tmp_path / "downloaded.dump"
    store.download(source.name, target, sha256=digest)
    assert sha256_file(target) == digest
    store.close()
    client.close()


def test_directory_format_backup_round_trip(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    args = s3_args(s3_bucket, "--s3-storage-class", "STANDARD_IA")
    result, created = project.run_json(*args, "backup", "create", "--format", "directory")
    assert result.exit_code == 0, result.stderr
    key = created["backup_key"]
    assert key.endswith(".dir")
    keys = object_keys(s3_env, s3_bucket)
    assert f"{PREFIX}/staging/{key}/toc.dat" in keys  # one object per file of the directory
    assert f"{PREFIX}/staging/{key}.json" in keys

    client = s3_env.client()
    artifact = client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/staging/{key}/toc.dat")
    manifest = client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/staging/{key}.json")
    client.close()
    # The storage class reaches the artifacts; manifests stay readable in the default class.
    assert artifact.get("StorageClass") == "STANDARD_IA"
    assert manifest.get("StorageClass", "STANDARD") == "STANDARD"

    result, listed = project.run_json(*args, "backup", "list")
    assert [(b["name"], b["valid"]) for b in listed["backups"]] == [(key, True)]
    result, verified = project.run_json(*args, "backup", "verify", key)
    assert result.exit_code == 0, result.stderr
    assert {c["check"] for c in verified["checks"]} >= {"sha256", "readable"}


# --- when it goes wrong ------------------------------------------------------------------


def test_server_stopped_mid_upload_leaves_nothing_valid(
    project: Project, s3_env: SeaweedServer, s3_bucket: str, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "backup_staging_20260101_000000.dump", 40 * MiB)
    store = storage(
        s3_bucket, part_size=5 * MiB, max_concurrency=1, max_attempts=2, connect_timeout=1
    )
    client = s3_env.client()
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            store.upload(source, source.name, sha256=sha256_file(source))
            store.write_text(f"{source.name}.json", "{}")  # backup create's order
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=upload)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        s3_env.kill()  # as a crash would: mid-transfer
        worker.join(60)
        assert not worker.is_alive()
    finally:
        s3_env.start()
    store.close()

    assert len(failure) == 1 and isinstance(failure[0], ConfigError), failure
    message = failure[0].one_line()
    assert "S3 endpoint" in message and "\n" not in message
    assert s3_env.secret_key not in message and s3_env.access_key not in message

    # The server is back: no backup is listed, only an unfinished multipart upload is left.
    args = s3_args(s3_bucket)
    result, listed = project.run_json(*args, "backup", "list")
    assert result.exit_code == 0, result.stderr
    assert listed["backups"] == []
    assert object_keys(s3_env, s3_bucket) == []
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    # cleanup-artifacts: uploads younger than --temp-older-than stay (they may be running).
    result, report = project.run_json(*args, "cleanup-artifacts")
    assert result.exit_code == 0, result.stderr
    assert report["files"] == []
    stale = f"{source.name} (unfinished upload)"
    result, report = project.run_json(
        *args, "--dry-run", "cleanup-artifacts", "--temp-older-than", "0s"
    )
    assert result.exit_code == 0, result.stderr
    assert report["files"] == [stale]
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    result, report = project.run_json(*args, "cleanup-artifacts", "--temp-older-than", "0s")
    assert result.exit_code == 0, result.stderr
    assert report["files"] == [stale]
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    client.close()


def test_corrupted_object_is_caught_before_restore(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    args = s3_args(s3_bucket)
    result, created = project.run_json(*args, "backup", "create")
    assert result.exit_code == 0, result.stderr
    object_key = f"{PREFIX}/staging/{created['backup_key']}"
    # Bit rot: same size, same metadata, one byte flipped.
    client = s3_env.client()
    stored = client.get_object(Bucket=s3_bucket, Key=object_key)
    body = bytearray(stored["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(
        Bucket=s3_bucket, Key=object_key, Body=bytes(body), Metadata=stored["Metadata"]
    )
    client.close()

    project.db.execute("DELETE FROM orders")
    broken = project.data_fingerprint()
    databases = project.databases()
    result = project.run(*args, "rollback", "data", "--backup-file", created["backup_uri"])
    assert result.exit_code == 4, result.stderr
    (line,) = error_lines(result.stderr)
    assert "checksum" in line
    assert project.data_fingerprint() == broken  # nothing was restored
    assert not [d for d in project.databases() if d not in databases and "_rb_" in d]
    assert not list(project.backup_dir.glob(".tmp-*"))

    result = project.run(*args, "backup", "verify", created["backup_key"])
    assert result.exit_code == 4
    assert "checksum" in error_lines(result.stderr)[0]


def test_sse_parameters_reach_the_server(
    project: Project, s3_env: SeaweedServer, s3_bucket: str, tmp_path: Path
) -> None:
    # SeaweedFS stores SSE-S3 and SSE-KMS and reports them on HEAD, like S3 does. For KMS it
    # reports the key id its local KMS resolved the alias to, not the alias sent.
    result, created = project.run_json(
        *s3_args(s3_bucket, "--s3-sse", "AES256"), "backup", "create"
    )
    assert result.exit_code == 0, result.stderr
    client = s3_env.client()
    for suffix in ("", ".json"):  # the dump and its manifest
        head = client.head_object(
            Bucket=s3_bucket, Key=f"{PREFIX}/staging/{created['backup_key']}{suffix}"
        )
        assert head["ServerSideEncryption"] == "AES256"

    source = random_file(tmp_path / "backup_staging_20260101_000000.dump", 11 * MiB)
    store = storage(s3_bucket, sse="aws:kms", kms_key_id=s3_env.kms_key_id, part_size=5 * MiB)
    store.upload(source, source.name)  # multipart: SSE travels on CreateMultipartUpload
    head = client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/staging/{source.name}")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"]
    assert head["ETag"].endswith('-3"')
    # Encrypted objects read back through the same checked download.
    store.download(source.name, tmp_path / "back.dump", sha256=sha256_file(source))
    store.close()
    client.close()


def test_credentials_never_reach_logs_or_output(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    args = s3_args(s3_bucket, "--log-level", "debug")
    created = project.run(*args, "backup", "create")
    listed = project.run(*args, "backup", "list")
    assert created.exit_code == 0 and listed.exit_code == 0, created.stderr
    log_text = "".join(p.read_text() for p in project.log_dir.glob("*.log"))
    assert "botocore" in log_text  # the SDK's debug output is in there...
    for output in (created.stdout, created.stderr, listed.stdout, listed.stderr, log_text):
        assert s3_env.secret_key not in output  # ...but never the keys
        assert s3_env.access_key not in output
    assert not [e for e in log_events(project) if "aws_secret_access_key" in json.dumps(e)]


# --- configuration errors: one line, exit 3 ----------------------------------------------


@pytest.fixture
def no_retries(monkeypatch: pytest.MonkeyPatch, s3_env: SeaweedServer) -> Iterator[None]:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    yield


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-bucket", "does not exist"),
        ("wrong-secret", "signature"),
        ("unknown-key", "access key id"),
        ("wrong-endpoint", "cannot connect to the S3 endpoint"),
        ("no-credentials", "no usable AWS credentials"),
    ],
)
def test_configuration_errors_exit_3_with_one_line(
    project: Project,
    s3_env: SeaweedServer,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    no_retries: None,
    case: str,
    expected: str,
) -> None:
    bucket = s3_bucket
    if case == "missing-bucket":
        bucket = "no-such-bucket-here"
    elif case == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 20)
    elif case == "unknown-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN0000000000")
    elif case == "wrong-endpoint":
        (port,) = free_ports(1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    else:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    for command in (["backup", "list"], ["backup", "create"]):
        result = project.run(*s3_args(bucket), *command)
        assert result.exit_code == 3, (command, result.stderr)
        (line,) = error_lines(result.stderr)
        assert expected in line.lower() or expected in line, line
        assert "Traceback" not in result.stderr
        assert s3_env.secret_key not in result.stderr
        assert not list(project.backup_dir.glob("backup_*"))

    # --log-level debug adds the trace to the log, not to the one-line message.
    result = project.run(*s3_args(bucket, "--log-level", "debug"), "backup", "list")
    assert result.exit_code == 3
    assert len(error_lines(result.stderr)) == 1
    if case != "no-credentials":
        debug = [e for e in log_events(project) if e.get("event") == "s3 request failed"]
        assert debug and debug[-1].get("exception")


# --- the dump streamed while pg_dump writes it ------------------------------------------


def test_backup_create_streams_the_dump_and_it_round_trips(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    """A custom-format dump to S3 goes up while pg_dump writes it (no upload afterwards);
    the object has no sha256 metadata (the manifest holds it) and verifies and restores."""
    project.db.execute(bulk_orders_sql(400_000))  # a dump of more than one 16 MiB part
    args = s3_args(s3_bucket)
    result, created = project.run_json(*args, "backup", "create", "--compress", "none")
    assert result.exit_code == 0, result.stderr
    events = log_events(project)
    dump = [e for e in events if e.get("event") == "step started" and e.get("step") == "dump"]
    assert dump and dump[-1]["streamed"] is True
    assert any(e.get("event") == "s3 upload" and e.get("streamed") for e in events)
    key = created["backup_uri"].split(f"s3://{s3_bucket}/", 1)[1]
    client = s3_env.client()
    head = client.head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == created["backup_size"]
    assert "sha256" not in head.get("Metadata", {})
    client.close()

    name = created["backup_uri"].rpartition("/")[2]
    verified = project.run(*args, "backup", "verify", name, "--restore-test")
    assert verified.exit_code == 0, verified.stderr
    project.db.execute("DELETE FROM orders")
    rolled = project.run(*args, "rollback", "data", "--backup-file", name)
    assert rolled.exit_code == 0, rolled.stderr
    assert project.db.query("SELECT count(*) FROM orders")[0][0] >= 400_000


def test_a_dump_that_fails_while_streaming_leaves_no_object_and_no_upload(
    project: Project, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    """pg_dump gives up on a locked table mid-stream: the multipart upload is aborted,
    nothing is listed, nothing is left to clean up."""
    import psycopg2

    project.db.execute(bulk_orders_sql(100_000))
    holder = psycopg2.connect(project.db.url)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        result = project.run(*s3_args(s3_bucket), "backup", "create", "--lock-timeout", "200ms")
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 5, result.stderr
    client = s3_env.client()
    assert object_keys(s3_env, s3_bucket) == []
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    client.close()
