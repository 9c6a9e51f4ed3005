"""Turn db-rollback's ``--json`` result into step outputs, a job summary and annotations.

Called by run.sh after the CLI has exited:

    python3 report.py RESULT_JSON EXIT_CODE

and before it runs, for the secrets to mask and the command line to show:

    python3 report.py --secrets
    python3 report.py --scrub-words WORD...

Environment:
    GITHUB_OUTPUT, GITHUB_STEP_SUMMARY   files to append to (skipped when unset)
    ACTION_COMMAND                       the action's command input (backup, rollback, drill, ...)
    ACTION_CLI_COMMAND                   the CLI command line without secrets, for the summary
    ACTION_HOST_DIR                      the working directory on the runner
    ACTION_CONTAINER_DIR                 where that directory is mounted in the container
                                         (docker runtime only)
    ACTION_ARTIFACT_NAME                 artifact name chosen by the user, if any
    INPUT_GITHUB_TOKEN                   with it, on a pull request, a rollback's plan (the
                                         rehearsed downgrade) is written as one comment on
                                         the pull request, updated by later runs
    GITHUB_API_URL, GITHUB_REPOSITORY, GITHUB_EVENT_NAME, GITHUB_EVENT_PATH
                                         where that comment goes (set by the runner)
    DATABASE_URL, PGPASSWORD, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, and the passwords of
    URLs in DB_ROLLBACK_STORAGE, AWS_ENDPOINT_URL and the INPUT_* values (storage,
    backup-file, extra-args)             scrubbed from everything written

Annotations (``::error::``, ``::notice::``) go to stdout, where the runner reads them.
Only the standard library: this runs on the runner's python3, before or without db-rollback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, quote_plus, unquote, urlsplit
from urllib.request import Request, urlopen

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
MAX_TABLE_ROWS = 50


# The same rules as rollback_cli.log.Redactor (this file runs on the runner's python3, where
# db-rollback may not be installed, so it cannot import it): exact known secrets first, in
# every spelling, longest first in one pass; then the patterns (URL user-info, key=value).
# tests/test_adversarial_redaction.py holds both to the same property.
REDACTED = "***"
MIN_SECRET = 3
SECRET_VARIABLES = (
    "PGPASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "INPUT_GITHUB_TOKEN",
)
# Values that may be URLs with credentials in them (their passwords are secrets too).
URL_VARIABLES = (
    "DATABASE_URL",
    "INPUT_DATABASE_URL",
    "DB_ROLLBACK_STORAGE",
    "INPUT_STORAGE",
    "INPUT_BACKUP_FILE",
    "AWS_ENDPOINT_URL",
    "INPUT_S3_ENDPOINT_URL",
)
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/:@\s]*):(?P<pw>[^\s/]*)@"
)
_URL_TOKEN = re.compile(
    r"(?P<scheme>(?<![A-Za-z0-9+.-])(?!(?i:postgres(?:ql)?(?:\+[a-z0-9]+)?)://)"
    r"[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<token>[^/:@\s]+)@"
)
_KV_PASSWORD = re.compile(
    r"""(?P<key>\b(?:password|passwd|pgpassword|aws_secret_access_key|aws_session_token)"""
    r"""\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""",
    re.IGNORECASE,
)


def secret_forms(secret: str) -> set[str]:
    escaped = secret.replace("\\", "\\\\")  # inside a repr() of a longer string
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret, safe=""),
        " ".join(secret.split()),
        repr(secret)[1:-1],
        escaped,
        escaped.replace("'", "\\'"),
        escaped.replace('"', '\\"'),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    return {form for form in forms if len(form) >= MIN_SECRET}


def url_passwords(text: str) -> list[str]:
    """The password of every URL in one value, raw and percent-decoded; a password may hold
    a raw "@", "/", "?", "#" or ":", so every "@" after the user name ends a candidate."""
    found: list[str] = []
    for match in _URL_START.finditer(text):
        scheme = match.group().removesuffix("://").partition("+")[0].lower()
        rest = text[match.end() :]
        user, colon, after = rest.partition(":")
        candidates: list[str] = []
        if colon and not any(c in user for c in "/@?#"):
            candidates = [after[:at] for at, char in enumerate(after) if char == "@"]
        elif scheme not in ("postgres", "postgresql"):
            host_part = re.split(r"[/?#\s]", rest, maxsplit=1)[0]
            if "@" in host_part:
                candidates = [host_part.rpartition("@")[0]]
        for candidate in candidates:
            found += [candidate, unquote(candidate)]
    return [value for value in dict.fromkeys(found) if len(value) >= MIN_SECRET]


def extra_words() -> list[str]:
    text = os.environ.get("INPUT_EXTRA_ARGS", "")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def find_secrets(*values: str) -> list[str]:
    """Every secret the action knows of (and those in ``values``), longest first."""
    found: list[str] = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    for text in [*(os.environ.get(name, "") for name in URL_VARIABLES), *extra_words(), *values]:
        if "://" in text:
            found += url_passwords(text)
    if os.environ.get("DATABASE_URL"):
        found.append(os.environ["DATABASE_URL"])
    forms = set().union(*(secret_forms(s) for s in found if len(s) >= MIN_SECRET))
    # Longest first, so a URL is replaced whole before its password is.
    return sorted(forms, key=lambda form: (-len(form), form))


SECRETS = find_secrets()


def scrub(text: str, secrets: list[str] | None = None) -> str:
    secrets = SECRETS if secrets is None else secrets
    if secrets:
        text = re.sub("|".join(map(re.escape, secrets)), REDACTED, text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _URL_TOKEN.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['key']}{REDACTED}", text)


def host_path(path: str) -> str:
    """A path the CLI reported, as seen from the runner (absolute); URIs pass unchanged."""
    if not path or "://" in path:
        return path
    host_dir = Path(os.environ.get("ACTION_HOST_DIR") or Path.cwd())
    container_dir = os.environ.get("ACTION_CONTAINER_DIR", "").rstrip("/")
    if container_dir:
        if path == container_dir:
            return str(host_dir)
        if path.startswith(container_dir + "/"):
            return str(host_dir / path[len(container_dir) + 1 :])
    candidate = Path(path)
    return str(candidate if candidate.is_absolute() else host_dir / candidate)


def host_uri(uri: str) -> str:
    """A ``file://`` URI the CLI reported, pointing at the runner's file (docker runtime)."""
    if not uri.startswith("file://"):
        return uri
    return Path(host_path(unquote(urlsplit(uri).path))).as_uri()


def backup_location(doc: dict[str, Any]) -> str:
    """The backup as a file on the runner when it is one, else as the CLI named it.

    `backup create` names the local file; `backup verify` names the key in the storage, and
    its ``file://`` URI says where that file is.
    """
    reported = str(doc.get("backup_file") or "")
    if not reported:
        return ""
    local = host_path(reported)
    if Path(local).exists():
        return local
    uri = str(doc.get("backup_uri") or "")
    if uri.startswith("file://"):
        from_uri = host_path(unquote(urlsplit(uri).path))
        if Path(from_uri).exists():
            return from_uri
    return reported


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
    return scrub(str(value)).replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def code(value: Any) -> str:
    if value is None or value == "":
        return "—"
    return "`" + cell(value).replace("`", "'") + "`"


def write_outputs(outputs: dict[str, str]) -> None:
    target = os.environ.get("GITHUB_OUTPUT")
    if not target:
        return
    with Path(target).open("a", encoding="utf-8") as fh:
        for name, raw in outputs.items():
            value = scrub(raw)
            if "\n" in value:
                delimiter = f"ghadelimiter_{uuid.uuid4().hex}"
                fh.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
            else:
                fh.write(f"{name}={value}\n")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    shown = rows[:MAX_TABLE_ROWS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in shown]
    if len(rows) > len(shown):
        lines.append(
            "| "
            + " | ".join([f"… {len(rows) - len(shown)} more"] + [""] * (len(header) - 1))
            + " |"
        )
    return lines


def plan_section(doc: dict[str, Any]) -> list[str]:
    plan = doc.get("plan")
    if not isinstance(plan, list) or not plan:
        return []
    title = "What a real run would do" if doc.get("outcome") == "dry_run" else "Plan"
    rows = [
        [str(number), cell(item.get("step")), cell(item.get("detail"))]
        if isinstance(item, dict)
        else [str(number), cell(item), ""]
        for number, item in enumerate(plan, start=1)
    ]
    return ["", f"#### {title}", "", *table(["#", "step", "detail"], rows)]


MAX_SQL_CHARS = 6000


def _dropped(items: Any) -> str:
    shown = []
    for drop in items if isinstance(items, list) else []:
        if not isinstance(drop, dict):
            continue
        name = ".".join(str(drop.get(k)) for k in ("schema", "table", "column") if drop.get(k))
        unit = "values" if drop.get("column") else "rows"
        shown.append(f"{name} ({drop.get('live_values')} live {unit})")
    return ", ".join(shown)


def downgrade_section(doc: dict[str, Any]) -> list[str]:
    """The reverted revisions of a schema or full rollback: what the rehearsal ran on a
    copy (SQL, time, locks) and what each drops, with the live rows at risk."""
    reverted = doc.get("reverted")
    if not isinstance(reverted, list) or not reverted:
        return []
    rehearsal = doc.get("rehearsal")
    rows = []
    for item in reverted:
        if not isinstance(item, dict):
            continue
        flags = []
        if item.get("online_only"):
            flags.append("online only")
        if item.get("irreversible"):
            flags.append(f"irreversible: {item['irreversible']}")
        if item.get("empty"):
            flags.append("empty downgrade")
        locks = item.get("locks") if isinstance(item.get("locks"), list) else []
        rows.append(
            [
                code(item.get("revision")),
                cell(item.get("message")),
                cell(item.get("duration_ms")),
                cell(", ".join(str(lock) for lock in locks)),
                cell(_dropped(item.get("dropped"))),
                cell(item.get("rows_at_risk")),
                cell("; ".join(flags)),
            ]
        )
    title = "Downgrade"
    if isinstance(rehearsal, dict):
        title += f" (rehearsed on a copy: {cell(rehearsal.get('copy'))}, "
        title += f"{cell(rehearsal.get('duration_ms'))} ms)"
    header = ["revision", "message", "ms", "locks", "drops", "live rows at risk", "notes"]
    lines = ["", f"#### {title}", "", *table(header, rows)]
    for item in reverted:
        sql = item.get("sql") if isinstance(item, dict) else None
        if not sql:
            continue
        text = scrub(str(sql))[:MAX_SQL_CHARS].replace("```", "` ` `")
        lines += [
            "",
            f"<details><summary>SQL of {cell(item.get('revision'))}</summary>",
            "",
            "```sql",
            text,
            "```",
            "",
            "</details>",
        ]
    return lines


def checks_section(doc: dict[str, Any]) -> list[str]:
    """verify and validate report {check, ok, detail}; status reports {name, status, detail}."""
    rows: list[list[str]] = []
    for key in ("checks", "validation"):
        items = doc.get(key)
        if not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, dict):
                continue
            name = item.get("check") or item.get("name")
            if "ok" in item:
                state = "✅ ok" if item["ok"] else "❌ failed"
            else:
                status = str(item.get("status") or "")
                state = {"ok": "✅ ok", "warning": "⚠️ warning"}.get(status, f"❌ {status}")
            rows.append([cell(name), state, cell(item.get("detail"))])
    restore_test = doc.get("restore_test")
    # The restore test's own numbers replace the CLI's one-line restore-test check.
    if isinstance(restore_test, dict):
        rows = [row for row in rows if row[0] != "restore-test"]
        mismatches = restore_test.get("mismatches") or []
        detail = (
            f"scratch database {restore_test.get('database')}: {restore_test.get('tables')} "
            f"tables, {restore_test.get('rows')} rows"
        )
        if mismatches:
            rows.append(["restore test", "❌ failed", cell("; ".join(map(str, mismatches)))])
        else:
            rows.append(["restore test", "✅ ok", cell(detail + " match the manifest")])
    if not rows:
        return []
    return ["", "#### Checks", "", *table(["check", "result", "detail"], rows)]


