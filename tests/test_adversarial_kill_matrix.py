"""kill -9 matrix: a rollback killed with SIGKILL anywhere never leaves the database worse.

Each point runs the real CLI (``python -m rollback_cli``, JSON logs on stderr) on a fresh
database and SIGKILLs it when a given log event appears (after 0, 20 or 100 ms). Only the
CLI is killed: its pg_dump/pg_restore children may linger. Then ONE command of ours,
``cleanup-artifacts --yes``, must be enough for:

1. the live database name to accept connections;
2. it to serve either the old (pre-rollback) or the new (rolled-back) state: data
   fingerprint, schema dump and Alembic revision of one of the two, never a mix;
3. nothing of the killed run to be left: no database carrying a scratch/verify (or
   swapping) record of the database, no ``_rb_`` database, no ``.tmp-`` file in the backup
   directory, no server session whose application_name starts with ``db-rollback ``;
4. ``status`` to exit 0 (a rollback could run again).

A run that finishes before its kill point "completed normally"; the invariants still hold.
Each point asserts its own invariants; the last test prints ``kill -9 matrix: N/N intact``.
PostgreSQL 15 only, the example project's small data, to keep the matrix quick.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from devtools.project import EXAMPLES_DIR, sqlalchemy_url
from tests.kill_helpers import (
    DbState,
    KillPoint,
    PointResult,
    capture_state,
    describe_state,
    error_lines,
    kill_group,
    live_allows_connections,
    match_state,
    run_and_kill,
    run_cli,
    server_state,
    stray_artifacts,
    wait_for_dead_run_sessions,
)
from tests.rollback_helpers import REV_DROP_EMAIL, REV_TIER, Project, tier_project
from tests.servers import PostgresCluster, TestDatabase, temporary_database

STARTED = "step started"

# (command, event, step, delay): the command's ids are data (swap strategy), inplace,
# schema (head → REV_TIER), full (REV_TIER from a backup taken there), fulldown (REV_TIER
# from a backup taken at head) and undo (after one completed data rollback).
POINTS = [
    # rollback data, swap strategy (the default)
    KillPoint("data", STARTED, "preflight"),
    KillPoint("data", STARTED, "verify-backup"),
    KillPoint("data", STARTED, "verify-checksum"),
    KillPoint("data", "lock acquired"),
    KillPoint("data", STARTED, "restore"),
    KillPoint("data", "restoring"),
    KillPoint("data", "restoring", delay=0.1),
    KillPoint("data", STARTED, "validate-scratch"),
    KillPoint("data", STARTED, "swap"),
    KillPoint("data", "connections blocked"),
    KillPoint("data", "connections blocked", delay=0.02),
    KillPoint("data", "live database renamed"),
    KillPoint("data", "replacement renamed"),
    KillPoint("data", "databases swapped"),
    KillPoint("data", STARTED, "validate"),
    KillPoint("data", "validation check", nth=2),
    # the safety backup of the kept database, after the swap and validation
    KillPoint("data", "recovered"),
    KillPoint("data", STARTED, "safety-backup"),
    KillPoint("data", STARTED, "dump", delay=0.02),
    KillPoint("data", STARTED, "store"),
    # rollback data --safety-backup-timing during-restore: the live database dumped beside
    # the restore, stored before the swap
    KillPoint("beside", STARTED, "safety-backup"),
    KillPoint("beside", STARTED, "dump", delay=0.02),
    KillPoint("beside", "restoring"),
    KillPoint("beside", STARTED, "store"),
    KillPoint("beside", STARTED, "validate-scratch"),
    KillPoint("beside", STARTED, "swap"),
    KillPoint("beside", "databases swapped"),
    # rollback data --strategy in-place
    KillPoint("inplace", "lock acquired"),
    KillPoint("inplace", STARTED, "stop-writers"),
    KillPoint("inplace", STARTED, "safety-backup", delay=0.02),
    KillPoint("inplace", STARTED, "restore-in-place"),
    KillPoint("inplace", "sessions ended for the in-place restore"),
    KillPoint("inplace", "sessions ended for the in-place restore", delay=0.02),
    KillPoint("inplace", STARTED, "validate"),
    # rollback schema --to-revision REV_TIER, from head: the rehearsal on a copy first
    KillPoint("schema", STARTED, "rehearsal-copy"),
    KillPoint("schema", "restoring"),
    KillPoint("schema", STARTED, "rehearsal"),
    KillPoint("schema", STARTED, "rehearsal", delay=0.05),
    KillPoint("schema", "lock acquired"),
    KillPoint("schema", STARTED, "safety-backup"),
    KillPoint("schema", STARTED, "downgrade"),
    KillPoint("schema", STARTED, "downgrade", delay=0.02),
    KillPoint("schema", STARTED, "downgrade", delay=0.1),
    KillPoint("schema", STARTED, "validate"),
    # rollback full --to-revision REV_TIER --backup-file B
    KillPoint("full", STARTED, "verify-backup"),
    KillPoint("full", STARTED, "safety-backup"),
    KillPoint("full", STARTED, "restore", delay=0.02),
    # rollback full from a backup at head down to REV_TIER: the restored copy is
    # downgraded before the swap
    KillPoint("fulldown", STARTED, "restore"),
    KillPoint("fulldown", STARTED, "downgrade-copy"),
    KillPoint("fulldown", STARTED, "downgrade-copy", delay=0.02),
    KillPoint("fulldown", "connections blocked"),
    KillPoint("fulldown", "databases swapped"),
    KillPoint("fulldown", STARTED, "safety-backup"),
    KillPoint("full", "connections blocked"),
    KillPoint("full", "live database renamed"),
    KillPoint("full", "replacement renamed"),
    KillPoint("full", STARTED, "validate"),
    # rollback undo, after one completed data rollback
    KillPoint("undo", STARTED, "preflight"),
    KillPoint("undo", "lock acquired"),
    KillPoint("undo", STARTED, "swap"),
    KillPoint("undo", "connections blocked"),
    KillPoint("undo", "live database renamed"),
    KillPoint("undo", "replacement renamed"),
    KillPoint("undo", "databases swapped"),
    KillPoint("undo", STARTED, "validate"),
]

# One line per point, in the order they ran: (point id, intact, detail).
RESULTS: list[PointResult] = []


def _copy_examples(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(EXAMPLES_DIR / "alembic.ini", target / "alembic.ini")
    shutil.copytree(
        EXAMPLES_DIR / "migrations",
        target / "migrations",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return target / "alembic.ini"


def _alembic_downgrade(project: Project, revision: str) -> None:
    config = Config(str(project.alembic_ini))
    config.attributes["configure_logger"] = False
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(project.db.url).replace("%", "%%"))
    command.downgrade(config, revision)


@pytest.fixture(scope="module")
def schema_rolled_back(pg15: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> DbState:
    """What a completed schema rollback head → REV_TIER leaves (the migrations' data is
    deterministic): alembic downgrade on a database built like the test's."""
    base = tmp_path_factory.mktemp("kill_matrix_reference")
    ini = _copy_examples(base / "alembic_project")
    with temporary_database(pg15) as db:
        project = tier_project(db, ini, base)
        project.upgrade(REV_DROP_EMAIL)
        _alembic_downgrade(project, REV_TIER)
        return capture_state(project, "new (downgraded)")


