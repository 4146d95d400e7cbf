"""`scripts/run.sh`, the README's "run the relay" command, on a machine with no engine running:
it starts a private Docker Engine, and whatever stops it (Ctrl-C, `timeout`, `kill`, a closed
terminal, the relay exiting on its own) stops that engine too, dockerd and containerd.

The script's set-up step (scripts/setup.sh: apt, pip, the forky engine) is skipped with
RUN_SKIP_SETUP=1: it starts no process, the suite's own set-up has run it, and running it
again here could reinstall the virtualenv the tests run from. Everything after it runs as users
run it: the real private engine, the real relay, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import known_engines, require_engine, wait_for

REPO = Path(__file__).resolve().parents[2]
ENGINE_SH = REPO / "scripts" / "engine.sh"
NO_ENGINE = "no engine was running: started a private one"


def alive(pid: int) -> bool:
    """Running: a zombie has ended (init here may never reap what it inherits)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_naming(directory: Path) -> list[str]:
    """Live processes whose command line names `directory` (the engine, its containerd)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(directory) in cmdline and alive(int(proc.name)):
            found.append(f"{proc.name}: {cmdline}")
    return found


def mounts_under(directory: Path) -> list[str]:
    """What is still mounted below `directory` (dockerd bind-mounts its data root)."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    return [m for m in mounts if m.split()[1].startswith(f"{directory}/")]


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def engine_dir(self) -> Path:
        return self.workdir / "engine"

    @property
    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text(errors="replace")

    def engine_pids(self) -> dict[str, int]:
        files = {
            "dockerd": self.engine_dir / "docker.pid",
            "containerd": self.engine_dir / "exec" / "containerd" / "containerd.pid",
        }
        pids = {}
        for name, path in files.items():
            try:
                pids[name] = int(path.read_text())
            except (OSError, ValueError):  # not written yet, or being written
                pass
        return pids

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def relaying(self) -> list[int]:
        """Once the relay is connected to the private engine: its pid (run.sh's one child)."""
        assert self.proc.poll() is None, f"run.sh exited {self.proc.returncode}:\n{self.stderr}"
        if "relay.engine: engine unix://" not in self.stderr:
            return []
        return self.children()

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run.sh did not exit within 60s:\n{self.stderr}") from None

    def assert_all_gone(self, pids: dict[str, int] | list[int]) -> None:
        """At run.sh's exit, not later: it must have waited for them."""
        values = pids.values() if isinstance(pids, dict) else pids
        left = [pid for pid in values if alive(pid)]
        assert not left, f"still running: {left}\n{self.stderr}"
        assert not processes_naming(self.engine_dir), processes_naming(self.engine_dir)
        assert not mounts_under(self.workdir), mounts_under(self.workdir)


@pytest.fixture
def run_sh() -> Iterator[Callable[..., Run]]:
    """Start run.sh (with these arguments) in a session of its own: its process group is what
    a terminal signals. The engine directory is short enough for the engine's unix sockets."""
    require_engine(known_engines()[0])  # run.sh starts the system dockerd
    runs: list[Run] = []

    def start(*args: str) -> Run:
        workdir = Path(tempfile.mkdtemp(prefix="run-sh-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "DOCKER_"))}
        env.update(
            RUN_SKIP_SETUP="1",
            RUN_ENGINE_DIR=str(workdir / "engine"),
            # Nobody answers there: run.sh starts its private engine, as on a fresh machine.
            DOCKER_HOST=f"unix://{workdir}/nobody.sock",
            RELAY_STATE_DIR=str(workdir / "state"),
            RELAY_HTTP__ENABLED="false",
        )
        with (workdir / "stdout").open("wb") as out, (workdir / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                ["bash", "scripts/run.sh", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        runs.append(Run(proc, workdir))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        subprocess.run(["bash", str(ENGINE_SH), "stop", str(run.engine_dir)], check=False)
        shutil.rmtree(run.workdir, ignore_errors=True)


@pytest.mark.parametrize(
    ("sig", "to_group", "status"),
    [
        # Ctrl-C: the terminal signals the whole foreground group, the relay included.
        (signal.SIGINT, True, 0),
        # `timeout`: SIGTERM to its child and that child's group.
        (signal.SIGTERM, True, 0),
        # `kill PID`, a supervisor: the script alone; it passes SIGTERM on to the relay.
        (signal.SIGTERM, False, 0),
        # A closed terminal: SIGHUP to the group. The relay drains on it as on SIGTERM.
        (signal.SIGHUP, True, 0),
        (signal.SIGHUP, False, 0),
        (signal.SIGINT, False, 0),
    ],
    ids=["ctrl-c", "timeout", "kill", "hangup", "hup-script", "int-script"],
)
def test_a_signal_stops_the_relay_then_the_private_engine(
    run_sh: Callable[..., Run], sig: signal.Signals, to_group: bool, status: int
) -> None:
    run = run_sh()
    relay = wait_for(run.relaying, 60, interval=0.05, message="the relay connected")
    engine = run.engine_pids()
    assert set(engine) == {"dockerd", "containerd"} and all(map(alive, engine.values()))
    assert NO_ENGINE in run.stderr

    if to_group:
        os.killpg(run.proc.pid, sig)
    else:
        run.proc.send_signal(sig)
    assert run.wait_exit() == status, run.stderr
    run.assert_all_gone([*engine.values(), *relay])
    if status == 0:  # the relay drained and stopped on its own terms, then the engine went
        stderr = run.stderr
        assert stderr.index("relay.app: stopped at") < stderr.index("stopping the private engine")


def test_the_engine_stops_when_the_relay_exits_on_its_own(run_sh: Callable[..., Run]) -> None:
    run = run_sh("run", "--no-such-option")
    assert run.wait_exit() == 2, run.stderr  # argparse's status, passed on
    assert NO_ENGINE in run.stderr and "stopping the private engine" in run.stderr
    run.assert_all_gone([])


def test_a_signal_while_the_engine_starts_stops_it_too(run_sh: Callable[..., Run]) -> None:
    run = run_sh()
    # dockerd writes its pid file first, then starts containerd and opens its socket: the
    # signal arrives while scripts/engine.sh start still waits for it.
    engine = wait_for(run.engine_pids, 60, interval=0.005, message="dockerd's pid file")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM, run.stderr
    run.assert_all_gone(engine)
    assert NO_ENGINE not in run.stderr and "relay.app" not in run.stderr
