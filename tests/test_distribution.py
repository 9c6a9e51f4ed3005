"""Distribution: the composite action, the workflows, the Dockerfile and the usage docs.

Linting runs the real tools, offline: check-jsonschema's built-in GitHub schemas, actionlint
(inside this checkout, so `uses: ./` resolves to action.yml) and hadolint.

The action's shell glue runs for real: every `run:` step of action.yml is executed with bash
the way the runner would, with the step's `env:` expressions filled from the inputs, stand-in
GITHUB_OUTPUT / GITHUB_STEP_SUMMARY / GITHUB_ENV files, and the python runtime using this
checkout's db-rollback, against the test PostgreSQL servers. The `uses:` step
(actions/upload-artifact) is not run; its `if:` and `with:` are checked against the outputs
the run step wrote.

The image build itself is not part of the suite: scripts/image-test.sh builds and runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.servers import TestDatabase

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTION_FILE = REPO_ROOT / "action.yml"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
USAGE_DOC = REPO_ROOT / "README.md"
WORKFLOWS = sorted(
    [*(REPO_ROOT / ".github" / "workflows").glob("*.yml")],
) + sorted((REPO_ROOT / "examples" / "workflows").glob("*.yml"))
BIN_DIR = Path(sys.executable).parent
HEAD_REVISION = "e41c0d7f6a95"
SEEDED_REVISION = "8d4b6a0c9e12"
PASSWORD_MARKERS = ("s3cr3t", "Pa55w0rd")


def load_yaml(path_or_text: Path | str) -> Any:
    text = path_or_text.read_text("utf-8") if isinstance(path_or_text, Path) else path_or_text
    return YAML(typ="safe", pure=True).load(text)


def tool(name: str) -> str:
    """A lint tool from this venv (its dev extras ship them as wheels), else from PATH."""
    candidate = BIN_DIR / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'", pytrace=False)
    return found


def run_tool(*argv: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------- linting


def test_action_matches_the_github_actions_schema() -> None:
    result = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", str(ACTION_FILE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_workflows_to_check() -> None:
    names = {path.relative_to(REPO_ROOT).as_posix() for path in WORKFLOWS}
    assert {
        ".github/workflows/ci.yml",
        ".github/workflows/release.yml",
        ".github/workflows/rollback.yml",
        "examples/workflows/deploy-with-rollback.yml",
    } <= names


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_workflow_matches_the_github_workflows_schema(workflow: Path) -> None:
    result = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_passes_on_every_workflow() -> None:
    # Run inside the checkout: actionlint reads action.yml for `uses: ./` and checks its
    # inputs, and shellchecks every run: script when shellcheck is installed.
    files = [str(path.relative_to(REPO_ROOT)) for path in WORKFLOWS]
    result = run_tool(tool("actionlint"), "-no-color", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = run_tool(tool("hadolint"), str(DOCKERFILE.relative_to(REPO_ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_follows_the_contract() -> None:
    text = DOCKERFILE.read_text("utf-8")
    stages = re.findall(r"^FROM\s+\$\{BASE_IMAGE\}\s+AS\s+(\w+)", text, re.MULTILINE)
    assert stages == ["builder", "runtime"]
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim-bookworm$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["db-rollback"]' in text
    assert re.search(r"^WORKDIR /work$", text, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert "pip install /tmp/wheels/*.whl" in text
    for label in ("title", "source", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    dockerignore = (REPO_ROOT / ".dockerignore").read_text("utf-8").splitlines()
    assert dockerignore[dockerignore.index("*") :][:3] == ["*", "!pyproject.toml", "!README.md"]


# ------------------------------------------------------------------------------ usage docs


def yaml_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```ya?ml\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def test_usage_doc_yaml_blocks_are_valid_workflows(tmp_path: Path) -> None:
    blocks = yaml_blocks(USAGE_DOC.read_text("utf-8"))
    assert len(blocks) >= 2, "the README should show a workflow step and a rollback workflow"
    # A throwaway repository holding the blocks as workflows, so actionlint checks them the
    # way it checks this repository's own (the action is referenced as opssight/db-rollback).
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    workflow_dir = tmp_path / ".github" / "workflows"
    workflow_dir.mkdir(parents=True)
    files = []
    for number, block in enumerate(blocks, start=1):
        doc = load_yaml(block)
        assert isinstance(doc, dict) and "jobs" in doc, f"yaml block {number} is not a workflow"
        target = workflow_dir / f"usage-{number}.yml"
        target.write_text(block, "utf-8")
        files.append(str(target))
    result = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_tool(tool("actionlint"), "-no-color", *files, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_usage_doc_uses_only_inputs_the_action_has() -> None:
    inputs = set(load_yaml(ACTION_FILE)["inputs"])
    for block in yaml_blocks(USAGE_DOC.read_text("utf-8")):
        for job in load_yaml(block)["jobs"].values():
            for step in job.get("steps", []):
                if str(step.get("uses", "")).startswith("opssight/db-rollback"):
                    assert set(step.get("with", {})) <= inputs, step


IMAGE = "ghcr.io/opssight/db-rollback:v1"
KNOWN_ENV = re.compile(r"^(DATABASE_URL|DB_ROLLBACK_[A-Z_]+|PG[A-Z]+|AWS_[A-Z_]+)$")


def docker_run_examples(markdown: str) -> list[list[str]]:
    """Every ``docker run`` command of the README's shell blocks, as argv."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith("docker run"):
                commands.append(shlex.split(line, comments=True))
    return commands