def backups_section(doc: dict[str, Any]) -> list[str]:
    backups = doc.get("backups")
    if not isinstance(backups, list) or not backups:
        return []
    rows = [
        [
            code(item.get("name") or item.get("file") or item.get("key")),
            cell(item.get("created_at")),
            cell(item.get("type")),
            code(item.get("alembic_revision")),
            cell(item.get("size")),
            "✅" if item.get("valid") else f"❌ {cell(item.get('problem'))}",
        ]
        for item in backups
        if isinstance(item, dict)
    ]
    header = ["backup", "created", "type", "revision", "bytes", "valid"]
    return ["", "#### Backups", "", *table(header, rows)]


def drill_section(doc: dict[str, Any]) -> list[str]:
    """What a restore drill proved: the backup, its age, the restore and what it held."""
    drill = doc.get("drill")
    if not isinstance(drill, dict):
        return []
    age = f"{cell(drill.get('age'))} ago"
    if drill.get("max_age"):
        age += f" (allowed {cell(drill.get('max_age'))})"
    restored = drill.get("scratch_database")
    rows = [
        ("backup", code(drill.get("backup"))),
        ("picked", cell(drill.get("selected"))),
        ("made", f"{cell(drill.get('created_at'))}, {age}"),
        ("type", f"{cell(drill.get('type'))} / {cell(drill.get('format'))}"),
        ("size", f"{cell(drill.get('size'))} bytes"),
    ]
    if restored:
        rows += [
            ("restore time", f"{cell(drill.get('restore_seconds'))} s"),
            ("restored", f"{cell(drill.get('tables'))} tables, {cell(drill.get('rows'))} rows"),
            ("scratch database", f"{code(restored)} (dropped)"),
        ]
    else:
        rows.append(("restored", "not restored (dry run)"))
    lines = ["", "#### Restore drill", "", "| | |", "|---|---|"]
    return lines + [f"| {name} | {value} |" for name, value in rows]


