"""Time to recovery of a data rollback, and backup speed, against the raw tools in one run.

One throwaway PostgreSQL server, one pgbench database of about ``--size-mb`` (default
100 MB, ``BENCH_SIZE_MB`` in the environment; the documented figure is at ~750 MB). Ratios
measured in the same run on the same machine (section 8 of DESIGN.md):

* time to recovery of ``db-rollback rollback data`` (process start → the log event
  ``recovered``: swapped and validated) ÷ a bare ``pg_restore -j N`` of the same backup
  into a new database (same jobs); and ÷ the original script's approach;
* total ``rollback data`` (safety backup stored) ÷ the original script's approach: plain
  ``pg_dump`` (its safety backup) + ``dropdb`` + ``createdb`` + ``psql -f`` of a plain backup;
* ``backup create`` ÷ raw ``pg_dump`` with the same format and compression;
* the rollback with each timing of its safety backup (``after-swap``, ``during-restore``);
  the ratios above are those of the timing ``auto`` picks on this machine, the other's
  printed beside them;
* during the rollback, the longest gap a client polling every 20 ms sees, and the CLI's
  peak RSS (VmHWM);
* ``backup create --storage s3://`` (the dump uploaded while pg_dump writes it) ÷ raw
  ``pg_dump`` then boto3's ``upload_file`` of the file (SeaweedFS on loopback).

Every measurement runs ``--repeat`` times, alternating ours and the raw tool; the best
of each is compared (the cores are shared with other work: the best is the least disturbed).
The table goes to stdout, then one JSON line (``--json-out FILE`` writes it to a file too).

    .venv/bin/python bench/bench_recovery.py                 # ~100 MB
    BENCH_SIZE_MB=750 .venv/bin/python bench/bench_recovery.py --repeat 1
    .venv/bin/python bench/bench_recovery.py --sizes 100,750,3000 --repeat 1   # growth

The CLI runs from .venv-bench (the package with its runtime dependencies only, as users
install it; ``make bench`` creates it), else from this interpreter.

The test server runs with fsync=off: absolute times are lower than on a durable server.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.postgres import PostgresCluster, debian_bin_dir, embedded_bin_dir  # noqa: E402
from devtools.probe import Probe  # noqa: E402
from devtools.s3 import SeaweedServer  # noqa: E402
from rollback_cli.backups.dump import compress_args  # noqa: E402
from rollback_cli.rollback.lifecycle import DURING_RESTORE_MIN_CORES  # noqa: E402

MB_PER_SCALE = 15.0  # pgbench -i: about 15 MB of tables and indexes per scale unit
DB = "bench"
#: The CLI as users install it: a virtualenv with the runtime dependencies only (``make
#: bench`` creates .venv-bench); the dev virtualenv also holds rich (an import-linter
#: dependency), which structlog imports when present: +60 ms per start measured here.
RUNTIME_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
CLI_PYTHON = Path(
    os.environ.get("BENCH_CLI_PYTHON")
    or (RUNTIME_PYTHON if RUNTIME_PYTHON.exists() else sys.executable)
)
TIMINGS = ("after-swap", "during-restore")


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = run(argv, env)
    return time.monotonic() - started, done


def best(samples: list[float]) -> float:
    return min(samples)


class Bench:
    def __init__(self, server: PostgresCluster, work: Path, jobs: int) -> None:
        self.server = server
        self.work = work
        self.jobs = jobs
        self.bin = server.bin_dir
        #: what the last ``ours_rollback`` measured besides time
        self.last_gap_ms = 0.0
        self.last_swap_gap_ms = 0.0
        #: the longest gap of a polling client during each bare pg_restore
        self.bare_gaps_ms: list[float] = []
        self.last_peak_rss_kb = 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DB_ROLLBACK_"))}
        env.pop("DATABASE_URL", None)
        self.env = {**env, **server.conninfo_env(DB)}
        self.cli = [
            str(CLI_PYTHON),
            "-m",
            "rollback_cli",
            "--database-url",
            server.url(DB),
            "--backup-dir",
            str(work / "backups"),
            "--log-dir",
            str(work / "logs"),
            "--pg-bin-dir",
            str(self.bin),
            "--log-format",
            "json",
            "--json",
        ]

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    # -- set-up ------------------------------------------------------------------------------

    def fill(self, size_mb: float) -> tuple[int, int]:
        scale = max(1, round(size_mb / MB_PER_SCALE))
        self.server.create_database(DB)
        run([self.tool("pgbench"), "-i", "-q", "-s", str(scale), DB], self.env)
        self.server.execute("VACUUM ANALYZE", dbname=DB)
        size = self.server.query("SELECT pg_database_size(%s)", (DB,))[0][0]
        return scale, int(size)

    def change_live(self) -> None:
        """What a bad deploy did after the backup: the rollback has real work to undo."""
        self.server.execute(
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 50 = 0", dbname=DB
        )

    def drop_extra_databases(self) -> None:
        for name in self.server.databases():
            if name not in (DB, "postgres"):
                self.server.drop_database(name)

    # -- backups -----------------------------------------------------------------------------

    def ours_backup(self) -> tuple[float, dict[str, Any]]:
        seconds, done = timed([*self.cli, "backup", "create", "--label", "bench"], self.env)
        return seconds, json.loads(done.stdout)

    def raw_dump(
        self, compression: str | None, fmt: str = "custom", *, keep: bool = False
    ) -> float:
        """pg_dump with the format and compression our backup recorded."""
        argv = [self.tool("pg_dump"), f"--format={fmt}", "-f", str(self.work / "raw.dump")]
        argv += compress_args(compression, self.server.major)
        seconds, _ = timed([*argv, DB], self.env)
        if not keep:
            (self.work / "raw.dump").unlink()
        return seconds

    def ours_backup_s3(self, s3: SeaweedServer, bucket: str) -> float:
        """backup create to S3: the dump is uploaded while pg_dump writes it."""
        argv = [*self.cli, "--storage", f"s3://{bucket}/ours", "backup", "create"]
        seconds, _ = timed(argv, {**self.env, **s3.env()})
        return seconds

    def raw_dump_then_upload(
        self, s3: SeaweedServer, bucket: str, compression: str | None
    ) -> float:
        """pg_dump to a file, then boto3's upload_file of it: one after the other."""
        started = time.monotonic()
        self.raw_dump(compression, keep=True)
        client = s3.client()
        try:
            client.upload_file(str(self.work / "raw.dump"), bucket, f"raw/{time.time_ns()}.dump")
        finally:
            client.close()
            (self.work / "raw.dump").unlink()
        return time.monotonic() - started

    # -- restores ----------------------------------------------------------------------------

    def bare_restore(self, backup: str) -> float:
        """createdb + pg_restore -j N of the same backup into a new database. A client
        polls the live database meanwhile: the gaps the machine's load alone causes (no
        swap), the baseline of the gaps measured during ours."""
        with Probe(self.server.url(DB), "SELECT aid FROM pgbench_accounts LIMIT 1") as probe:
            started = time.monotonic()
            run([self.tool("createdb"), "bench_bare"], self.env)
            run(
                [self.tool("pg_restore"), f"--jobs={self.jobs}", "-d", "bench_bare", backup],
                self.env,
            )
            seconds = time.monotonic() - started
        self.bare_gaps_ms.append(probe.longest_gap_ms())
        self.server.drop_database("bench_bare")
        return seconds

    def original_script(self, plain_backup: Path) -> float:
        """The original rollback: plain pg_dump (safety), dropdb, createdb, psql -f."""
        safety = self.work / "original_safety.sql"
        started = time.monotonic()
        run([self.tool("pg_dump"), "--format=plain", "-f", str(safety), DB], self.env)
        run([self.tool("dropdb"), "--force", DB], self.env)
        run([self.tool("createdb"), DB], self.env)
        run(
            [self.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(plain_backup), DB],
            self.env,
        )
        seconds = time.monotonic() - started
        safety.unlink()
        return seconds

    def ours_rollback(
        self, backup: str, timing: str = "auto"
    ) -> tuple[float, float, dict[str, Any]]:
        """``rollback data``: (time to recovery seen from outside, total, its document).

        Time to recovery runs from this process starting the CLI to the timestamp of the
        CLI's ``recovered`` event (wall clocks of the same machine)."""
        log_dir = self.work / "logs"
        before = set(log_dir.glob("*.log")) if log_dir.is_dir() else set()
        launched = time.time()
        with Probe(self.server.url(DB), "SELECT aid FROM pgbench_accounts LIMIT 1") as probe:
            total, done, self.last_peak_rss_kb = timed_with_peak_rss(
                [
                    *self.cli,
                    "rollback",
                    "data",
                    "--backup-file",
                    backup,
                    "--jobs",
                    str(self.jobs),
                    "--safety-backup-timing",
                    timing,
                ],
                self.env,
            )
        self.last_gap_ms = probe.longest_gap_ms()
        recovered_at = None
        seen: dict[tuple[str, str], float] = {}  # (step, event) -> seconds after launch
        for path in set(log_dir.glob("*.log")) - before:
            for line in path.read_text().splitlines():
                event = json.loads(line)
                stamp = event["timestamp"].replace("Z", "+00:00")
                at = datetime.fromisoformat(stamp).timestamp() - launched
                seen.setdefault((event.get("step", ""), event.get("event", "")), at)
                if event.get("event") == "recovered":
                    recovered_at = at
        if recovered_at is None:
            sys.exit("rollback data logged no 'recovered' event")
        doc = json.loads(done.stdout)
        doc["phases_ms"] = _phases(seen, recovered_at)
        # What a client saw of the swap itself, apart from slow answers under load.
        blocked = seen.get(("swap", "connections blocked"))
        self.last_swap_gap_ms = probe.gap_spanning_ms(launched + blocked) if blocked else 0.0
        return recovered_at, total, doc