def _after_deploy(project: Project) -> None:
    """Change the live data after the backup, so old and new states differ."""
    project.db.execute("DELETE FROM orders WHERE id % 10 = 0")
    project.db.execute("UPDATE customers SET name = name || ' (changed)'")


@dataclass
class Scenario:
    project: Project
    args: list[str]
    states: list[DbState]  # the acceptable states of the live database: old, new


#: the points of the swap scenarios are those of a safety backup after the swap, whatever
#: ``auto`` picks on the machine running the tests
AFTER_SWAP = ["--safety-backup-timing", "after-swap"]


def _scenario(
    kind: str, db: TestDatabase, alembic_ini: Path, tmp_path: Path, schema_new: DbState
) -> Scenario:
    project = tier_project(db, alembic_ini, tmp_path)
    if kind == "schema":
        project.upgrade(REV_DROP_EMAIL)
        old = capture_state(project, "old (head)")
        return Scenario(
            project, ["rollback", "schema", "--to-revision", REV_TIER, "--yes"], [old, schema_new]
        )
    if kind == "fulldown":
        project.upgrade(REV_DROP_EMAIL)
        backup = project.backup()
        # What the rollback leaves: the backup's data, downgraded to REV_TIER.
        _alembic_downgrade(project, REV_TIER)
        downgraded = capture_state(project, "new (backup, downgraded)")
        project.upgrade(REV_DROP_EMAIL)
        _after_deploy(project)
        old = capture_state(project, "old (head, changed)")
        args = ["rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup, "--yes"]
        return Scenario(project, [*args, *AFTER_SWAP], [old, downgraded])
    backup = project.backup()
    restored = capture_state(project, "new (backup)")
    _after_deploy(project)
    if kind == "full":
        project.upgrade(REV_DROP_EMAIL)
        old = capture_state(project, "old (head, changed)")
        args = ["rollback", "full", "--to-revision", REV_TIER, "--backup-file", backup, "--yes"]
        return Scenario(project, [*args, *AFTER_SWAP], [old, restored])
    changed = capture_state(project, "changed")
    if kind == "undo":
        result = project.run("rollback", "data", "--backup-file", backup, "--yes")
        assert result.exit_code == 0, result.stderr
        assert project.data_fingerprint() == restored.fingerprint
        return Scenario(
            project,
            ["rollback", "undo", "--yes"],
            [
                replace(restored, label="old (backup, restored by a data rollback)"),
                replace(changed, label="new (undone: changed)"),
            ],
        )
    args = ["rollback", "data", "--backup-file", backup, "--yes"]
    if kind == "inplace":
        args += ["--strategy", "in-place"]
    elif kind == "beside":
        args += ["--safety-backup-timing", "during-restore"]
    else:
        args += AFTER_SWAP
    return Scenario(
        project,
        args,
        [replace(changed, label="old (changed)"), restored],
    )


@pytest.fixture
def started_runs() -> Iterator[list[int]]:
    """Process groups of the CLI runs a test started; what is left of them goes at teardown."""
    started: list[int] = []
    yield started
    for pgid in started:
        kill_group(pgid)


@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
def test_kill_9(
    point: KillPoint,
    database15: TestDatabase,
    alembic_project: Path,
    tmp_path: Path,
    cli_env: dict[str, str],
    schema_rolled_back: DbState,
    started_runs: list[int],
) -> None:
    scenario = _scenario(point.command, database15, alembic_project, tmp_path, schema_rolled_back)
    project = scenario.project

    outcome = run_and_kill(project, scenario.args, cli_env, point, started_runs)
    problems: list[str] = []
    evidence: list[str] = []
    if outcome.killed:
        how = f"killed at {point.id}"
    else:
        how = f"completed normally (exit {outcome.returncode})"
        if outcome.returncode != 0:
            problems.append(
                f"the run failed before its kill point: exit {outcome.returncode}: "
                f"{outcome.errors()[:2]}"
            )
    waited, still_alive = wait_for_dead_run_sessions(project)
    if still_alive:
        evidence.append(f"after {waited:.1f}s the killed run still had: {still_alive}")
    before = server_state(project)

    # ONE command of ours.
    cleanup = run_cli(project, ["cleanup-artifacts", "--yes"], cli_env)
    cleanup_notes = error_lines(cleanup.stderr)
    if cleanup.returncode != 0:
        problems.append(f"cleanup-artifacts exited {cleanup.returncode}: {cleanup_notes[-1:]}")

    # (1) the live name accepts connections
    connectable = True
    try:
        project.db.connect().close()
    except Exception as exc:
        connectable = False
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(
            f"cannot connect to {project.db.name} "
            f"(datallowconn={live_allows_connections(project)}): {first}"
        )
    # (2) old or new state, never a mix
    state_detail = "live not checked"
    if connectable:
        label, state_detail = match_state(project, scenario.states)
        if label is None:
            problems.append(state_detail)
    # (3) nothing of the killed run is left
    problems += stray_artifacts(project)
    # (4) a rollback could run again
    status = project.run("status")
    if status.exit_code != 0:
        problems.append(f"status exited {status.exit_code}: {status.stderr.strip()[-300:]}")
    # Nothing that lingered (an orphaned pg_restore, say) changed the state afterwards.
    if connectable and not problems:
        label, later = match_state(project, scenario.states)
        if label is None:
            problems.append(f"after status: {later}")

    intact = not problems
    detail = f"{how}; {state_detail}"
    if not intact:
        evidence += [
            f"last events before the kill: {outcome.last_events()}",
            "state before cleanup:",
            *describe_state(before),
            f"cleanup exit {cleanup.returncode}; its warnings/errors: {cleanup_notes}",
            "state after cleanup:",
            *describe_state(server_state(project)),
        ]
        detail = f"{detail}; problems: {problems}"
    RESULTS.append(PointResult(point.id, intact, detail, evidence))
    assert intact, "\n".join([f"{point.id}: {how}", *problems, *evidence])


def test_kill_matrix_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last: ``kill -9 matrix: N/N intact`` on the terminal, even without -s."""
    if not RESULTS:
        pytest.skip("no kill point ran")
    intact = sum(r.intact for r in RESULTS)
    with capsys.disabled():
        print(f"\nkill -9 matrix: {intact}/{len(RESULTS)} intact")
        for result in RESULTS:
            print(f"  {'intact' if result.intact else 'BROKEN'} {result.point_id}: {result.detail}")
    assert intact == len(RESULTS), f"{len(RESULTS) - intact} kill point(s) broke the promise"
