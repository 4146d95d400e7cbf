"""Private Docker Engines (one dockerd + its own containerd per instance) for the tests.

The process handling lives in scripts/engine.sh so that the flags of DESIGN.md section 5 exist
in one place; this module owns the dockerd process (it is our child, so we reap it) and wraps
the `docker` CLI.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .process import Service

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_SH = REPO_ROOT / "scripts" / "engine.sh"
FORKY_DOCKERD = REPO_ROOT / ".cache" / "engines" / "forky" / "bin" / "dockerd"
SYSTEM_DOCKERD = Path("/usr/sbin/dockerd")

# Unix socket paths are limited to 107 bytes; the longest one an engine creates is its
# containerd's ttrpc socket. Failing early beats a dockerd that dies with a cryptic bind error.
_LONGEST_SOCKET = Path("exec") / "containerd" / "containerd.sock.ttrpc"
_MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class EngineSpec:
    """An engine this machine kind can run: its test id and the dockerd to start."""

    name: str
    dockerd_path: Path
    how_to_get: str

    @property
    def present(self) -> bool:
        return os.access(self.dockerd_path, os.X_OK)


def known_engines() -> list[EngineSpec]:
    """Every engine the suite knows, oldest first, whether installed or not."""
    return [
        EngineSpec("20.10", SYSTEM_DOCKERD, "apt-get install docker.io (scripts/setup.sh)"),
        EngineSpec("28.5", FORKY_DOCKERD, "scripts/setup.sh fetches it into .cache/engines"),
    ]


def available_engines() -> list[EngineSpec]:
    """The known engines whose dockerd is installed here."""
    return [spec for spec in known_engines() if spec.present]


@functools.cache
def docker_cli_path() -> str:
    """The client engine.sh picked: one that speaks both API 1.41 and 1.51 (see there)."""
    out = subprocess.run([str(ENGINE_SH), "cli"], check=True, capture_output=True, text=True).stdout
    return out.strip()


class DockerCLIError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the CLI's stderr, which is what one needs."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}"


class PrivateEngine(Service):
    """One private dockerd under `workdir`: socket, data-root, exec-root, pid file and log.

    The socket path stays the same across `restart()`, so a client (the relay under test)
    can reconnect to the same DOCKER_HOST; data-root persists too, so images and containers
    survive a restart like they do on a real host.
    """

    def __init__(
        self,
        name: str,
        dockerd_path: Path | str,
        workdir: Path | str,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.extra_args = list(extra_args)
        self.dockerd_path = Path(dockerd_path)
        self.workdir = Path(workdir).resolve()
        socket_len = len(str(self.workdir / _LONGEST_SOCKET).encode())
        if socket_len > _MAX_UNIX_PATH:
            raise ValueError(
                f"workdir {self.workdir} is too long for unix sockets "
                f"({socket_len} > {_MAX_UNIX_PATH} bytes); use a shorter directory"
            )
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"PrivateEngine({self.name!r}, {str(self.dockerd_path)!r}, {str(self.workdir)!r})"

    # -- paths -------------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """dockerd's pid (engine.sh execs into dockerd, so it is our child's pid)."""
        return self._proc.pid if self.running and self._proc is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start dockerd and return once it answers and busybox:latest exists."""
        if self.running:
            return
        if not self.dockerd_path.exists():
            raise FileNotFoundError(f"engine {self.name}: no dockerd at {self.dockerd_path}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: Ctrl-C on pytest must not kill the engine under the test
            # that is running; the fixture teardown stops it in order instead.
            self._proc = subprocess.Popen(
                [str(ENGINE_SH), "run", str(self.workdir), str(self.dockerd_path)],
                env={**os.environ, "ENGINE_EXTRA_ARGS": " ".join(self.extra_args)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ready = subprocess.run(
            [str(ENGINE_SH), "ready", str(self.workdir), str(self._proc.pid)],
            capture_output=True,
            text=True,
        )
        if ready.returncode != 0:
            self._abort()
            raise RuntimeError(
                f"engine {self.name} did not start: {ready.stderr.strip()}\n"
                f"--- last lines of {self.log_path} ---\n{self._log_tail()}"
            )

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM dockerd and its containerd (engine.sh waits for both), then reap it."""
        proc, self._proc = self._proc, None
        self._version = None
        if proc is None:
            return
        if proc.poll() is None:
            subprocess.run([str(ENGINE_SH), "stop", str(self.workdir)], check=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"engine {self.name} (pid {proc.pid}) did not exit") from None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _abort(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        # A dockerd killed mid-start may have left its containerd behind.
        subprocess.run([str(ENGINE_SH), "stop", str(self.workdir)], check=False)

    # -- client ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for any client (docker CLI, the relay) aimed at this engine only."""
        env = {
            k: v for k, v in os.environ.items() if k not in {"DOCKER_CONTEXT", "DOCKER_API_VERSION"}
        }
        env["DOCKER_HOST"] = self.docker_host
        return env

    def cli(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker ARGS...` against this engine; stdout/stderr captured as text."""
        cmd: Sequence[str] = [docker_cli_path(), *args]
        result = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise DockerCLIError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def _server_version(self) -> tuple[str, str]:
        if self._version is None:
            out = self.cli("version", "--format", "{{.Server.Version}} {{.Server.APIVersion}}")
            version, api = out.stdout.split()
            self._version = (version, api)
        return self._version

    @property
    def version(self) -> str:
        """Server version as the engine reports it, e.g. "28.5.2+dfsg4"."""
        return self._server_version()[0]

    @property
    def api_version(self) -> str:
        """The engine's (maximum) API version, e.g. "1.51"."""
        return self._server_version()[1]


def require_engine(spec: EngineSpec) -> None:
    """Fail (never skip) the requesting test when a requested engine is not installed."""
    if not spec.present:
        pytest.fail(
            f"engine {spec.name} is requested but {spec.dockerd_path} is missing: "
            f"{spec.how_to_get}, or leave it out of RELAY_TEST_ENGINES (e.g. "
            f"RELAY_TEST_ENGINES={','.join(s.name for s in available_engines()) or 'none'})",
            pytrace=False,
        )


class EnginePool:
    """Session-wide engines, each started on first use and stopped by `stop_all()`.

    `make_workdir(name)` supplies a fresh directory per engine (pytest's tmp_path_factory).
    """

    def __init__(self, make_workdir: Callable[[str], Path]) -> None:
        self._make_workdir = make_workdir
        self._engines: dict[str, PrivateEngine] = {}

    def get(self, spec: EngineSpec) -> PrivateEngine:
        require_engine(spec)
        engine = self._engines.get(spec.name)
        if engine is None:
            engine = PrivateEngine(spec.name, spec.dockerd_path, self._make_workdir(spec.name))
            self._engines[spec.name] = engine
        # Also covers a test that stopped the shared engine and failed before restarting it.
        if not engine.running:
            engine.start()
        return engine

    def stop_all(self) -> None:
        errors: list[Exception] = []
        for engine in self._engines.values():
            try:
                engine.stop()
            except Exception as exc:  # keep stopping the others; report all at the end
                errors.append(exc)
        if errors:
            raise ExceptionGroup("stopping engines", errors)