def summary_markdown(doc: dict[str, Any], exit_code: int, outputs: dict[str, str]) -> str:
    outcome = str(doc.get("outcome") or "error")
    command = doc.get("command") or os.environ.get("ACTION_COMMAND", "")
    environment = doc.get("environment") or "—"
    mark = "✅" if outcome in OUTCOMES_OK else ("⚠️" if outcome == "refused" else "❌")
    lines = [f"### {mark} db-rollback {cell(command)} · {cell(environment)}", ""]
    if outcome == "dry_run":
        lines += ["**Dry run: nothing was changed.**", ""]
    if outcome == "manual_attention":
        lines += [
            "> [!CAUTION]\n> The operation failed after a change began. The database needs "
            "manual attention: read the log file (uploaded with this run's artifacts), which "
            "says what state things are in and how to recover.",
            "",
        ]
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
    lines += ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value != "—"]
    lines += drill_section(doc) + plan_section(doc) + downgrade_section(doc)
    lines += checks_section(doc) + backups_section(doc)
    warnings = doc.get("warnings")
    if isinstance(warnings, list) and warnings:
        lines += ["", "#### Warnings", ""] + [f"- {cell(w)}" for w in warnings]
    lines.append("")
    return "\n".join(lines) + "\n"


def pull_request_number() -> int | None:
    if os.environ.get("GITHUB_EVENT_NAME") not in ("pull_request", "pull_request_target"):
        return None
    try:
        event = json.loads(Path(os.environ["GITHUB_EVENT_PATH"]).read_text(encoding="utf-8"))
        number = event["pull_request"]["number"]
    except (KeyError, OSError, TypeError, ValueError):
        return None
    return number if isinstance(number, int) else None


