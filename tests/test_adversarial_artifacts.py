"""Adversarial suite: artifacts known by identity, and a swap that carries the database
faithfully. Each test reproduces an attack or an unlucky operator's situation against a
real PostgreSQL server and asserts that the tool does not make it worse.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from rollback_cli.errors import ExitCode
from rollback_cli.postgres import registry
from rollback_cli.postgres.names import PRE_MARK, SCRATCH_MARK, VERIFY_MARK, derived_name
from tests.rollback_helpers import REV_TIER, Project, RoleDatabase, tier_project
from tests.servers import PostgresCluster, TestDatabase

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def named_project(
    pg15: PostgresCluster, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> Iterator[Callable[..., Project]]:
    """Make example-project databases with chosen names; all of them (and every database
    whose record belongs to them) go at teardown."""
    made: list[TestDatabase] = []

    def make(name: str, sub: str = "work") -> Project:
        db = TestDatabase(name=name, server=pg15)
        pg15.create_database(name)
        made.append(db)
        project = Project(db, alembic_project, tmp_path / sub)
        project.workdir.mkdir(parents=True, exist_ok=True)
        project.upgrade(REV_TIER)
        return project

    yield make
    for db in made:
        drop_with_artifacts(db)


def drop_with_artifacts(db: TestDatabase) -> None:
    conn = psycopg2.connect(db.server.url("postgres"))
    conn.autocommit = True
    try:
        names = [a.name for a in registry.artifacts_of(conn, db.name)]
    finally:
        conn.close()
    for name in [*names, *db.related_databases(), db.name]:
        db.server.drop_database(name)


def settings_of(server: PostgresCluster, dbname: str) -> list[tuple[str | None, list[str]]]:
    rows = server.query(
        """
        SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END,
               s.setconfig
        FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
        WHERE d.datname = %s ORDER BY 1 NULLS FIRST
        """,
        (dbname,),
    )
    return [(r[0], sorted(r[1])) for r in rows]


def accepts_connections(server: PostgresCluster, dbname: str) -> bool:
    rows = server.query("SELECT datallowconn FROM pg_database WHERE datname = %s", (dbname,))
    return bool(rows and rows[0][0])


def rollback_data(project: Project, backup: str, *extra: str) -> tuple[int, dict]:
    result, doc = project.run_json("rollback", "data", "--backup-file", backup, *extra)
    return result.exit_code, doc


# --- 1. artifacts are known by record, never by name ----------------------------------------


def test_undo_never_swaps_in_another_databases_kept_copy(
    named_project: Callable[..., Project],
) -> None:
    """Databases shop and shop_pre_prod: a rollback of shop_pre_prod keeps a database named
    shop_pre_prod_pre_<ts>; undo on shop must not take it for shop's."""
    base = f"shop_{uuid.uuid4().hex[:6]}"
    shop = named_project(base, "a")
    other = named_project(f"{base}_pre_prod", "b")
    backup = other.backup()
    other.db.execute("DELETE FROM orders")
    assert rollback_data(other, backup)[0] == 0
    before = shop.data_fingerprint()

    result = shop.run("rollback", "undo")

    assert result.exit_code == ExitCode.REFUSED, result.stderr
    assert "no kept pre-rollback database" in result.stderr
    assert shop.data_fingerprint() == before
    listed = shop.run_json("backup", "list")[1]["kept_databases"]
    assert listed == []


@pytest.mark.parametrize("mark", [PRE_MARK, SCRATCH_MARK, VERIFY_MARK])
def test_user_databases_named_like_ours_are_never_touched(project15: Project, mark: str) -> None:
    lookalike = f"{project15.db.name}{mark}20200101120000"
    project15.db.server.create_database(lookalike)

    assert project15.run("cleanup-artifacts", "--keep-days", "0").exit_code == 0
    assert lookalike in project15.databases()
    assert project15.run("rollback", "undo").exit_code == ExitCode.REFUSED
    assert lookalike not in project15.run("backup", "list").stdout
    assert lookalike not in project15.run("--json", "status").stdout