def test_readme_docker_run_examples_run_for_real(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The README's ``docker run`` lines, with the image replaced by the installed CLI and
    the container's /work by a directory here, run against the test PostgreSQL."""
    from tests.rollback_helpers import Project

    examples = docker_run_examples(USAGE_DOC.read_text("utf-8"))
    assert len(examples) >= 3
    Project(database, alembic_project, tmp_path).upgrade(HEAD_REVISION)
    work = tmp_path / "work"
    work.mkdir()
    created: str | None = None
    for argv in examples:
        image_at = argv.index(IMAGE)
        options, args = argv[2:image_at], argv[image_at + 1 :]
        env = {**cli_env, "DB_ROLLBACK_PG_BIN_DIR": str(database.server.bin_dir)}
        for index, option in enumerate(options):
            if option == "-e":
                name, _, value = options[index + 1].partition("=")
                assert KNOWN_ENV.match(name), f"the README passes unknown variable {name}"
                env[name] = value or (database.url if name == "DATABASE_URL" else "")
        mounts = [options[i + 1] for i, o in enumerate(options) if o == "-v"]
        assert mounts and all(m.endswith(":/work") for m in mounts), options
        # "-v $PWD:/work" is the Alembic project; any other mount is a backups directory.
        cwd = alembic_project.parent if mounts[0].startswith("$PWD:") else work
        if created is not None:
            args = [created if re.fullmatch(r"backup_.*\.dump", a) else a for a in args]
        result = subprocess.run(
            [sys.executable, "-m", "rollback_cli", "--json", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, (args, result.stderr[-2000:])
        document = json.loads(result.stdout)
        if args[:2] == ["backup", "create"]:
            created = Path(document["backup_file"]).name
            assert (work / "backups" / created).is_file()
    assert created is not None
    assert list((work / "logs").glob("rollback_staging_*.log"))


# --------------------------------------------------------------------- the action's glue

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def parse_github_output(path: Path) -> dict[str, str]:
    """GITHUB_OUTPUT's format: name=value lines and name<<DELIMITER heredocs."""
    outputs: dict[str, str] = {}
    lines = path.read_text("utf-8").splitlines() if path.exists() else []
    index = 0
    while index < len(lines):
        line = lines[index]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, index + 1)
            outputs[name] = "\n".join(lines[index + 1 : end])
            index = end + 1
            continue
        name, _, value = line.partition("=")
        outputs[name] = value
        index += 1
    return outputs


@dataclass
class ActionRun:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str
    env_file: str

    def errors(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("::error")]


class ActionRunner:
    """Runs action.yml's composite steps like the runner does, with stand-in files."""

    def __init__(self, tmp_path: Path, base_env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.base_env = base_env
        self.action = load_yaml(ACTION_FILE)
        self.count = 0

    def inputs(self, given: dict[str, str]) -> dict[str, str]:
        declared = self.action["inputs"]
        unknown = set(given) - set(declared)
        assert not unknown, f"not inputs of action.yml: {unknown}"
        return {
            name: given.get(name, str(spec.get("default", ""))) for name, spec in declared.items()
        }

    @staticmethod
    def expand(text: str, inputs: dict[str, str]) -> str:
        def value(match: re.Match[str]) -> str:
            expression = match.group(1)
            assert expression.startswith("inputs."), f"unexpected expression {expression}"
            return inputs[expression.removeprefix("inputs.")]

        return EXPRESSION.sub(value, text)

    def run(self, step_env: dict[str, str] | None = None, **given: str) -> ActionRun:
        self.count += 1
        files = self.tmp_path / f"runner-{self.count}"
        files.mkdir()
        output_file, summary_file, env_file = (
            files / "output",
            files / "summary",
            files / "env",
        )
        for path in (output_file, summary_file, env_file):
            path.touch()
        inputs = self.inputs({k.replace("_", "-"): v for k, v in given.items()})
        env = {
            **self.base_env,
            **(step_env or {}),
            "GITHUB_ACTIONS": "true",
            "GITHUB_ACTION_PATH": str(REPO_ROOT),
            "GITHUB_OUTPUT": str(output_file),
            "GITHUB_STEP_SUMMARY": str(summary_file),
            "GITHUB_ENV": str(env_file),
            "RUNNER_TEMP": str(files),
        }
        stdout, stderr, returncode = "", "", 0
        for step in self.action["runs"]["steps"]:
            if "run" not in step:
                continue
            shell = step["shell"].replace("{0}", "").split()
            script = files / f"{step['id']}.sh"
            script.write_text(step["run"], "utf-8")
            step_vars = {k: self.expand(str(v), inputs) for k, v in step.get("env", {}).items()}
            result = subprocess.run(
                [*shell, str(script)],
                cwd=self.tmp_path,
                env={**env, **step_vars},
                capture_output=True,
                text=True,
                timeout=120,
            )
            stdout += result.stdout
            stderr += result.stderr
            returncode = result.returncode
            if returncode != 0:
                break
        return ActionRun(
            returncode,
            stdout,
            stderr,
            parse_github_output(output_file),
            summary_file.read_text("utf-8"),
            env_file.read_text("utf-8"),
        )

    def upload_step(self) -> dict[str, Any]:
        (step,) = [s for s in self.action["runs"]["steps"] if "uses" in s]
        return dict(step)


def upgrade(alembic_ini: Path, url: str, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(alembic_ini))
    config.attributes["configure_logger"] = False
    config.set_main_option(
        "sqlalchemy.url",
        url.replace("postgresql://", "postgresql+psycopg2://", 1).replace("%", "%%"),
    )
    command.upgrade(config, revision)


@pytest.fixture
def project(database: TestDatabase, alembic_project: Path) -> Path:
    """The example project at head on a fresh database; the directory to run the action in."""
    upgrade(alembic_project, database.url)
    return alembic_project.parent


@pytest.fixture
def runner(tmp_path: Path, cli_env: dict[str, str], database: TestDatabase) -> ActionRunner:
    env = {
        **cli_env,
        # The python runtime with this checkout's db-rollback, not a pip install of it.
        "PATH": f"{BIN_DIR}{os.pathsep}{cli_env.get('PATH', '')}",
        "DB_ROLLBACK_ACTION_SKIP_INSTALL": "1",
        # The test server's own client binaries; the image ships one per major instead.
        "DB_ROLLBACK_PG_BIN_DIR": str(database.server.bin_dir),
    }
    return ActionRunner(tmp_path, env)


def assert_no_password(run: ActionRun, url: str) -> None:
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    assert password
    shown = [line for line in run.stdout.splitlines() if not line.startswith("::add-mask::")]
    for secret in {password, unquote(password)}:
        for where, text in [
            ("stdout", "\n".join(shown)),
            ("stderr", run.stderr),
            ("outputs", repr(run.outputs)),
            ("summary", run.summary),
        ]:
            assert secret not in text, f"password in {where}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backup(runner: ActionRunner, project: Path, database: TestDatabase) -> ActionRun:
    run = runner.run(
        command="backup",
        environment="ci",
        database_url=database.url,
        working_directory=str(project),
        runtime="python",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_backup_writes_outputs_summary_and_artifact_list(
    runner: ActionRunner, project: Path, database: TestDatabase
) -> None:
    run = backup(runner, project, database)

    assert f"::add-mask::{database.url}" in run.stdout.splitlines()
    outputs = run.outputs
    assert outputs["outcome"] == "success"
    assert outputs["exit-code"] == "0"
    backup_file = Path(outputs["backup-file"])
    assert backup_file.is_absolute() and backup_file.parent == project / "backups"
    assert backup_file.name.startswith("backup_ci_") and backup_file.suffix == ".dump"
    assert sha256(backup_file) == outputs["backup-sha256"]
    assert outputs["backup-uri"] == backup_file.as_uri()
    assert outputs["revision-before"] == outputs["revision-after"] == HEAD_REVISION
    log_file = Path(outputs["log-file"])
    assert log_file.is_file() and log_file.parent == project / "logs"
    assert outputs["upload-artifacts"] == "true"
    assert outputs["artifact-paths"].splitlines() == [
        str(log_file),
        str(backup_file),
        f"{backup_file}.json",
    ]
    assert outputs["artifact-name"] == f"db-rollback-ci-backup-{outputs['run-id']}"

    assert "### ✅ db-rollback backup create · ci" in run.summary
    assert f"| backup sha256 | `{outputs['backup-sha256']}` |" in run.summary
    assert "| command line | `db-rollback --json backup create --type full` |" in run.summary
    assert run.errors() == []
    assert_no_password(run, database.url)

    # The upload step would run, with the files the run step listed.
    upload = runner.upload_step()
    assert upload["uses"].startswith("actions/upload-artifact@")
    assert re.fullmatch(r"actions/upload-artifact@[0-9a-f]{40}", upload["uses"])
    assert "steps.run.outputs.upload-artifacts == 'true'" in upload["if"]
    assert upload["with"]["path"] == "${{ steps.run.outputs.artifact-paths }}"
    assert upload["with"]["name"] == "${{ steps.run.outputs.artifact-name }}"


def test_verify_with_restore_test_reports_its_checks(
    runner: ActionRunner, project: Path, database: TestDatabase
) -> None:
    created = backup(runner, project, database)

    run = runner.run(
        command="verify",
        environment="ci",
        database_url=database.url,
        # The backup-uri output of the backup step, as a workflow would chain them.
        backup_file=created.outputs["backup-uri"],
        working_directory=str(project),
        runtime="python",
        extra_args="--restore-test",
        upload_artifacts="False",
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert run.outputs["outcome"] == "success"
    assert run.outputs["backup-file"] == created.outputs["backup-file"]
    assert run.outputs["backup-sha256"] == created.outputs["backup-sha256"]
    assert run.outputs["upload-artifacts"] == "false"
    # verify creates no backup: only its log is worth keeping.
    assert run.outputs["artifact-paths"] == run.outputs["log-file"]
    assert "### ✅ db-rollback backup verify · ci" in run.summary
    assert "| sha256 | ✅ ok |" in run.summary
    assert re.search(
        r"^\| restore test \| ✅ ok \| scratch database \S+: 3 tables, 71 rows match the "
        r"manifest \|$",
        run.summary,
        re.MULTILINE,
    )
    assert "| restore-test |" not in run.summary  # the CLI's shorter row is replaced
    assert_no_password(run, database.url)


def test_rollback_dry_run_shows_the_plan_and_changes_nothing(
    runner: ActionRunner, project: Path, database: TestDatabase
) -> None:
    run = runner.run(
        command="rollback",
        type="schema",
        environment="ci",
        database_url=database.url,
        to_revision=SEEDED_REVISION,
        dry_run="true",
        working_directory=str(project),
        runtime="python",
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert run.outputs["outcome"] == "dry_run"
    assert run.outputs["revision-before"] == HEAD_REVISION
    assert run.outputs["backup-file"] == ""
    assert "**Dry run: nothing was changed.**" in run.summary
    assert "#### What a real run would do" in run.summary
    assert re.search(
        r"\| \d \| downgrade \| alembic downgrade e41c0d7f6a95 → 8d4b6a0c9e12", run.summary
    )
    assert "b7e2f5a91c38 drops column customers.tier" in run.summary
    assert "::notice title=db-rollback rollback schema%3A dry_run::" in run.stdout
    assert database.query("SELECT version_num FROM alembic_version") == [(HEAD_REVISION,)]
    assert not (project / "backups").exists(), "a dry run took a safety backup"
    assert_no_password(run, database.url)


def test_a_failing_command_sets_outputs_and_an_error_annotation(
    runner: ActionRunner, project: Path, database: TestDatabase
) -> None:
    run = runner.run(
        command="verify",
        database_url=database.url,
        backup_file="backup_staging_20990101_000000.dump",
        working_directory=str(project),
        runtime="python",
    )

    assert run.returncode == 4
    assert run.outputs["outcome"] == "backup_invalid"
    assert run.outputs["exit-code"] == "4"
    (error,) = run.errors()
    assert error.startswith("::error title=db-rollback backup verify%3A backup_invalid::")
    assert "backup_staging_20990101_000000.dump" in error
    assert "### ❌ db-rollback backup verify · staging" in run.summary
    assert "| exit code | 4 (backup missing, corrupt or failing verification) |" in run.summary
    # The log is still listed for upload: it is what an operator reads first.
    assert run.outputs["artifact-paths"] == run.outputs["log-file"]
    assert_no_password(run, database.url)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"command": "destroy"}, "unknown command 'destroy': expected one of backup, rollback"),
        ({"command": ""}, "command is required"),
        ({"command": "rollback"}, "command rollback needs type: schema, data or full"),
        ({"command": "rollback", "type": "schema"}, "rollback of type schema needs to-revision"),
        ({"command": "rollback", "type": "data"}, "rollback of type data needs backup-file"),
        ({"command": "verify"}, "command verify needs backup-file"),
        ({"command": "backup", "type": "everything"}, "type for command backup must be full"),
        (
            {"command": "backup", "dry-run": "maybe"},
            "dry-run must be 'true' or 'false', not 'maybe'",
        ),
        ({"command": "backup", "upload-artifacts": "yes"}, "upload-artifacts must be 'true'"),
        ({"command": "backup", "retention-days": "120"}, "retention-days must be a number of days"),
        ({"command": "backup", "s3-sse": "rot13"}, "s3-sse must be AES256 or aws:kms"),
        ({"command": "backup", "runtime": "podman"}, "runtime must be 'docker' or 'python'"),
        (
            {"command": "backup", "working-directory": "no/such/dir"},
            "working-directory 'no/such/dir'",
        ),
        ({"command": "backup", "extra-args": "--label 'unclosed"}, "extra-args cannot be split"),
    ],
    ids=lambda value: (
        value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items())
    ),
)
def test_bad_input_is_an_error_annotation(
    runner: ActionRunner, database: TestDatabase, inputs: dict[str, str], message: str
) -> None:
    given = {"runtime": "python", "database-url": database.url, **inputs}
    run = runner.run(**{k.replace("-", "_"): v for k, v in given.items()})

    assert run.returncode == 2
    (error,) = run.errors()
    assert error.startswith("::error title=db-rollback: invalid input::")
    assert message in error
    assert "outcome" not in run.outputs, "db-rollback ran despite the bad input"
    assert_no_password(run, database.url)


@pytest.mark.parametrize("backup_ref", ["path", "uri"])
def test_docker_runtime_passes_credentials_by_name_only(
    runner: ActionRunner, project: Path, database: TestDatabase, tmp_path: Path, backup_ref: str
) -> None:
    """The docker branch's command line, read by a `docker` on PATH that records its argv.

    The container itself runs in scripts/image-test.sh and in CI's self-test; here only the
    argv matters: host network, the working directory at /work, env vars passed by name.
    """
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    argv_file = tmp_path / "docker-argv"
    (stand_in / "docker").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\nexit 3\n', "utf-8"
    )
    (stand_in / "docker").chmod(0o755)
    env = {
        "PATH": f"{stand_in}{os.pathsep}{runner.base_env['PATH']}",
        "AWS_SECRET_ACCESS_KEY": "aws-s3cr3t",
    }
    backup_path = project / "backups" / "backup_ci_20990101_000000.dump"

    run = runner.run(
        step_env=env,
        command="rollback",
        type="data",
        environment="ci",
        database_url=database.url,
        backup_file=str(backup_path) if backup_ref == "path" else backup_path.as_uri(),
        working_directory=str(project),
        image="localhost/db-rollback:test",
    )

    assert run.returncode == 3
    argv = argv_file.read_text("utf-8").splitlines()
    assert argv[:3] == ["run", "--rm", "--network"] and argv[3] == "host"
    assert [
        "-v",
        f"{project.resolve()}:/work",
        "-w",
        "/work",
        "localhost/db-rollback:test",
    ] == argv[argv.index("-v") : argv.index("-v") + 5]
    env_names = [argv[i + 1] for i, word in enumerate(argv) if word == "-e"]
    assert {"DATABASE_URL", "DB_ROLLBACK_ENVIRONMENT", "AWS_SECRET_ACCESS_KEY"} <= set(env_names)
    assert all("=" not in name or name == "HOME=/tmp" for name in env_names)
    # A path under the working directory is handed to the container relative to /work.
    assert argv[-5:] == [
        "--json",
        "rollback",
        "data",
        "--backup-file",
        "backups/backup_ci_20990101_000000.dump",
    ]
    assert "::add-mask::aws-s3cr3t" in run.stdout.splitlines()
    assert not any(marker in "\n".join(argv) for marker in (*PASSWORD_MARKERS, "aws-s3cr3t"))
    assert run.outputs["outcome"] == "error"  # the stand-in printed no result document