def _phases(seen: dict[tuple[str, str], float], recovered: float) -> dict[str, int]:
    """Where the time to recovery went, from the CLI's log: start-up (process start to its
    first event), the checks before the restore, the restore step (CREATE DATABASE and
    pg_restore), the restored copy's validation, and the swap with the final validation."""
    started = seen.get(("main", "command started"), 0.0)
    restore_from = seen.get(("restore", "step started"), started)
    restore_to = seen.get(("restore", "step finished"), restore_from)
    validated = seen.get(("validate-scratch", "step finished"), restore_to)
    return {
        "start_up": round(started * 1000),
        "checks_before_restore": round((restore_from - started) * 1000),
        "restore": round((restore_to - restore_from) * 1000),
        "validate_scratch": round((validated - restore_to) * 1000),
        "swap_and_validation": round((recovered - validated) * 1000),
    }


def timed_with_peak_rss(
    argv: list[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str], int]:
    """Run ``argv``; (seconds, result, the process's peak RSS in KiB: its VmHWM, read from
    /proc while it runs, the last reading before it exits)."""
    started = time.monotonic()
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        peak = 0
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        stdout, stderr = process.communicate()
    seconds = time.monotonic() - started
    done = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:6])} failed ({done.returncode}): {stderr[-2000:]}")
    return seconds, done, peak