def _github(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    if urlsplit(url).scheme not in ("https", "http"):
        raise ValueError(f"GITHUB_API_URL is not an http(s) URL: {url}")
    request = Request(  # noqa: S310 - scheme checked above
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "Content-Type": "application/json",
        },
    )
    with urlopen(request, timeout=20) as response:  # noqa: S310 - the runner's GitHub API
        return json.loads(response.read() or b"null")


def comment_plan(doc: dict[str, Any], markdown: str) -> str | None:
    """Write ``markdown`` as the pull request's db-rollback comment for this environment
    and database: the one comment is updated by later runs, never duplicated. Returns
    what was done, or None when there is no token or no pull request."""
    token = os.environ.get("INPUT_GITHUB_TOKEN", "").strip()
    number = pull_request_number()
    if not token or number is None or not doc.get("plan"):
        return None
    api = os.environ.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
    repo = quote(os.environ.get("GITHUB_REPOSITORY", ""), safe="/")
    key = f"{doc.get('environment') or '-'}/{doc.get('database') or '-'}"
    marker = f"<!-- db-rollback plan: {key} -->"
    body = {"body": f"{marker}\n{markdown}"}
    page = 1
    while page <= 20:
        comments = _github(
            "GET", f"{api}/repos/{repo}/issues/{number}/comments?per_page=100&page={page}", token
        )
        if not comments:
            break
        for comment in comments:
            if isinstance(comment, dict) and marker in str(comment.get("body", "")):
                _github("PATCH", f"{api}/repos/{repo}/issues/comments/{comment['id']}", token, body)
                return "updated"
        page += 1
    _github("POST", f"{api}/repos/{repo}/issues/{number}/comments", token, body)
    return "created"


