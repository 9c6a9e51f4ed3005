"""Helpers for the kill -9 matrix: run the real CLI, SIGKILL it at a log event, then look.

The CLI runs as a child process with ``--log-format json``, so every log event is one JSON
line on its stderr. :func:`run_and_kill` reads those lines as they come and sends SIGKILL to
the CLI (only the CLI: its pg_dump/pg_restore children are left to linger) when the Nth
event matching a :class:`KillPoint` appears, after an optional delay.

:func:`server_state` and :func:`stray_artifacts` describe what a run left on the server, for
the invariants and for the evidence printed when one breaks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from rollback_cli.files import TEMP_PREFIX
from rollback_cli.postgres import registry
from rollback_cli.postgres.lock import lock_key
from tests.rollback_helpers import Project

# How long a run may take to reach its kill point (or finish) before the test gives up.
RUN_TIMEOUT = 120.0
# How long the server may take to notice that the killed client's sessions are gone.
SESSION_GRACE = 10.0
APP_PREFIX = "db-rollback "


@dataclass(frozen=True)
class KillPoint:
    """Kill ``command`` when the ``nth`` log event named ``event`` (in ``step``, if given)
    appears, ``delay`` seconds later."""

    command: str
    event: str
    step: str | None = None
    delay: float = 0.0
    nth: int = 1

    @property
    def id(self) -> str:
        what = self.event.replace(" ", "-")
        if self.event == "step started" and self.step:
            what = f"start-{self.step}"
        elif self.step:
            what = f"{what}@{self.step}"
        nth = f"#{self.nth}" if self.nth != 1 else ""
        return f"{self.command}:{what}{nth}+{round(self.delay * 1000)}ms"

    def matches(self, event: dict[str, Any]) -> bool:
        if event.get("event") != self.event:
            return False
        return self.step is None or event.get("step") == self.step


@dataclass
class KillOutcome:
    """What happened to one run: killed at its point, or finished before it."""

    killed: bool
    returncode: int
    events: list[dict[str, Any]]
    kill_index: int | None = None  # index in ``events`` of the event that triggered the kill
    pgid: int | None = None

    def errors(self) -> list[str]:
        """The run's error events (and any line that was not JSON)."""
        return [brief_event(e) for e in self.events if "raw" in e or e.get("level") == "error"]

    def last_events(self, count: int = 8) -> list[str]:
        """The last ``count`` events up to (and including) the kill point, one line each."""
        end = len(self.events) if self.kill_index is None else self.kill_index + 1
        return [brief_event(e) for e in self.events[max(0, end - count) : end]]


def brief_event(event: dict[str, Any]) -> str:
    if "raw" in event:
        return f"raw: {event['raw'][:160]}"
    skip = {"event", "step", "run_id", "environment", "command", "actor", "timestamp", "logger"}
    extra = {k: v for k, v in event.items() if k not in skip and k != "level"}
    text = f"[{event.get('step')}] {event.get('event')}"
    if extra:
        text += " " + json.dumps(extra, default=str)[:200]
    return text


def cli_argv(project: Project, *args: str) -> list[str]:
    return [sys.executable, "-m", "rollback_cli", *project.base_args(), *args]


def _read_lines(stream: Any, sink: queue.Queue[dict[str, Any] | None]) -> None:
    try:
        for line in stream:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            sink.put(parsed if isinstance(parsed, dict) else {"raw": line})
    finally:
        sink.put(None)


