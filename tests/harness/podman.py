"""A private Podman service (Podman's Docker-compatible API) for the tests (DESIGN.md section 5).

Everything Podman keeps lives under one directory: its configuration (a private
containers.conf through CONTAINERS_CONF, storage.conf through CONTAINERS_STORAGE_CONF, so the
machine's /etc/containers is never read for what matters nor written), storage, run root,
temporary files and file locks, network configs and the events file. Two instances share
nothing but the kernel, and a test may restart or break its own.

The `podman` CLI of `cli()` runs against the same storage directly, not through the service:
it writes its events into the same file, which the service's /events follows, as on a host
where people use the CLI while a Docker client watches the socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from .engine import ENGINE_SH
from .process import Service

PODMAN = "podman"
HOW_TO_GET = "apt-get install podman (scripts/setup.sh installs it)"
# Unix socket paths are limited to 107 bytes; conmon's attach socket is the longest Podman
# makes, and Podman copes with long ones itself, so only the service's own socket counts.
_MAX_UNIX_PATH = 107


def podman_path() -> str | None:
    return shutil.which(PODMAN)


def require_podman() -> str:
    """The podman binary; fails (never skips) the requesting test when it is missing."""
    path = podman_path()
    if path is None:
        pytest.fail(f"the Podman tests need podman 4.x on PATH: {HOW_TO_GET}", pytrace=False)
    return path


class PrivatePodman(Service):
    """`podman system service --time=0 unix://DIR/podman.sock` on private state under DIR.

    `events_logfile_max_size` (bytes) makes Podman rotate its events file at that size; by
    default Podman's own default (1 MB in 4.3.1) applies. State persists across `restart()`,
    like a host's service restarted by systemd.
    """

    def __init__(self, workdir: Path | str, events_logfile_max_size: int | None = None) -> None:
        self.podman = require_podman()
        self.workdir = Path(workdir).resolve()
        if len(str(self.socket_path).encode()) > _MAX_UNIX_PATH:
            raise ValueError(f"workdir {self.workdir} is too long for a unix socket path")
        self.events_logfile_max_size = events_logfile_max_size
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"PrivatePodman({str(self.workdir)!r})"

    # -- paths -------------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.workdir / "podman.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    @property
    def events_log(self) -> Path:
        return self.workdir / "events" / "events.log"

    @property
    def graph_root(self) -> Path:
        return self.workdir / "root"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def _write_config(self) -> None:
        d = self.workdir
        for sub in ("root", "run", "tmp", "networks", "events"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        rotate = (
            ""
            if self.events_logfile_max_size is None
            else f"events_logfile_max_size = {self.events_logfile_max_size}\n"
        )
        # cgroupfs: no systemd here. The ulimits: this machine lacks CAP_SYS_RESOURCE, and
        # Podman's defaults (raise nofile and nproc to the hard maximum) fail with "error
        # setting rlimit type 7". File locks in the private tmp_dir: the default shm locks
        # (/dev/shm/libpod_lock) would be shared by every Podman on the machine.
        (d / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[network]\n"
            f'network_config_dir = "{d / "networks"}"\n'
            "[engine]\n"
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.events_log}"\n'
            f"{rotate}"
            'cgroup_manager = "cgroupfs"\n'
            f'tmp_dir = "{d / "tmp"}"\n'
            'lock_type = "file"\n'
        )
        # vfs: plain directories, nothing mounted that a crashed test could leave behind.
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{self.graph_root}"\nrunroot = "{d / "run"}"\n'
        )

    def env(self) -> dict[str, str]:
        """Environment for the podman CLI and service of this instance only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINER", "DOCKER_"))}
        env["CONTAINERS_CONF"] = str(self.workdir / "containers.conf")
        env["CONTAINERS_STORAGE_CONF"] = str(self.workdir / "storage.conf")
        return env

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the service; return once it answers and busybox:latest exists."""
        if self.running:
            return
        self._write_config()
        self.socket_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: Ctrl-C on pytest must not kill it under a running test.
            self._proc = subprocess.Popen(
                [self.podman, "system", "service", "--time=0", self.docker_host],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._abort()
                raise RuntimeError(
                    f"podman service in {self.workdir} did not start\n"
                    f"--- last lines of {self.log_path} ---\n{self._log_tail()}"
                )
            time.sleep(0.05)
        if self.cli("image", "exists", "busybox:latest", check=False).returncode != 0:
            tar = subprocess.run(
                [str(ENGINE_SH), "busybox-tar", str(self.workdir)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.cli("import", tar, "busybox:latest")

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket_path))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the service and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"podman service (pid {proc.pid}) did not exit") from None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the service and every container of this instance (their conmon processes
        outlive the service)."""
        try:
            self.stop()
        finally:
            if (self.workdir / "containers.conf").exists():
                self.cli("rm", "--all", "--force", "--time", "0", check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _abort(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    # -- client ------------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run `podman ARGS...` on this instance's storage; stdout/stderr captured as text."""
        cmd: Sequence[str] = [self.podman, *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {result.returncode}: {result.stderr.strip()}"
            )
        return result