def artifact_name(doc: dict[str, Any]) -> str:
    chosen = os.environ.get("ACTION_ARTIFACT_NAME", "").strip()
    parts = [
        "db-rollback",
        str(doc.get("environment") or os.environ.get("DB_ROLLBACK_ENVIRONMENT") or "unknown"),
        os.environ.get("ACTION_COMMAND") or "run",
        str(doc.get("run_id") or uuid.uuid4().hex[:12]),
    ]
    # Artifact names may not hold these characters.
    return re.sub(r'[":<>|*?\\/\r\n]+', "-", chosen or "-".join(parts))


def artifact_paths(outputs: dict[str, str]) -> list[str]:
    paths: list[str] = []
    log_file = outputs.get("log-file")
    if log_file and Path(log_file).is_file():
        paths.append(log_file)
    backup_file = outputs.get("backup-file", "")
    if os.environ.get("ACTION_COMMAND") in CREATES_BACKUP and backup_file:
        backup_path = Path(backup_file)
        if backup_path.is_absolute() and backup_path.exists():
            paths.append(str(backup_path))
            manifest = backup_path.with_name(backup_path.name + ".json")
            if manifest.is_file():
                paths.append(str(manifest))
    return paths


def annotation(doc: dict[str, Any], exit_code: int) -> str | None:
    outcome = str(doc.get("outcome") or "error")
    command = doc.get("command") or os.environ.get("ACTION_COMMAND", "")
    title = property_escape(f"db-rollback {command}: {outcome}")
    if exit_code != 0 or outcome not in OUTCOMES_OK:
        message = scrub(str(doc.get("message") or EXIT_MEANING.get(exit_code, "failed")))
        return f"::error title={title}::{annotation_escape(message)}"
    if outcome == "dry_run":
        return f"::notice title={title}::dry run, nothing was changed"
    return None


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--secrets"]:
        # For run.sh's ::add-mask:: lines: one secret spelling a line.
        sys.stdout.write("".join(f"{s}\n" for s in SECRETS if "\n" not in s and "\r" not in s))
        return 0
    if argv[1:2] == ["--scrub-words"]:
        # The command line to show, each word scrubbed (NUL-separated, for run.sh's %q).
        words = argv[2:]
        secrets = find_secrets(*words)
        sys.stdout.write("".join(scrub(word, secrets) + "\0" for word in words))
        return 0
    if len(argv) != 3 or not argv[2].lstrip("-").isdigit():
        sys.stderr.write("usage: report.py RESULT_JSON EXIT_CODE\n")
        return 2
    exit_code = int(argv[2])
    doc = load_result(Path(argv[1]), exit_code)

    def text(key: str) -> str:
        value = doc.get(key)
        return "" if value is None else str(value)

    outputs = {
        "outcome": str(doc.get("outcome") or "error"),
        "exit-code": str(exit_code),
        "run-id": text("run_id"),
        "backup-file": backup_location(doc),
        "backup-sha256": text("backup_sha256"),
        "backup-uri": host_uri(text("backup_uri")),
        "revision-before": text("revision_before"),
        "revision-after": text("revision_after"),
        "log-file": host_path(text("log_file")),
        "artifact-name": artifact_name(doc),
    }
    outputs["artifact-paths"] = "\n".join(artifact_paths(outputs))
    write_outputs(outputs)

    markdown = summary_markdown(doc, exit_code, outputs)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with Path(summary_file).open("a", encoding="utf-8") as fh:
            fh.write(markdown)
    try:
        comment_plan(doc, markdown)
    except (HTTPError, URLError, OSError, ValueError) as exc:
        reason = annotation_escape(
            "pull request comment not written: " + scrub(f"{type(exc).__name__}: {exc}")
        )
        sys.stdout.write(f"::warning title=db-rollback::{reason}\n")

    line = annotation(doc, exit_code)
    if line:
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