def run_and_kill(
    project: Project,
    args: list[str],
    env: dict[str, str],
    point: KillPoint,
    started: list[int],
) -> KillOutcome:
    """Run the CLI with ``args``; SIGKILL it at ``point``; wait until it is dead. The
    process group of the run is appended to ``started`` (for :func:`kill_group`)."""
    proc = subprocess.Popen(
        cli_argv(project, *args),
        env=env,
        cwd=str(project.workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started.append(proc.pid)
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True)
    reader.start()
    events: list[dict[str, Any]] = []
    seen = 0
    kill_index: int | None = None
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            try:
                event = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{point.id}: no kill point and no exit within {RUN_TIMEOUT}s; last events: "
                    + " | ".join(brief_event(e) for e in events[-8:])
                ) from None
            if event is None:
                break  # stderr closed: the run finished before its kill point
            events.append(event)
            if point.matches(event):
                seen += 1
                if seen == point.nth:
                    kill_index = len(events) - 1
                    if point.delay:
                        time.sleep(point.delay)
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    break
        returncode = proc.wait(timeout=60)
    except BaseException:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    # Whatever the CLI wrote before it died (a child may keep the pipe open: don't wait long).
    reader.join(timeout=2)
    while True:
        try:
            event = lines.get_nowait()
        except queue.Empty:
            break
        if event is not None:
            events.append(event)
    killed = returncode == -signal.SIGKILL
    return KillOutcome(killed, returncode, events, kill_index if killed else None, proc.pid)