def test_derived_names_of_long_names_fit_and_never_collide() -> None:
    shared = "a" * 45
    first, second = shared + "b" * 17, shared + "c" * 17  # 62 bytes each
    for mark in (PRE_MARK, SCRATCH_MARK, VERIFY_MARK):
        one, two = derived_name(first, mark), derived_name(second, mark)
        assert one != two
        assert len(one.encode()) <= 63 and len(two.encode()) <= 63
        assert "~" in one  # shortened, and the name says so
    multibyte = "é" * 31  # 62 bytes
    assert len(derived_name(multibyte, PRE_MARK).encode()) <= 63
    assert derived_name("shop", PRE_MARK).startswith("shop_pre_")  # short names unchanged


def test_rollbacks_of_two_long_names_each_get_their_own_data(
    named_project: Callable[..., Project],
) -> None:
    shared = f"l{uuid.uuid4().hex[:8]}" + "x" * 36  # 45 bytes
    a = named_project(shared + "a" * 17, "a")
    b = named_project(shared + "b" * 17, "b")
    a.db.execute("UPDATE customers SET name = 'A-' || name")
    before_a, before_b = a.data_fingerprint(), b.data_fingerprint()
    backup_a, backup_b = a.backup(), b.backup()
    a.db.execute("DELETE FROM orders")
    b.db.execute("DELETE FROM orders")

    code_a, doc_a = rollback_data(a, backup_a)
    code_b, doc_b = rollback_data(b, backup_b)

    assert code_a == 0 and code_b == 0
    assert a.data_fingerprint() == before_a and b.data_fingerprint() == before_b
    assert doc_a["kept_database"] != doc_b["kept_database"]
    assert all(len(d["kept_database"].encode()) <= 63 for d in (doc_a, doc_b))


@pytest.mark.parametrize("kind", [registry.SCRATCH, registry.VERIFY])
def test_cleanup_spares_a_copy_whose_run_is_still_going(project15: Project, kind: str) -> None:
    """Another run's scratch (a rollback or a restore test) is in use until its session
    ends; cleanup-artifacts for the same database must leave it alone."""
    server = project15.db.server
    copy = derived_name(
        project15.db.name, SCRATCH_MARK if kind == registry.SCRATCH else VERIFY_MARK
    )
    server.create_database(copy)
    running = psycopg2.connect(server.url("postgres"))
    running.autocommit = True
    try:
        registry.write(running, copy, registry.new_record(running, kind, project15.db.name, "r1"))
        assert project15.run("cleanup-artifacts").exit_code == 0
        assert copy in project15.databases()
    finally:
        running.close()
    time.sleep(0.2)  # the session is gone: the run has ended
    assert project15.run("cleanup-artifacts").exit_code == 0
    assert copy not in project15.databases()


def test_undo_refuses_when_the_last_kept_database_is_gone(project15: Project) -> None:
    backup = project15.backup()
    _, first = rollback_data(project15, backup)
    time.sleep(1.1)  # kept names carry seconds
    _, second = rollback_data(project15, backup)
    project15.db.server.drop_database(second["kept_database"])
    before = project15.data_fingerprint()

    result = project15.run("rollback", "undo")

    assert result.exit_code == ExitCode.REFUSED, result.stderr
    assert "kept by the last rollback" in result.stderr
    assert first["kept_database"] in result.stderr  # the older one is named, not used
    assert project15.data_fingerprint() == before
    assert first["kept_database"] in project15.databases()


def test_undo_twice_goes_back_and_forth(project15: Project) -> None:
    before = project15.data_fingerprint()
    backup = project15.backup()
    project15.db.execute("DELETE FROM orders")
    after_bad_deploy = project15.data_fingerprint()
    assert rollback_data(project15, backup)[0] == 0
    assert project15.data_fingerprint() == before
    assert project15.run("rollback", "undo").exit_code == 0
    assert project15.data_fingerprint() == after_bad_deploy
    assert project15.run("rollback", "undo").exit_code == 0
    assert project15.data_fingerprint() == before


# --- 2. the swap carries the database faithfully --------------------------------------------


