"""The storage interface and the local backend, on real files (no servers needed)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rollback_cli.backups.catalog import cleanup_backups, fetched, list_backups, read_manifest
from rollback_cli.backups.manifest import Manifest, manifest_key
from rollback_cli.errors import BackupError, ConfigError, UsageError
from rollback_cli.files import TEMP_PREFIX, writing_in
from rollback_cli.settings import StorageConfig
from rollback_cli.storage import open_storage
from rollback_cli.storage.base import sha256_artifact, sha256_file, sha256_tree
from rollback_cli.storage.local import LocalStorage
from rollback_cli.storage.s3 import (
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    MiB,
    choose_part_size,
    resolve_sse,
)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def manifest_for(path: Path, created: datetime, environment: str = "staging") -> Manifest:
    return Manifest(
        file_name=path.name,
        size=path.stat().st_size,
        sha256=sha256_artifact(path),
        created_at=created.isoformat(),
        environment=environment,
        database="app",
        host="127.0.0.1",
        server_version="18.0",
        pg_dump_version="18.0",
        type="full",
        format="custom",
        compression=None,
        alembic_revisions=["b7e2f5a91c38"],
        row_counts={},
        tool_version="test",
        label=None,
    )


def store_backup(
    storage: LocalStorage, source: Path, created: datetime, environment: str = "staging"
) -> str:
    """What backup create does: the artifact first, its manifest last."""
    storage.upload(source, source.name, sha256=sha256_artifact(source))
    storage.write_text(
        manifest_key(source.name), manifest_for(source, created, environment).to_json()
    )
    return source.name


# --- the local backend ---------------------------------------------------------------------


def test_upload_download_stat_delete_a_file(tmp_path: Path) -> None:
    source = write(tmp_path / "src" / "backup_staging_20260101_000000.dump", os.urandom(3000))
    storage = LocalStorage(tmp_path / "store")
    storage.upload(source, source.name, sha256=sha256_file(source))

    stored = storage.stat(source.name)
    assert stored is not None and stored.size == 3000 and not stored.is_dir
    assert (storage.root / source.name).stat().st_mode & 0o777 == 0o600
    assert storage.root.stat().st_mode & 0o777 == 0o700
    assert [o.key for o in storage.list_objects()] == [source.name]
    assert storage.uri(source.name) == (storage.root / source.name).resolve().as_uri()

    target = tmp_path / "copy.dump"
    storage.download(source.name, target, sha256=sha256_file(source))
    assert target.read_bytes() == source.read_bytes()

    storage.delete(source.name)
    storage.delete(source.name)  # missing is fine
    assert storage.stat(source.name) is None
    with pytest.raises(FileNotFoundError):
        storage.download(source.name, tmp_path / "gone.dump")


def test_directory_backups_are_one_object(tmp_path: Path) -> None:
    source = tmp_path / "backup_staging_20260101_000000.dir"
    write(source / "toc.dat", b"toc")
    write(source / "3001.dat.gz", b"x" * 100)
    storage = LocalStorage(tmp_path / "store")
    storage.upload(source, source.name, sha256=sha256_tree(source))
    (stored,) = storage.list_objects()
    assert stored.is_dir and stored.size == 103
    storage.download(source.name, tmp_path / "copy.dir", sha256=sha256_tree(source))
    assert sha256_tree(tmp_path / "copy.dir") == sha256_tree(source)
    storage.delete(source.name)
    assert storage.list_objects() == []


def test_checksum_mismatch_leaves_nothing_behind(tmp_path: Path) -> None:
    source = write(tmp_path / "backup_staging_20260101_000000.dump", b"dump bytes")
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(BackupError, match="checksum"):
        storage.upload(source, source.name, sha256="0" * 64)
    assert list(storage.root.iterdir()) == []

    storage.upload(source, source.name)
    target = tmp_path / "copy.dump"
    with pytest.raises(BackupError, match="checksum"):
        storage.download(source.name, target, sha256="0" * 64)
    assert not target.exists()
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_write_text_is_atomic_and_private(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.write_text("backup_x.dump.json", '{"a": 1}')
    storage.write_text("backup_x.dump.json", '{"a": 2}')
    assert storage.read_text("backup_x.dump.json") == '{"a": 2}'
    assert (storage.root / "backup_x.dump.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in storage.root.iterdir()] == ["backup_x.dump.json"]


def test_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(ConfigError, match="outside"):
        storage.stat("../etc/passwd")


def test_cleanup_incomplete_removes_only_stale_temp_files(tmp_path: Path) -> None:
    """While a run writes in the directory (it holds the writers lock), only temp files past
    the cutoff go; once no run writes there, every temp file is a dead run's and goes."""
    storage = LocalStorage(tmp_path)
    stale = write(tmp_path / f"{TEMP_PREFIX}backup_old.dump", b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    running = write(tmp_path / f"{TEMP_PREFIX}backup_running.dump", b"partial")
    write(tmp_path / "backup_done.dump", b"whole")

    assert [o.key for o in storage.list_objects()] == ["backup_done.dump"]
    with writing_in(tmp_path):  # a run is writing
        assert storage.cleanup_incomplete(3600, dry_run=True) == [stale.name]
        assert stale.exists()
        assert storage.cleanup_incomplete(3600) == [stale.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            running.name,
            "backup_done.dump",
        ]
    # The run died without removing its temp file: nothing writes here any more.
    assert storage.cleanup_incomplete(3600) == [running.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup_done.dump"]


# --- catalog over the interface ----------------------------------------------------------


def test_list_marks_backups_without_a_valid_manifest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    now = datetime.now(timezone.utc)
    good = store_backup(
        storage, write(tmp_path / "backup_staging_20260101_000000.dump", b"a" * 10), now
    )
    # An interrupted store: the artifact arrived, its manifest never did.
    storage.upload(
        write(tmp_path / "backup_staging_20260102_000000.dump", b"b"),
        "backup_staging_20260102_000000.dump",
    )
    entries = {e.key: e for e in list_backups(storage)}
    assert entries[good].valid and entries[good].location == "local"
    assert entries["backup_staging_20260102_000000.dump"].problem == "no manifest"
    assert read_manifest(storage, good).sha256 == sha256_file(tmp_path / good)


def test_remote_storage_lists_its_staging_directory_too(tmp_path: Path) -> None:
    """``staging`` is how a remote backend shows --keep-local copies; a second local
    directory stands in for the remote here (the S3 tests cover the real one)."""
    remote = LocalStorage(tmp_path / "remote")
    remote.location = "remote"
    remote.staging = tmp_path / "staging"
    staged = LocalStorage(tmp_path / "staging")
    now = datetime.now(timezone.utc)
    source = write(tmp_path / "backup_staging_20260101_000000.dump", b"dump")
    store_backup(remote, source, now)
    store_backup(staged, source, now)
    rows = sorted((e.key, e.location, e.valid) for e in list_backups(remote))
    assert rows == [(source.name, "local", True), (source.name, "remote", True)]


def test_cleanup_keeps_newest_per_location_and_dry_run_changes_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    now = datetime.now(timezone.utc)
    keys = [
        store_backup(
            storage,
            write(tmp_path / f"backup_staging_2026010{day}_000000.dump", bytes([day]) * 5),
            now - timedelta(days=10 - day),
        )
        for day in (1, 2, 3)
    ]
    other_env = store_backup(
        storage,
        write(tmp_path / "backup_production_20260101_000000.dump", b"prod"),
        now - timedelta(days=30),
        environment="production",
    )
    dry = cleanup_backups(
        storage, environment="staging", older_than_seconds=86400, keep_last=1, dry_run=True
    )
    assert sorted(e.key for e in dry.removed) == keys[:2]
    assert len(storage.list_objects()) == 8

    done = cleanup_backups(storage, environment="staging", older_than_seconds=86400, keep_last=1)
    assert sorted(e.key for e in done.removed) == keys[:2]
    assert sorted(o.key for o in storage.list_objects()) == sorted(
        [keys[2], manifest_key(keys[2]), other_env, manifest_key(other_env)]
    )


def test_fetched_uses_local_backups_in_place(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    source = write(tmp_path / "backup_staging_20260101_000000.dump", b"dump")
    key = store_backup(storage, source, datetime.now(timezone.utc))
    with fetched(storage, key, read_manifest(storage, key)) as local:
        assert local == (storage.root / key).resolve()


# --- choosing a backend and its parameters ------------------------------------------------


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    default = open_storage(StorageConfig(backup_dir=tmp_path / "b"), "staging")
    assert isinstance(default, LocalStorage) and default.root == tmp_path / "b"
    file_uri = open_storage(StorageConfig(storage=f"file://{tmp_path}/x"), "staging")
    assert isinstance(file_uri, LocalStorage) and file_uri.root == tmp_path / "x"
    with pytest.raises(UsageError, match="unsupported storage"):
        open_storage(StorageConfig(storage="ftp://host/dir"), "staging")
    with pytest.raises(UsageError, match="no credentials"):
        open_storage(StorageConfig(storage="s3://KEY:SECRET@bucket/prefix"), "staging")


@pytest.mark.parametrize("size", [0, 1, 100 * MiB, 80 * 1024 * MiB, 5 * 1024**4])
def test_part_size_fits_s3_part_limit(size: int) -> None:
    part = choose_part_size(size)
    assert MIN_PART_SIZE <= part <= MAX_PART_SIZE
    assert part % MiB == 0
    assert -(-size // part) <= 10_000  # 5 TB, S3's largest object, fits too


def test_server_side_encryption_settings() -> None:
    assert resolve_sse(None, None) == (None, None)
    assert resolve_sse("aes256", None) == ("AES256", None)
    assert resolve_sse(None, "key-1") == ("aws:kms", "key-1")
    assert resolve_sse("aws:kms", "key-1") == ("aws:kms", "key-1")
    with pytest.raises(UsageError):
        resolve_sse("AES256", "key-1")
    with pytest.raises(UsageError):
        resolve_sse("rot13", None)