# ---------------------------------------------------------------------------- restore drill

DRILL_WORKFLOW = REPO_ROOT / "examples" / "workflows" / "restore-drill.yml"


def drill_step(workflow: dict[str, Any]) -> dict[str, Any]:
    (step,) = [
        step
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if str(step.get("uses", "")).startswith("opssight/db-rollback@")
    ]
    return dict(step)


def test_restore_drill_workflow_runs_nightly_and_fails_loudly() -> None:
    assert DRILL_WORKFLOW in WORKFLOWS  # linted with the others by actionlint and the schema
    workflow = load_yaml(DRILL_WORKFLOW)
    # YAML 1.1 reads the `on` key as True.
    triggers = workflow.get("on", workflow.get(True))
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    (schedule,) = triggers["schedule"]
    assert len(schedule["cron"].split()) == 5 and schedule["cron"].endswith("* * *")
    (job,) = workflow["jobs"].values()
    assert "postgres" in job["services"]
    assert "5432:5432" in job["services"]["postgres"]["ports"]
    assert job["env"]["AWS_SECRET_ACCESS_KEY"].startswith("${{ secrets.")
    assert job["env"]["AWS_ACCESS_KEY_ID"].startswith("${{ secrets.")
    step = drill_step(workflow)
    assert step["uses"] == "opssight/db-rollback@v1"
    assert step["with"]["command"] == "drill" and step["with"]["max-age"] == "26h"
    assert set(step["with"]) <= set(load_yaml(ACTION_FILE)["inputs"])
    # A failed drill fails the job: nothing swallows the action's exit status.
    assert "continue-on-error" not in step and "continue-on-error" not in job