def alternate(repeat: int, *measures: Callable[[], float]) -> list[list[float]]:
    samples: list[list[float]] = [[] for _ in measures]
    for _ in range(repeat):
        for index, measure in enumerate(measures):
            samples[index].append(measure())
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--size-mb",
        type=float,
        default=float(os.environ.get("BENCH_SIZE_MB", "100")),
        help="database size to generate (default 100, or BENCH_SIZE_MB)",
    )
    parser.add_argument(
        "--sizes",
        default=os.environ.get("BENCH_SIZES"),
        help="several sizes in MB, e.g. 100,750,3000 (or BENCH_SIZES): each measured, then "
        "the growth (seconds per GB, longest client gap, peak RSS at every size)",
    )
    parser.add_argument("--major", type=int, choices=(15, 18), default=15)
    parser.add_argument("--jobs", type=int, default=2, help="pg_restore jobs, ours and bare")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    bin_dir = debian_bin_dir(15) if args.major == 15 else embedded_bin_dir()
    if bin_dir is None:
        sys.exit(f"no PostgreSQL {args.major} server binaries here")
    # Byte-compiled as an installed package is (pip compiles at install): an editable
    # install under PYTHONDONTWRITEBYTECODE would compile every module at every start
    # (70 ms measured here).
    compileall.compile_dir(ROOT / "rollback_cli", quiet=1)
    sizes = [float(x) for x in args.sizes.split(",")] if args.sizes else [args.size_mb]
    reports = [measure(bin_dir, size, args) for size in sizes]
    document: dict[str, Any] = reports[0] if len(reports) == 1 else _growth(reports)
    line = json.dumps(document, sort_keys=True)
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n", encoding="utf-8")


