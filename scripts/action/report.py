"""Turn db-rollback's ``--json`` result into step outputs, a job summary and annotations.

Called by run.sh after the CLI has exited:

    python3 report.py RESULT_JSON EXIT_CODE

Environment:
    GITHUB_OUTPUT, GITHUB_STEP_SUMMARY   files to append to (skipped when unset)
    ACTION_COMMAND                       the action's command input (backup, rollback, ...)
    ACTION_CLI_COMMAND                   the CLI command line without secrets, for the summary
    ACTION_HOST_DIR                      the working directory on the runner
    ACTION_CONTAINER_DIR                 where that directory is mounted in the container
                                         (docker runtime only)
    ACTION_ARTIFACT_NAME                 artifact name chosen by the user, if any
    DATABASE_URL, PGPASSWORD             scrubbed from everything written

Only the standard library: this runs on the runner's python3, before or without db-rollback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

OUTCOMES_OK = {"success", "dry_run"}
EXIT_MEANING = {
    0: "ok",
    1: "unexpected error",
    2: "usage error",
    3: "configuration or connection error",
    4: "backup missing, corrupt or failing verification",
    5: "operation failed, database unchanged",
    6: "operation failed after a change began: manual attention",
    7: "refused by a safety guard",
    130: "interrupted",
}
# Commands whose result names a backup this run created (a rollback's is its safety backup).
CREATES_BACKUP = {"backup", "rollback"}


def secrets() -> list[str]:
    found: list[str] = []
    url = os.environ.get("DATABASE_URL", "")
    if url:
        found.append(url)
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
    if os.environ.get("PGPASSWORD"):
        found.append(os.environ["PGPASSWORD"])
    # Longest first, so a URL is replaced whole before its password is.
    return sorted({s for s in found if s}, key=len, reverse=True)


SECRETS = secrets()


def scrub(text: str) -> str:
    for secret in SECRETS:
        text = text.replace(secret, "***")
    return text


def host_path(path: str | None) -> str | None:
    """A path the CLI reported, as seen from the runner (absolute)."""
    if not path or "://" in path:
        return path
    host_dir = Path(os.environ.get("ACTION_HOST_DIR") or os.getcwd())
    container_dir = os.environ.get("ACTION_CONTAINER_DIR")
    if container_dir:
        if path == container_dir:
            return str(host_dir)
        if path.startswith(container_dir.rstrip("/") + "/"):
            return str(host_dir / path[len(container_dir.rstrip("/")) + 1 :])
    candidate = Path(path)
    return str(candidate if candidate.is_absolute() else host_dir / candidate)


def load_result(path: Path, exit_code: int) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    if text:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            return doc
    # The CLI did not print its document (it crashed or never started): say so plainly.
    return {
        "outcome": "error",
        "exit_code": exit_code,
        "message": "db-rollback printed no result document; see its log lines above",
    }


def annotation_escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def property_escape(text: str) -> str:
    return annotation_escape(text).replace(":", "%3A").replace(",", "%2C")


def cell(value: Any) -> str:
    if value is None or value == "":
        return "—"
    text = scrub(str(value)).replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")
    return text


def code(value: Any) -> str:
    if value is None or value == "":
        return "—"
    return "`" + cell(value).replace("`", "'") + "`"


def write_outputs(outputs: dict[str, str]) -> None:
    target = os.environ.get("GITHUB_OUTPUT")
    if not target:
        return
    with open(target, "a", encoding="utf-8") as fh:
        for name, value in outputs.items():
            value = scrub(value)
            if "\n" in value:
                delimiter = f"ghadelimiter_{uuid.uuid4().hex}"
                fh.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
            else:
                fh.write(f"{name}={value}\n")


def summary_markdown(doc: dict[str, Any], exit_code: int, outputs: dict[str, str]) -> str:
    outcome = str(doc.get("outcome") or "error")
    command = doc.get("command") or os.environ.get("ACTION_COMMAND", "")
    environment = doc.get("environment") or "—"
    mark = "✅" if outcome in OUTCOMES_OK else ("⚠️" if outcome == "refused" else "❌")
    lines = [
        f"### {mark} db-rollback {cell(command)} · {cell(environment)}",
        "",
    ]
    if outcome == "dry_run":
        lines.append("**Dry run: nothing was changed.**")
        lines.append("")
    if outcome == "manual_attention":
        lines.append(
            "> [!CAUTION]\n> The operation failed after a change began. The database needs "
            "manual attention: read the log file (uploaded with this run's artifacts), which "
            "says what state things are in and how to recover."
        )
        lines.append("")
    lines += ["| | |", "|---|---|"]
    rows = [
        ("outcome", code(outcome)),
        ("exit code", f"{exit_code} ({EXIT_MEANING.get(exit_code, 'unknown')})"),
        ("message", cell(doc.get("message"))),
        ("command line", code(os.environ.get("ACTION_CLI_COMMAND"))),
        ("backup file", code(outputs.get("backup-file"))),
        ("backup sha256", code(outputs.get("backup-sha256"))),
        ("backup URI", code(outputs.get("backup-uri"))),
        ("revision before", code(outputs.get("revision-before"))),
        ("revision after", code(outputs.get("revision-after"))),
        ("log file", code(outputs.get("log-file"))),
        ("run id", code(doc.get("run_id"))),
    ]
    lines += [f"| {name} | {value} |" for name, value in rows if value != "—"]
    plan = doc.get("plan")
    if isinstance(plan, list) and plan:
        lines += ["", "#### Plan" if outcome != "dry_run" else "#### What a real run would do", ""]
        lines += ["| # | step | detail |", "|---|---|---|"]
        for number, item in enumerate(plan, start=1):
            if isinstance(item, dict):
                lines.append(f"| {number} | {cell(item.get('step'))} | {cell(item.get('detail'))} |")
            else:
                lines.append(f"| {number} | {cell(item)} | |")
    backups = doc.get("backups")
    if isinstance(backups, list) and backups:
        lines += ["", "#### Backups", "", "| file | created | type | valid |", "|---|---|---|---|"]
        for item in backups[:50]:
            if isinstance(item, dict):
                name = item.get("file") or item.get("name") or item.get("key")
                lines.append(
                    f"| {code(name)} | {cell(item.get('created_at'))} | {cell(item.get('type'))}"
                    f" | {cell(item.get('valid'))} |"
                )
        if len(backups) > 50:
            lines.append(f"| … {len(backups) - 50} more | | | |")
    lines.append("")
    return "\n".join(lines) + "\n"


def artifact_name(doc: dict[str, Any]) -> str:
    chosen = os.environ.get("ACTION_ARTIFACT_NAME", "").strip()
    if chosen:
        return chosen
    parts = [
        "db-rollback",
        str(doc.get("environment") or os.environ.get("INPUT_ENVIRONMENT") or "unknown"),
        os.environ.get("ACTION_COMMAND") or "run",
        str(doc.get("run_id") or uuid.uuid4().hex[:12]),
    ]
    # Artifact names may not hold these characters.
    return re.sub(r'[":<>|*?\\/\r\n]+', "-", "-".join(parts))


def artifact_paths(doc: dict[str, Any], outputs: dict[str, str]) -> list[str]:
    paths: list[str] = []
    log_file = outputs.get("log-file")
    if log_file and Path(log_file).is_file():
        paths.append(log_file)
    backup_file = outputs.get("backup-file")
    if os.environ.get("ACTION_COMMAND") in CREATES_BACKUP and backup_file and "://" not in backup_file:
        backup_path = Path(backup_file)
        if backup_path.exists():
            paths.append(str(backup_path))
            manifest = backup_path.with_name(backup_path.name + ".json")
            if manifest.is_file():
                paths.append(str(manifest))
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: report.py RESULT_JSON EXIT_CODE", file=sys.stderr)
        return 2
    result_path, exit_code = Path(argv[1]), int(argv[2])
    doc = load_result(result_path, exit_code)
    outcome = str(doc.get("outcome") or "error")

    def text(key: str) -> str:
        value = doc.get(key)
        return "" if value is None else str(value)

    outputs = {
        "outcome": outcome,
        "exit-code": str(exit_code),
        "run-id": text("run_id"),
        "backup-file": host_path(text("backup_file")) or "",
        "backup-sha256": text("backup_sha256"),
        "backup-uri": text("backup_uri"),
        "revision-before": text("revision_before"),
        "revision-after": text("revision_after"),
        "log-file": host_path(text("log_file")) or "",
    }
    outputs["artifact-name"] = artifact_name(doc)
    outputs["artifact-paths"] = "\n".join(artifact_paths(doc, outputs))
    write_outputs(outputs)

    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:
            fh.write(summary_markdown(doc, exit_code, outputs))

    command = doc.get("command") or os.environ.get("ACTION_COMMAND", "")
    message = scrub(str(doc.get("message") or EXIT_MEANING.get(exit_code, "failed")))
    title = f"db-rollback {command}: {outcome}"
    if exit_code != 0 or outcome not in OUTCOMES_OK:
        print(f"::error title={property_escape(title)}::{annotation_escape(message)}")
    elif outcome == "dry_run":
        print(f"::notice title={property_escape(title)}::dry run, nothing was changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