def drill_inputs(project: Path, database: TestDatabase) -> dict[str, str]:
    """The example workflow's inputs for the drill step, pointed at the test server and the
    project's backup directory (the workflow's storage is a repository variable)."""
    given = {
        k.replace("-", "_"): str(v)
        for k, v in drill_step(load_yaml(DRILL_WORKFLOW))["with"].items()
    }
    checks = project / "db" / "drill-checks.sql"
    checks.parent.mkdir(exist_ok=True)
    checks.write_text(
        "-- name: customers have names\nSELECT count(*) = count(name) FROM customers;\n", "utf-8"
    )
    return {
        **given,
        "database_url": database.url,
        "storage": "",
        "signing_key": "",
        "working_directory": str(project),
        "runtime": "python",
    }


def test_drill_command_writes_the_drill_to_the_job_summary(
    runner: ActionRunner, project: Path, database: TestDatabase
) -> None:
    created = runner.run(
        command="backup",
        environment="production",
        yes="true",
        database_url=database.url,
        working_directory=str(project),
        runtime="python",
    )
    assert created.returncode == 0, created.stdout + created.stderr
    before = database.query("SELECT md5(string_agg(c::text, ',' ORDER BY c.id)) FROM customers c")

    run = runner.run(**drill_inputs(project, database))

    assert run.returncode == 0, run.stdout + run.stderr
    outputs = run.outputs
    assert outputs["outcome"] == "success" and outputs["exit-code"] == "0"
    assert outputs["backup-sha256"] == created.outputs["backup-sha256"]
    assert outputs["backup-file"] == created.outputs["backup-file"]
    # A drill creates no backup: only its log is uploaded.
    assert outputs["artifact-paths"] == outputs["log-file"]
    summary = run.summary
    assert "### ✅ db-rollback drill · production" in summary
    assert (
        "| command line | `db-rollback --json drill --max-age 26h --checks db/drill-checks.sql` |"
        in summary
    )
    assert "#### Restore drill" in summary
    assert re.search(r"^\| made \| \S+, \d+s ago \(allowed 26h\) \|$", summary, re.MULTILINE)
    assert re.search(r"^\| restored \| 3 tables, \d+ rows \|$", summary, re.MULTILINE)
    assert re.search(r"^\| restore time \| [\d.]+ s \|$", summary, re.MULTILINE)
    assert re.search(r"^\| scratch database \| `\S+_verify_\S+` \(dropped\) \|$", summary, re.M)
    assert "| customers have names | ✅ ok | true |" in summary
    assert "| manifest comparison | ✅ ok |" in summary
    assert run.errors() == []
    assert_no_password(run, database.url)
    assert (
        database.query("SELECT md5(string_agg(c::text, ',' ORDER BY c.id)) FROM customers c")
        == before
    )
    assert [n for n in database.related_databases() if n != database.name] == []