def measure(bin_dir: Path, size_mb: float, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement at one size; its table printed, its report returned."""
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp,
        PostgresCluster(bin_dir).start() as server,
    ):
        work = Path(tmp)
        bench = Bench(server, work, args.jobs)
        scale, size = bench.fill(size_mb)
        print(
            f"PostgreSQL {server.major}, pgbench scale {scale}: {size / 2**20:.0f} MB; "
            f"{cores} cores (shared with other work: load average {load_before:.2f} at start); "
            f"CLI run by {CLI_PYTHON}",
            flush=True,
        )

        # backup create vs pg_dump, same format and compression (what ours picked).
        backups: list[dict[str, Any]] = []

        def ours_backup() -> float:
            seconds, doc = bench.ours_backup()
            backups.append(doc)
            return seconds

        ours_backup()  # warm-up: imports compiled, client found, caches warm
        compression = _manifest(backups[-1])["compression"]
        ours_b, raw_b = alternate(args.repeat, ours_backup, lambda: bench.raw_dump(compression))
        backup = backups[-1]["backup_file"]

        # backup create to S3 vs pg_dump, then boto3 upload_file (SeaweedFS on loopback).
        with SeaweedServer(work / "seaweedfs") as s3:
            client = s3.client()
            client.create_bucket(Bucket="bench")
            client.close()
            ours_s3, raw_s3 = alternate(
                args.repeat,
                lambda: bench.ours_backup_s3(s3, "bench"),
                lambda: bench.raw_dump_then_upload(s3, "bench", compression),
            )
        plain = work / "backup_plain.sql"
        run([bench.tool("pg_dump"), "--format=plain", "-f", str(plain), DB], bench.env)

        # Rollbacks, each timing of the safety backup: each starts from a changed database.
        runs: dict[str, dict[str, list[Any]]] = {
            t: {"ttr": [], "total": [], "docs": [], "gaps": [], "swap_gaps": [], "peaks": []}
            for t in TIMINGS
        }

        def ours_rollback(timing: str) -> float:
            bench.change_live()
            outside_ttr, seconds, doc = bench.ours_rollback(backup, timing)
            bench.drop_extra_databases()
            seen = runs[timing]
            seen["ttr"].append(outside_ttr)
            seen["docs"].append(doc)
            seen["gaps"].append(bench.last_gap_ms)
            seen["swap_gaps"].append(bench.last_swap_gap_ms)
            seen["peaks"].append(bench.last_peak_rss_kb)
            seen["total"].append(seconds)
            return seconds

        def original() -> float:
            bench.change_live()
            return bench.original_script(plain)

        bare, _, _, original_s = alternate(
            args.repeat,
            lambda: bench.bare_restore(backup),
            lambda: ours_rollback("after-swap"),
            lambda: ours_rollback("during-restore"),
            original,
        )
        load_after = os.getloadavg()[0]

    auto = "during-restore" if cores >= DURING_RESTORE_MIN_CORES else "after-swap"
    report: dict[str, Any] = {
        "postgres_major": server.major,
        "database_mb": round(size / 2**20),
        "pgbench_scale": scale,
        "cores": cores,
        "cores_shared": True,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "repeat": args.repeat,
        "jobs": args.jobs,
        "compression": compression,
        "cli_python": str(CLI_PYTHON),
        "safety_backup_timing_auto": auto,
        "seconds": {
            "bare_pg_restore": best(bare),
            "original_script": best(original_s),
            "backup_create": best(ours_b),
            "raw_pg_dump": best(raw_b),
            "backup_create_s3": best(ours_s3),
            "raw_pg_dump_then_upload_file": best(raw_s3),
        },
        "timings": {},
    }
    s = report["seconds"]
    for timing, seen in runs.items():
        docs = seen["docs"]
        fastest = docs[seen["ttr"].index(best(seen["ttr"]))]
        report["timings"][timing] = {
            "phases_ms": fastest["phases_ms"],
            "time_to_recovery": best(seen["ttr"]),
            "time_to_recovery_reported": min(d["time_to_recovery_ms"] for d in docs) / 1000,
            "rollback_total": best(seen["total"]),
            "safety_backup": min(d["safety_backup_ms"] for d in docs) / 1000,
            "time_to_recovery/bare_pg_restore": best(seen["ttr"]) / s["bare_pg_restore"],
            "time_to_recovery/original_script": best(seen["ttr"]) / s["original_script"],
            "rollback_total/original_script": best(seen["total"]) / s["original_script"],
            "longest_client_gap_ms": round(max(seen["gaps"]), 1),
            "longest_gap_at_the_swap_ms": round(max(seen["swap_gaps"]), 1),
            "cli_peak_rss_mb": round(max(seen["peaks"]) / 1024, 1),
        }
    chosen = report["timings"][auto]
    report["ratios"] = {
        "time_to_recovery/bare_pg_restore": chosen["time_to_recovery/bare_pg_restore"],
        "time_to_recovery/original_script": chosen["time_to_recovery/original_script"],
        "rollback_total/original_script": chosen["rollback_total/original_script"],
        "backup_create/raw_pg_dump": s["backup_create"] / s["raw_pg_dump"],
        "backup_create_s3/raw_pg_dump_then_upload_file": s["backup_create_s3"]
        / s["raw_pg_dump_then_upload_file"],
    }
    report["backup_create_extra_ms"] = round((s["backup_create"] - s["raw_pg_dump"]) * 1000)
    report["longest_client_gap_ms"] = max(
        t["longest_client_gap_ms"] for t in report["timings"].values()
    )
    report["cli_peak_rss_mb"] = max(t["cli_peak_rss_mb"] for t in report["timings"].values())
    report["longest_client_gap_during_bare_pg_restore_ms"] = round(max(bench.bare_gaps_ms), 1)
    _print_table(report)
    return report


def _growth(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per GB between the smallest and the largest size (the slope), the ratios at
    every size, the longest client gap and the peak RSS at every size."""
    small, large = reports[0], reports[-1]
    gigabytes = (large["database_mb"] - small["database_mb"]) / 1024

    def slope(get: Any) -> float:
        return round((get(large) - get(small)) / gigabytes, 3) if gigabytes else 0.0

    auto = small["safety_backup_timing_auto"]
    growth = {
        "sizes_mb": [r["database_mb"] for r in reports],
        "cores": small["cores"],
        "seconds_per_gb": {
            "backup_create": slope(lambda r: r["seconds"]["backup_create"]),
            "raw_pg_dump": slope(lambda r: r["seconds"]["raw_pg_dump"]),
            "time_to_recovery": slope(lambda r: r["timings"][auto]["time_to_recovery"]),
            "bare_pg_restore": slope(lambda r: r["seconds"]["bare_pg_restore"]),
            "rollback_total": slope(lambda r: r["timings"][auto]["rollback_total"]),
            "original_script": slope(lambda r: r["seconds"]["original_script"]),
        },
        "longest_client_gap_ms": [r["longest_client_gap_ms"] for r in reports],
        "cli_peak_rss_mb": [r["cli_peak_rss_mb"] for r in reports],
        "reports": reports,
    }
    print("growth, seconds per GB from the smallest to the largest size (ours vs raw):")
    per_gb = growth["seconds_per_gb"]
    for ours, raw in (
        ("backup_create", "raw_pg_dump"),
        ("time_to_recovery", "bare_pg_restore"),
        ("rollback_total", "original_script"),
    ):
        print(f"  {ours:<18} {per_gb[ours]:7.3f} s/GB   {raw:<16} {per_gb[raw]:7.3f} s/GB")
    print(
        f"  longest client gap (ms) per size: {growth['longest_client_gap_ms']} (target ≤ 100)"
        f"; CLI peak RSS (MB) per size: {growth['cli_peak_rss_mb']} (target ≤ 150)"
    )
    return growth


def _manifest(doc: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(f"{doc['backup_file']}.json").read_text())
    return data


def _print_table(report: dict[str, Any]) -> None:
    s, r = report["seconds"], report["ratios"]
    auto = report["safety_backup_timing_auto"]
    chosen = report["timings"][auto]
    s = {**s, **chosen}
    rows = [
        (
            "time to recovery ÷ bare pg_restore",
            s["time_to_recovery"],
            s["bare_pg_restore"],
            r["time_to_recovery/bare_pg_restore"],
            "≤ 1.10",
        ),
        (
            "time to recovery ÷ original script",
            s["time_to_recovery"],
            s["original_script"],
            r["time_to_recovery/original_script"],
            "≤ 0.80",
        ),
        (
            "rollback data total ÷ original script",
            s["rollback_total"],
            s["original_script"],
            r["rollback_total/original_script"],
            "≤ 1.00",
        ),
        (
            f"backup create ÷ pg_dump -Fc ({report['compression'] or 'default'})",
            s["backup_create"],
            s["raw_pg_dump"],
            r["backup_create/raw_pg_dump"],
            "≤ 1.05 (750 MB)",
        ),
        (
            "backup create to S3 ÷ (pg_dump + upload_file)",
            s["backup_create_s3"],
            s["raw_pg_dump_then_upload_file"],
            r["backup_create_s3/raw_pg_dump_then_upload_file"],
            "≤ 0.75 (750 MB)",
        ),
    ]
    for timing, t in report["timings"].items():
        if timing == auto:
            continue
        rows += [
            (
                f"  {timing}: time to recovery ÷ bare",
                t["time_to_recovery"],
                s["bare_pg_restore"],
                t["time_to_recovery/bare_pg_restore"],
                "(not auto here)",
            ),
            (
                f"  {timing}: total ÷ original script",
                t["rollback_total"],
                s["original_script"],
                t["rollback_total/original_script"],
                "(not auto here)",
            ),
        ]
    print()
    print(f"safety backup timing auto picks here: {auto}")
    print(f"{'measure':<44} {'ours s':>8} {'raw s':>8} {'ratio':>7}  target")
    for name, ours, raw, ratio, target in rows:
        print(f"{name:<44} {ours:8.2f} {raw:8.2f} {ratio:7.2f}  {target}")
    print(
        f"longest gap a polling client saw: {report['longest_client_gap_ms']} ms (target ≤ 100 "
        f"ms); CLI peak RSS: {report['cli_peak_rss_mb']} MB (target ≤ 150 MB)"
    )
    print(
        f"backup create extra: {report['backup_create_extra_ms']} ms (target ≤ 150 ms at "
        f"~100 MB); safety backup after recovery: {s['safety_backup']:.2f} s; time to recovery "
        "reported by the CLI (from its start, after imports): "
        f"{s['time_to_recovery_reported']:.2f} s"
    )
    for timing, t in report["timings"].items():
        phases = ", ".join(f"{k.replace('_', ' ')} {v} ms" for k, v in t["phases_ms"].items())
        print(f"time to recovery ({timing}, fastest run): {phases}")
        print(
            f"  {timing}: longest client gap {t['longest_client_gap_ms']} ms, at the swap "
            f"{t['longest_gap_at_the_swap_ms']} ms (during a bare pg_restore, no swap: "
            f"{report['longest_client_gap_during_bare_pg_restore_ms']} ms)"
        )
    print(
        f"{report['database_mb']} MB, PostgreSQL {report['postgres_major']}, "
        f"{report['cores']} cores shared with other work (load average "
        f"{report['load_average'][0]} → {report['load_average'][1]}), best of {report['repeat']}"
    )
    print()


if __name__ == "__main__":
    main()
