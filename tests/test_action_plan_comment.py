"""The action's review artifact: a schema rollback's dry-run plan, with its rehearsed
downgrade, in the job summary and as one pull request comment that later runs update.

The plan is a real one (the example project on PostgreSQL 15); the GitHub API is a small
server of the test's own on the loopback interface that keeps comments in memory, as
GitHub's issue-comment endpoints do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.rollback_helpers import REV_SEED, Project
from tests.servers import TestDatabase
from tests.test_migration_environments import head_project

REPORT = Path(__file__).resolve().parent.parent / "scripts" / "action" / "report.py"
TOKEN = "ghs_exampletoken0123456789"


class FakeIssueComments:
    """GET/POST /repos/{repo}/issues/{n}/comments and PATCH /repos/{repo}/issues/comments/{id}."""

    def __init__(self) -> None:
        self.comments: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _record(self) -> bool:
                api.requests.append((self.command, self.path, self.headers["Authorization"]))
                return self.headers["Authorization"] == f"Bearer {TOKEN}"

            def do_GET(self) -> None:
                if not self._record():
                    self._reply(401, {"message": "Bad credentials"})
                    return
                page = int(self.path.rpartition("page=")[2])
                self._reply(200, api.comments[(page - 1) * 100 : page * 100])

            def do_POST(self) -> None:
                if not self._record():
                    self._reply(401, {"message": "Bad credentials"})
                    return
                comment = {"id": len(api.comments) + 1, "body": self._body()["body"]}
                api.comments.append(comment)
                self._reply(201, comment)

            def do_PATCH(self) -> None:
                if not self._record():
                    self._reply(401, {"message": "Bad credentials"})
                    return
                number = int(self.path.rpartition("/")[2])
                (comment,) = [c for c in api.comments if c["id"] == number]
                comment["body"] = self._body()["body"]
                self._reply(200, comment)

        return Handler

    def __enter__(self) -> FakeIssueComments:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def github() -> Iterator[FakeIssueComments]:
    with FakeIssueComments() as api:
        yield api


@pytest.fixture
def plan_file(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict[str, str]
) -> Path:
    """A real dry-run document of a schema rollback that drops a column holding data."""
    project: Project = head_project(database15, alembic_project, tmp_path)
    result, _ = project.run_json("rollback", "schema", "--to-revision", REV_SEED, "--dry-run")
    assert result.exit_code == 0, result.stderr
    path = tmp_path / "result.json"
    path.write_text(result.stdout)
    return path


def run_report(
    plan_file: Path, tmp_path: Path, github: FakeIssueComments, **extra: str
) -> subprocess.CompletedProcess[str]:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 42}}))
    env = {
        "PATH": os.environ["PATH"],
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
        "GITHUB_API_URL": github.url,
        "GITHUB_REPOSITORY": "shop/backend",
        "GITHUB_EVENT_NAME": "pull_request",
        "GITHUB_EVENT_PATH": str(event),
        "ACTION_COMMAND": "rollback",
        "INPUT_GITHUB_TOKEN": TOKEN,
        **extra,
    }
    return subprocess.run(
        [sys.executable, str(REPORT), str(plan_file), "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def test_the_job_summary_shows_the_rehearsed_downgrade(
    plan_file: Path, tmp_path: Path, github: FakeIssueComments
) -> None:
    run_report(plan_file, tmp_path, github, INPUT_GITHUB_TOKEN="")
    summary = (tmp_path / "summary.md").read_text()
    assert "#### Downgrade (rehearsed on a copy: schema" in summary
    assert "customers.tier (" in summary and "live values" in summary
    assert "ACCESS EXCLUSIVE on public.customers" in summary
    assert "```sql" in summary and "DROP COLUMN tier" in summary
    assert github.requests == []  # no token: no comment


def test_one_pull_request_comment_updated_by_later_runs(
    plan_file: Path, tmp_path: Path, github: FakeIssueComments
) -> None:
    github.comments.append({"id": 1, "body": "an unrelated review comment"})

    first = run_report(plan_file, tmp_path, github)
    second = run_report(plan_file, tmp_path, github)

    ours = [c for c in github.comments if "db-rollback plan" in c["body"]]
    assert len(ours) == 1 and len(github.comments) == 2
    assert "DROP COLUMN tier" in ours[0]["body"]
    methods = [method for method, _, _ in github.requests]
    assert methods.count("POST") == 1 and methods.count("PATCH") == 1
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in github.requests)
    for output in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert TOKEN not in output
    assert TOKEN not in (tmp_path / "summary.md").read_text()


def test_a_failing_comment_is_a_warning_not_a_failed_step(
    plan_file: Path, tmp_path: Path, github: FakeIssueComments
) -> None:
    wrong = "ghs_wrongtoken9876543210"
    done = run_report(plan_file, tmp_path, github, INPUT_GITHUB_TOKEN=wrong)
    assert "::warning" in done.stdout and "pull request comment not written" in done.stdout
    assert wrong not in done.stdout + done.stderr
    assert github.comments == []