def test_drill_without_a_backup_fails_the_step_with_exit_4(
    runner: ActionRunner, project: Path, database: TestDatabase
) -> None:
    run = runner.run(**drill_inputs(project, database))

    assert run.returncode == 4
    assert run.outputs["outcome"] == "backup_invalid"
    (error,) = run.errors()
    assert error.startswith("::error title=db-rollback drill%3A backup_invalid::")
    assert f"no full backup of database {database.name}" in error
    assert "### ❌ db-rollback drill · production" in run.summary
    assert "| exit code | 4 (backup missing, corrupt or failing verification) |" in run.summary
    assert_no_password(run, database.url)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"type": "everything"}, "type for command drill must be full, schema or data"),
        ({"max-age": "26 hours"}, "cannot read age '26 hours'"),
    ],
    ids=["type", "max-age"],
)
def test_bad_drill_input_exits_2(
    runner: ActionRunner,
    project: Path,
    database: TestDatabase,
    inputs: dict[str, str],
    message: str,
) -> None:
    given = {"command": "drill", "runtime": "python", "database-url": database.url, **inputs}
    run = runner.run(
        working_directory=str(project), **{k.replace("-", "_"): v for k, v in given.items()}
    )

    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stdout + run.stderr
    assert_no_password(run, database.url)
