"""How long is the database unavailable during a data rollback?

One run, one throwaway PostgreSQL server, one database of at least 200 MB (the example
project's tables, filled with generated orders). It measures, against the raw tools:

* backup:   ``db-rollback backup create`` vs ``pg_dump -Fc`` of the same database;
* rollback: ``db-rollback rollback data`` (swap strategy) vs the naive restore,
  ``pg_restore --clean --if-exists --single-transaction`` straight into the live database.

While each restore runs, a probe opens a new connection and reads ``orders`` every 20 ms.
The unavailability window is the longest time between two successful probes: what an
application sees. The swap strategy is also checked against the window it logs itself.

    .venv/bin/python bench/bench_rollback.py [--rows 2500000] [--major 15|18]

Numbers are ratios from the same run on the same machine; the test server runs with
fsync=off, so absolute times are lower than on a durable server.
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
from devtools.probe import Probe  # noqa: E402
from devtools.project import EXAMPLE_ALEMBIC_INI, example_database  # noqa: E402

# What the probe reads during the rollback: the table the restore replaces.
ORDERS = "SELECT id FROM orders LIMIT 1"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return elapsed, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000, help="generated orders")
    parser.add_argument("--major", type=int, choices=(15, 18), default=15)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()

    bin_dir = debian_bin_dir(15) if args.major == 15 else embedded_bin_dir()
    if bin_dir is None:
        sys.exit(f"no PostgreSQL {args.major} server binaries here")
    with (
        tempfile.TemporaryDirectory(prefix="bench-rollback-") as tmp,
        PostgresCluster(bin_dir).start() as server,
    ):
        work = Path(tmp)
        dbname = "bench"
        print(f"PostgreSQL {server.major}: filling {args.rows:,} orders ...", flush=True)
        size = example_database(server, dbname, args.rows)
        print(f"database size: {size / 2**20:.0f} MB")
        if size < 200 * 2**20:
            print("warning: below 200 MB; raise --rows")

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
            str(work / "backups"),
            "--log-dir",
            str(work / "logs"),
            "--alembic-config",
            str(EXAMPLE_ALEMBIC_INI),
            "--pg-bin-dir",
            str(server.bin_dir),
            "--log-format",
            "json",
            "--json",
        ]
        pg_dump = str(server.bin_dir / "pg_dump")
        pg_restore = str(server.bin_dir / "pg_restore")

        raw_dump_s, _ = timed([pg_dump, "-Fc", "-f", str(work / "raw.dump"), dbname], env)
        ours_dump_s, out = timed([*cli, "backup", "create", "--label", "bench"], env)
        backup = json.loads(out)["backup_file"]
        print(
            f"backup:   pg_dump -Fc {raw_dump_s:6.1f} s   db-rollback {ours_dump_s:6.1f} s   "
            f"ratio {ours_dump_s / raw_dump_s:.2f}"
        )

        server.execute("DELETE FROM orders WHERE id % 3 = 0", dbname=dbname)
        dsn = server.url(dbname)
        with Probe(dsn, ORDERS) as swap_probe:
            time.sleep(0.5)
            ours_s, out = timed(
                [*cli, "rollback", "data", "--backup-file", backup, "--jobs", str(args.jobs)], env
            )
            time.sleep(0.5)
        doc = json.loads(out)
        logged_ms = doc["unavailable_ms"]
        swap_gap = swap_probe.longest_gap_ms()

        server.execute("DELETE FROM orders WHERE id % 3 = 0", dbname=dbname)
        with Probe(dsn, ORDERS) as naive_probe:
            time.sleep(0.5)
            naive_s, _ = timed(
                [
                    pg_restore,
                    "--clean",
                    "--if-exists",
                    "--single-transaction",
                    "-d",
                    dbname,
                    backup,
                ],
                env,
            )
            time.sleep(0.5)
        naive_gap = naive_probe.longest_gap_ms()

        print(
            f"rollback: pg_restore --clean {naive_s:6.1f} s   "
            f"db-rollback (safety backup, restore, validate, swap) {ours_s:6.1f} s   "
            f"ratio {ours_s / naive_s:.2f}"
        )
        print("unavailable (longest gap between successful probes):")
        print(f"  pg_restore --clean --single-transaction  {naive_gap:9.0f} ms")
        print(
            f"  db-rollback swap                          {swap_gap:9.0f} ms "
            f"(logged: {logged_ms:.0f} ms, probe failures: {swap_probe.failures})"
        )
        print(f"  ratio swap/naive                          {swap_gap / naive_gap:9.3f}")
        server.execute(f"DROP DATABASE IF EXISTS {doc['kept_database']}")


if __name__ == "__main__":
    main()
