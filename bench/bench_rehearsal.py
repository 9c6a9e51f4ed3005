"""What does the rehearsal of a schema downgrade cost?

One run, one throwaway PostgreSQL server, the example project at head (its last migration
dropped ``customers.email``) with generated orders. It measures, in the same run:

* the real downgrade: Alembic's own ``downgrade`` to the tier revision, on a copy of the
  database made with ``CREATE DATABASE ... TEMPLATE`` (so the live one stays at head);
* ``rollback schema --dry-run --no-rehearsal``: planning alone;
* ``rollback schema --dry-run``: planning and the rehearsal on a copy of the schema;
* ``rollback schema --dry-run --rehearse-with-data``: the rehearsal on a copy of the data.

The rehearsal's cost is the dry run's time minus planning alone; it is printed as a ratio
of the real downgrade's time. A schema-only rehearsal does not grow with the data; one with
data costs a dump and a restore of the database.

    .venv/bin/python bench/bench_rehearsal.py [--rows 1000000] [--major 15|18] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.postgres import (  # noqa: E402
    PostgresCluster,
    debian_bin_dir,
    embedded_bin_dir,
)
from devtools.project import (  # noqa: E402
    EXAMPLE_ALEMBIC_INI,
    REV_TIER,
    example_database,
    sqlalchemy_url,
)


def real_downgrade(server: PostgresCluster, dbname: str) -> float:
    """Alembic's own downgrade on a template copy of the database (the live one stays)."""
    from alembic import command
    from alembic.config import Config

    copy = f"{dbname}_real"
    server.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{dbname}"')
    try:
        config = Config(str(EXAMPLE_ALEMBIC_INI))
        url = sqlalchemy_url(server.url(copy))
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        started = time.monotonic()
        command.downgrade(config, REV_TIER)
        return time.monotonic() - started
    finally:
        server.execute(f'DROP DATABASE "{copy}"')


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[3:6])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def best(runs: int, measure: object) -> float:
    return min(measure() for _ in range(runs))  # type: ignore[operator]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated orders")
    parser.add_argument("--major", type=int, choices=(15, 18), default=15)
    parser.add_argument("--runs", type=int, default=3, help="best of N for each measure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    bin_dir = debian_bin_dir(15) if args.major == 15 else embedded_bin_dir()
    if bin_dir is None:
        sys.exit(f"no PostgreSQL {args.major} server binaries here")
    with (
        tempfile.TemporaryDirectory(prefix="bench-rehearsal-") as tmp,
        PostgresCluster(bin_dir).start() as server,
    ):
        dbname = "bench"
        print(f"PostgreSQL {server.major}: filling {args.rows:,} orders ...", flush=True)
        size = example_database(server, dbname, args.rows, then_to="head")
        env = {**os.environ, **server.conninfo_env(dbname)}
        for key in [k for k in env if k.startswith(("DATABASE_URL", "DB_ROLLBACK_"))]:
            del env[key]
        cli = [
            sys.executable,
            "-m",
            "rollback_cli",
            "--database-url",
            server.url(dbname),
            "--backup-dir",
            str(Path(tmp) / "backups"),
            "--log-dir",
            str(Path(tmp) / "logs"),
            "--alembic-config",
            str(EXAMPLE_ALEMBIC_INI),
            "--pg-bin-dir",
            str(bin_dir),
            "rollback",
            "schema",
            "--to-revision",
            REV_TIER,
            "--dry-run",
        ]
        downgrade = best(args.runs, lambda: real_downgrade(server, dbname))
        planning = best(args.runs, lambda: timed([*cli, "--no-rehearsal"], env))
        schema = best(args.runs, lambda: timed(cli, env))
        data = best(args.runs, lambda: timed([*cli, "--rehearse-with-data"], env))

    figures = {
        "cores": os.cpu_count(),
        "server_major": args.major,
        "database_mb": round(size / 2**20),
        "real_downgrade_s": round(downgrade, 3),
        "planning_s": round(planning, 3),
        "rehearsal_schema_s": round(schema - planning, 3),
        "rehearsal_data_s": round(data - planning, 3),
        "rehearsal_schema_ratio": round((schema - planning) / downgrade, 2),
        "rehearsal_data_ratio": round((data - planning) / downgrade, 2),
    }
    print()
    print(f"{'measure':<46} {'seconds':>9} {'÷ real downgrade':>17}")
    print(f"{'real downgrade (alembic, on a template copy)':<46} {downgrade:>9.3f} {1:>17.2f}")
    print(f"{'planning (dry run, --no-rehearsal)':<46} {planning:>9.3f}")
    rows = (
        ("rehearsal on a copy of the schema", schema - planning),
        ("rehearsal on a copy of the data", data - planning),
    )
    for name, seconds in rows:
        print(f"{name:<46} {seconds:>9.3f} {seconds / downgrade:>17.2f}")
    print(f"({figures['database_mb']} MB database, {figures['cores']} cores, best of {args.runs})")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