def run_cli(
    project: Project, args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(project, *args),
        env=env,
        cwd=str(project.workdir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """The warnings and errors among a run's JSON log lines, one line each."""
    found = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                found.append(f"raw: {line[:200]}")
            continue
        if isinstance(event, dict) and event.get("level") in ("warning", "error", "critical"):
            found.append(brief_event(event))
    return found


def kill_group(pgid: int | None) -> None:
    """SIGKILL what is left of a run we started (its orphaned client tools), at teardown."""
    if pgid is None:
        return
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------- server side


def _related(project: Project) -> tuple[str, str]:
    return project.db.name, project.db.name + "_"


def server_state(project: Project) -> dict[str, Any]:
    """The databases related to the project's database (name, datallowconn, comment) and
    the server sessions of any db-rollback run."""
    server = project.db.server
    databases = server.query(
        "SELECT datname, oid, datallowconn, shobj_description(oid, 'pg_database') "
        "FROM pg_database WHERE datname = %s OR starts_with(datname, %s) ORDER BY 1",
        _related(project),
    )
    sessions = run_sessions(project)
    return {
        "databases": [
            {"name": n, "oid": o, "allow_conn": a, "comment": _short_comment(c)}
            for n, o, a, c in databases
        ],
        "sessions": sessions,
    }


def _short_comment(comment: str | None) -> str | None:
    if comment is None:
        return None
    record = registry.ArtifactRecord.from_comment(comment)
    if record is None:
        return comment[:80]
    bits = [record.kind, f"of={record.of}"]
    if record.state:
        bits.append(f"state={record.state}")
    if record.pid:
        bits.append(f"pid={record.pid}")
    if record.replaced_by:
        bits.append(f"replaced_by={record.replaced_by}")
    return "record(" + ", ".join(bits) + ")"


def run_sessions(project: Project) -> list[dict[str, Any]]:
    rows = project.db.server.query(
        "SELECT pid, datname, application_name, state, left(query, 80) FROM pg_stat_activity "
        "WHERE starts_with(application_name, %s) AND pid <> pg_backend_pid() ORDER BY pid",
        (APP_PREFIX,),
    )
    return [
        {"pid": p, "database": d, "application_name": a, "state": s, "query": q}
        for p, d, a, s, q in rows
    ]


def live_allows_connections(project: Project) -> bool | None:
    rows = project.db.server.query(
        "SELECT datallowconn FROM pg_database WHERE datname = %s", (project.db.name,)
    )
    return bool(rows[0][0]) if rows else None


def records(project: Project) -> list[tuple[str, registry.ArtifactRecord]]:
    """(database name, record) of every database carrying a record of the project's db."""
    rows = project.db.server.query(
        "SELECT d.datname, shobj_description(d.oid, 'pg_database') FROM pg_database d "
        "WHERE shobj_description(d.oid, 'pg_database') IS NOT NULL"
    )
    found = []
    for name, comment in rows:
        record = registry.ArtifactRecord.from_comment(comment)
        if record is not None and record.of == project.db.name:
            found.append((name, record))
    return found


def _lock_holders(project: Project) -> int:
    classid, objid = lock_key(project.db.name)
    rows = project.db.server.query(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = (%s::bigint & 4294967295)::oid "
        "AND objid = (%s::bigint & 4294967295)::oid AND objsubid = 2",
        (classid, objid),
    )
    return int(rows[0][0])


def _alive(project: Project, pids: set[int]) -> set[int]:
    if not pids:
        return set()
    rows = project.db.server.query(
        "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (sorted(pids),)
    )
    return {int(r[0]) for r in rows}


def wait_for_dead_run_sessions(project: Project) -> tuple[float, list[str]]:
    """Wait until the server has noticed that the killed CLI is gone: its rollback lock is
    released and the sessions its records name (scratch creator, swapping session) ended.
    (seconds waited, what was still there when the grace period ran out)."""
    started = time.monotonic()
    deadline = started + SESSION_GRACE
    while True:
        pids = {r.pid for _, r in records(project) if r.pid is not None and r.kind != "kept"}
        pids |= {r.pid for _, r in records(project) if r.state == registry.SWAPPING and r.pid}
        alive = _alive(project, pids)
        holders = _lock_holders(project)
        if not alive and not holders:
            return time.monotonic() - started, []
        if time.monotonic() > deadline:
            left = [f"record session pid {p} alive" for p in sorted(alive)]
            if holders:
                left.append("rollback lock still held")
            return time.monotonic() - started, left
        time.sleep(0.05)


def stray_artifacts(project: Project) -> list[str]:
    """What cleanup must not leave: records other than kept ones (scratch, verify, in-place),
    swapping records, ``_rb_`` databases, ``.tmp-`` files in the backup dir, db-rollback
    server sessions."""
    problems = []
    for name, record in records(project):
        # Only kept databases (for undo) may carry a record once a run is over.
        if record.kind != registry.KEPT:
            problems.append(f"database {name} carries a {record.kind} record")
        if record.state == registry.SWAPPING:
            problems.append(f"database {name} carries a swapping record")
    for name in project.db.related_databases():
        if "_rb_" in name:
            problems.append(f"database {name} (_rb_) exists")
    if project.backup_dir.is_dir():
        for path in sorted(project.backup_dir.rglob(f"{TEMP_PREFIX}*")):
            problems.append(f"temp file {path.relative_to(project.workdir)} left")
    for session in run_sessions(project):
        problems.append(
            f"session pid {session['pid']} ({session['application_name']!r} on "
            f"{session['database']}, {session['state']}: {session['query']!r})"
        )
    return problems


@dataclass(frozen=True)
class DbState:
    """One acceptable state of the live database: data, schema and revision."""

    label: str
    fingerprint: dict[str, str]
    schema: str
    revision: str | None


def capture_state(project: Project, label: str) -> DbState:
    return DbState(label, project.data_fingerprint(), project.schema_dump(), project.revision())


def match_state(project: Project, states: list[DbState]) -> tuple[str | None, str]:
    """The label of the state the live database is in (None: neither) and a description."""
    now = capture_state(project, "now")
    for state in states:
        if now.fingerprint == state.fingerprint and now.schema == state.schema:
            return state.label, f"live = {state.label} (revision {now.revision})"
    parts = []
    for state in states:
        tables = sorted(
            t
            for t in set(now.fingerprint) | set(state.fingerprint)
            if now.fingerprint.get(t) != state.fingerprint.get(t)
        )
        parts.append(
            f"vs {state.label}: tables differing {tables}, schema "
            f"{'same' if now.schema == state.schema else 'differs'}"
        )
    return None, f"live matches neither (revision {now.revision}); " + "; ".join(parts)


@dataclass
class PointResult:
    point_id: str
    intact: bool
    detail: str
    evidence: list[str] = field(default_factory=list)


def describe_state(state: dict[str, Any]) -> list[str]:
    lines = [
        f"  db {d['name']} (oid {d['oid']}) allow_conn={d['allow_conn']} comment={d['comment']}"
        for d in state["databases"]
    ]
    lines += [f"  session {s}" for s in state["sessions"]]
    return lines
