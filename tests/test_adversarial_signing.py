"""Adversarial suite: with a signing key configured, only backups whose manifest signature
checks out are used; a checksum alone proves integrity, not authorship."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rollback_cli.errors import ExitCode
from tests.rollback_helpers import Project

KEY = "k3y-for-tests-0123456789abcdef"
NEW_KEY = "n3w-key-for-tests-fedcba987654"


def manifest_of(backup: str) -> dict:
    return json.loads(Path(f"{backup}.json").read_text())


def rewrite(backup: str, change: dict) -> None:
    """What someone with write access to the storage can do: change the manifest (and the
    backup) and recompute the checksum."""
    manifest = manifest_of(backup)
    manifest.update(change)
    data = Path(backup).read_bytes()
    manifest["size"] = len(data)
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    Path(f"{backup}.json").write_text(json.dumps(manifest))


def test_backups_are_signed_and_verified(
    project15: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", KEY)
    backup = project15.backup()
    signature = manifest_of(backup)["signature"]
    assert signature.startswith("hmac-sha256:")
    assert KEY not in Path(f"{backup}.json").read_text()

    run, doc = project15.run_json("backup", "verify", backup)
    assert run.exit_code == 0, run.stderr
    checks = {c["check"]: c for c in doc["checks"]}
    assert checks["signature"]["detail"].startswith("signed by key")
    assert KEY not in run.stdout + run.stderr


@pytest.mark.parametrize(
    "attack",
    ["unsigned", "field-changed", "signature-from-other-key", "garbage-signature"],
)
def test_a_backup_not_signed_by_our_key_is_refused(
    project15: Project, monkeypatch: pytest.MonkeyPatch, attack: str
) -> None:
    if attack == "signature-from-other-key":
        monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", "an-attackers-own-key-0000000000")
    elif attack != "unsigned":
        monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", KEY)
    backup = project15.backup()
    if attack == "field-changed":
        rewrite(backup, {"environment": "staging", "label": "looks legitimate"})
    if attack == "garbage-signature":
        rewrite(backup, {"signature": "hmac-sha256:00000000:" + "0" * 64})
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", KEY)
    project15.db.execute("DELETE FROM orders")
    before = project15.data_fingerprint()

    for args in (
        ["backup", "verify", backup],
        ["backup", "verify", backup, "--restore-test"],
        ["--dry-run", "rollback", "data", "--backup-file", backup],
        ["rollback", "data", "--backup-file", backup],
    ):
        run = project15.run(*args)
        assert run.exit_code == ExitCode.BACKUP_INVALID, (args, run.stderr)
        assert "refused" in run.stderr or "unknown signature" in run.stderr
    assert project15.data_fingerprint() == before


def test_key_rotation_accepts_previous_keys(
    project15: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", KEY)
    old = project15.backup()
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", NEW_KEY)
    assert project15.run("backup", "verify", old).exit_code == ExitCode.BACKUP_INVALID
    monkeypatch.setenv("DB_ROLLBACK_PREVIOUS_SIGNING_KEYS", KEY)
    assert project15.run("backup", "verify", old).exit_code == 0
    new = project15.backup()
    assert (
        manifest_of(new)["signature"].split(":")[1] != manifest_of(old)["signature"].split(":")[1]
    )


def test_a_key_file_works_and_a_bad_one_is_a_configuration_error(
    project15: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"{NEW_KEY}\n{KEY}\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", KEY)
    old = project15.backup()
    monkeypatch.delenv("DB_ROLLBACK_SIGNING_KEY")
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY_FILE", str(key_file))
    assert project15.run("backup", "verify", old).exit_code == 0
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY_FILE", str(tmp_path / "missing"))
    run = project15.run("backup", "verify", old)
    assert run.exit_code == ExitCode.CONFIG, run.stderr
    monkeypatch.delenv("DB_ROLLBACK_SIGNING_KEY_FILE")
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", "short")
    assert project15.run("backup", "verify", old).exit_code == ExitCode.CONFIG


def test_without_a_key_a_superuser_restore_says_so_plainly(project15: Project) -> None:
    backup = project15.backup()
    run, doc = project15.run_json("--dry-run", "rollback", "data", "--backup-file", backup)
    assert run.exit_code == 0, run.stderr
    assert any("superuser rights" in w for w in doc["warnings"])
    assert any("superuser rights" in s["detail"] for s in doc["plan"])