@pytest.mark.parametrize(
    "search_path",
    ["app, public", '"My Schema", public', 'app, "$user", public'],
    ids=["plain-list", "quoted-element", "user-element"],
)
def test_list_valued_settings_survive_rollback_and_undo(
    project15: Project, search_path: str
) -> None:
    server, name = project15.db.server, project15.db.name
    project15.db.execute('CREATE SCHEMA app; CREATE SCHEMA "My Schema"')
    server.execute(f'ALTER DATABASE "{name}" SET search_path = {quote_list(search_path)}')
    server.execute(f"ALTER DATABASE \"{name}\" SET work_mem = '8MB'")
    expected = settings_of(server, name)
    backup = project15.backup()

    assert rollback_data(project15, backup)[0] == 0
    assert settings_of(server, name) == expected
    assert project15.db.query("SELECT count(*) FROM customers")[0][0] > 0

    assert project15.run("rollback", "undo").exit_code == 0
    assert settings_of(server, name) == expected


def quote_list(search_path: str) -> str:
    """A search_path as SQL: each element its own literal (as a person would type it)."""
    items = [item.strip() for item in search_path.split(",")]
    return ", ".join(
        "'" + item.strip('"') + "'" if item != '"$user"' else "'$user'" for item in items
    )


def test_tables_outside_public_restore_and_verify(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> None:
    """search_path = app_schema and every table (alembic_version too) in app_schema: the
    scratch copy must be validated with the settings it will have once live."""
    server = database15.server
    database15.execute("CREATE SCHEMA app_schema")
    server.execute(f'ALTER DATABASE "{database15.name}" SET search_path = app_schema')
    project = tier_project(database15, alembic_project, tmp_path)
    assert (
        project.db.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'app_schema'")[0][0]
        >= 3
    )
    backup = project.backup()
    before = project.data_fingerprint()

    assert project.run("backup", "verify", backup, "--restore-test").exit_code == 0
    project.db.execute("DELETE FROM orders")
    assert rollback_data(project, backup)[0] == 0
    assert project.data_fingerprint() == before


def test_per_role_settings_survive_the_swap(project15: Project) -> None:
    server, name = project15.db.server, project15.db.name
    role = f"app_{uuid.uuid4().hex[:6]}"
    server.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        server.execute(f'ALTER ROLE "{role}" IN DATABASE "{name}" SET statement_timeout = \'7s\'')
        server.execute(f'ALTER ROLE "{role}" IN DATABASE "{name}" SET search_path = a, b')
        expected = settings_of(server, name)
        assert rollback_data(project15, project15.backup())[0] == 0
        assert settings_of(server, name) == expected
    finally:
        drop_with_artifacts(project15.db)
        server.execute(f'DROP ROLE "{role}"')


@pytest.mark.parametrize("odd", ["pct%s", "pct%%d", "quote'q", 'dq"x', "sp ace"])
def test_odd_database_names_roll_back_and_undo(
    named_project: Callable[..., Project], odd: str
) -> None:
    project = named_project(f"t_{uuid.uuid4().hex[:6]}_{odd}")
    before = project.data_fingerprint()
    backup = project.backup()
    project.db.execute("DELETE FROM orders")

    code, doc = rollback_data(project, backup)

    assert code == 0, doc
    assert project.data_fingerprint() == before
    assert accepts_connections(project.db.server, project.db.name)
    assert project.run("rollback", "undo").exit_code == 0
    assert accepts_connections(project.db.server, project.db.name)


def make_role_owner(
    database: TestDatabase, alembic_project: Path, tmp_path: Path, *, member_of: str | None
) -> tuple[RoleDatabase, str]:
    server = database.server
    role = f"dep_{uuid.uuid4().hex[:8]}"
    password = "dep-Pa55:w/rd"
    server.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'")
    server.execute(f"GRANT pg_signal_backend TO {role}")
    if member_of:
        server.execute(f"GRANT {member_of} TO {role}")
    return RoleDatabase(name=database.name, server=server, role=role, password=password), role


def test_a_swap_the_role_cannot_finish_is_refused_before_any_change(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> None:
    """A non-superuser owner and a superuser-only database setting: the swap could not carry
    it over. Refused in planning (the dry run shows it), nothing changed, connections on."""
    server = database15.server
    db, role = make_role_owner(database15, alembic_project, tmp_path, member_of=None)
    server.execute(f'ALTER DATABASE "{database15.name}" OWNER TO {role}')
    try:
        project = Project(db, alembic_project, tmp_path / "work")
        project.workdir.mkdir()
        project.upgrade(REV_TIER)
        backup = project.backup()
        server.execute(f"ALTER DATABASE \"{database15.name}\" SET log_statement = 'all'")
        project.db.execute("DELETE FROM orders")
        before = project.data_fingerprint()
        databases = project.databases()

        dry = project.run("--dry-run", "rollback", "data", "--backup-file", backup)
        real = project.run("rollback", "data", "--backup-file", backup)

        for result in (dry, real):
            assert result.exit_code == ExitCode.REFUSED, result.stderr
            assert "log_statement" in result.stderr and "nothing was changed" in result.stderr
        assert project.data_fingerprint() == before
        assert project.databases() == databases
        assert accepts_connections(server, database15.name)
    finally:
        database15.drop_all()
        server.execute(f"DROP OWNED BY {role}")
        server.execute(f"DROP ROLE {role}")


def test_a_deployer_member_of_the_owner_keeps_the_owner(
    database15: TestDatabase, alembic_project: Path, tmp_path: Path, cli_env: dict
) -> None:
    """The application role owns the database and its tables; the deploy role is a member
    of it. After a rollback the database and every table still belong to the application."""
    server = database15.server
    app = f"app_{uuid.uuid4().hex[:8]}"
    server.execute(f"CREATE ROLE {app} LOGIN PASSWORD 'app-pw-123'")
    server.execute(f'ALTER DATABASE "{database15.name}" OWNER TO {app}')
    app_db = RoleDatabase(name=database15.name, server=server, role=app, password="app-pw-123")
    owner_project = Project(app_db, alembic_project, tmp_path / "owner")
    owner_project.workdir.mkdir()
    owner_project.upgrade(REV_TIER)  # the tables belong to the application role
    deployer, role = make_role_owner(database15, alembic_project, tmp_path, member_of=app)
    try:
        project = Project(deployer, alembic_project, tmp_path / "work")
        project.workdir.mkdir()
        backup = project.backup()
        project.db.execute("DELETE FROM orders")

        code, doc = rollback_data(project, backup)

        assert code == 0, doc
        owner = server.query(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
            (database15.name,),
        )
        assert owner == [(app,)]
        tables = server.query(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'",
            dbname=database15.name,
        )
        assert tables == [(app,)]
    finally:
        drop_with_artifacts(database15)
        server.execute(f"DROP OWNED BY {role}")
        server.execute(f"DROP ROLE {role}")
        server.execute(f"DROP OWNED BY {app}")
        server.execute(f"DROP ROLE {app}")


def test_an_uncommitted_grant_elsewhere_is_waited_for_a_bounded_time(project15: Project) -> None:
    """Another session's open transaction holds the database's catalog row: the rollback
    ends within seconds with the database unchanged and accepting connections."""
    server, name = project15.db.server, project15.db.name
    backup = project15.backup()
    project15.db.execute("DELETE FROM orders")
    before = project15.data_fingerprint()
    holder = psycopg2.connect(server.url("postgres"))
    try:
        with holder.cursor() as cur:
            cur.execute(f'GRANT CONNECT ON DATABASE "{name}" TO PUBLIC')  # not committed
        started = time.monotonic()
        result = project15.run("rollback", "data", "--backup-file", backup, "--lock-timeout", "1s")
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code in (ExitCode.FAILED_UNCHANGED, ExitCode.REFUSED), result.stderr
    assert elapsed < 30
    assert project15.data_fingerprint() == before
    assert accepts_connections(server, name)
    assert [n for n in project15.databases() if SCRATCH_MARK in n] == []


# --- 3. a backup of another database ---------------------------------------------------------


def test_a_backup_of_another_database_is_refused(named_project: Callable[..., Project]) -> None:
    base = f"v_{uuid.uuid4().hex[:6]}"
    shop = named_project(f"{base}_shop", "a")
    victim = named_project(f"{base}_victim", "b")
    victim.db.execute("CREATE TABLE victim_only (id int)")
    backup = shop.backup()
    before = victim.data_fingerprint()

    for extra in ([], ["--dry-run"], ["--strategy", "in-place"]):
        result = victim.run("rollback", "data", "--backup-file", backup, *extra)
        assert result.exit_code == ExitCode.REFUSED, result.stderr
        assert "--allow-other-database" in result.stderr
    assert victim.data_fingerprint() == before

    allowed = victim.run("rollback", "data", "--backup-file", backup, "--allow-other-database")
    assert allowed.exit_code == 0, allowed.stderr


# --- a swap interrupted half-way is repaired by the next command -----------------------------


def _half_swapped(project: Project, *, renamed: bool) -> tuple[str, str]:
    """What a run killed inside the swap leaves: a scratch copy with a swapping record of a
    dead session, the live database refusing connections (and, when ``renamed``, renamed
    to its kept name with our kept record on it)."""
    server, live = project.db.server, project.db.name
    scratch = derived_name(live, SCRATCH_MARK)
    kept = derived_name(live, PRE_MARK)
    server.execute(f"COMMENT ON DATABASE \"{live}\" IS 'the application database'")
    server.execute(f'CREATE DATABASE "{scratch}" TEMPLATE "{live}"')
    conn = psycopg2.connect(server.url("postgres"))
    conn.autocommit = True
    try:
        live_oid = server.query("SELECT oid FROM pg_database WHERE datname = %s", (live,))[0][0]
        scratch_oid = server.query("SELECT oid FROM pg_database WHERE datname = %s", (scratch,))[0][
            0
        ]
        record = registry.new_record(conn, registry.SCRATCH, live, "killed")
        pid, started = record.pid, record.backend_start
        assert pid is not None and started is not None
        registry.write(conn, scratch, record.swapping(live_oid, pid, started))
        kept_record = registry.kept_record(live, "killed", scratch_oid, "the application database")
        registry.write(conn, live, kept_record)
        server.execute(f'ALTER DATABASE "{live}" WITH ALLOW_CONNECTIONS false')
        server.execute(f'ALTER DATABASE "{scratch}" WITH ALLOW_CONNECTIONS false')
        if renamed:
            server.execute(f'ALTER DATABASE "{live}" RENAME TO "{kept}"')
    finally:
        conn.close()  # the run is dead
    return scratch, kept


@pytest.mark.parametrize("renamed", [False, True], ids=["before-renames", "between-renames"])
@pytest.mark.parametrize("command", [["cleanup-artifacts"], ["rollback", "undo"]])
def test_an_interrupted_swap_is_repaired_by_the_next_command(
    project15: Project, renamed: bool, command: list[str]
) -> None:
    before = project15.data_fingerprint()
    server, live = project15.db.server, project15.db.name
    scratch, kept = _half_swapped(project15, renamed=renamed)

    project15.run(*command)

    assert accepts_connections(server, live)
    assert project15.data_fingerprint() == before
    comment = server.query(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (live,),
    )
    assert comment == [("the application database",)]
    assert project15.run("cleanup-artifacts").exit_code == 0
    assert scratch not in project15.databases()
    assert kept not in project15.databases()


def test_status_works_while_the_live_database_refuses_connections(project15: Project) -> None:
    _half_swapped(project15, renamed=False)
    result = project15.run("status")
    assert result.exit_code != ExitCode.OK
    assert "refuses connections" in result.stderr or "cleanup-artifacts" in result.stderr


def test_concurrent_cleanup_during_a_rollback_is_refused(project15: Project) -> None:
    """While a rollback holds the lock, cleanup-artifacts touches nothing."""
    from rollback_cli.postgres.lock import rollback_lock
    from rollback_cli.settings import parse_database_url

    with rollback_lock(parse_database_url(project15.db.url), project15.db.name):
        result = project15.run("cleanup-artifacts")
    assert result.exit_code == ExitCode.REFUSED, result.stderr
