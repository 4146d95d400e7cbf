"""Run the real relay in-process against a real engine, for integration tests.

The relay gets its own thread and event loop, as it would have its own process: a test that
blocks (a `docker` CLI call, a consumer poll) cannot stall the relay's reader, which the engine
would punish by dropping events (it drops for subscribers more than 100 ms behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from relay import plugins
from relay.app import Relay
from relay.router import RouteFilter
from relay.schema import Event
from relay.settings import Settings
from relay.sink import Sink
from tests.harness.wait import wait_for

REPO = Path(__file__).resolve().parents[1]


def relay_settings(docker_host: str, state_dir: Path, **overrides: Any) -> Settings:
    """The defaults users run (the retry policy's waits included), on a private engine and
    state directory, without the HTTP port."""
    values: dict[str, Any] = {
        "engine": {"host": docker_host},
        "state_dir": state_dir,
        "http": {"enabled": False},
        "drain_timeout": 5.0,
        "startup_timeout": 5.0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    settings = plugins.settings_model()(**values)
    settings.check()
    return settings


def spool_cursor(state_dir: Path) -> dict[str, Any] | None:
    """The engine cursor the spool in `state_dir` holds (engine_id, time_nano, ids), if any."""
    path = state_dir / "spool.db"
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
    return None if row is None else dict(json.loads(row[0]))


def spool_owed(state_dir: Path) -> list[dict[str, Any]]:
    """The events the spool in `state_dir` still holds for some sink, in order."""
    path = state_dir / "spool.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT body FROM events ORDER BY seq").fetchall()
    return [json.loads(body) for (body,) in rows]


class Recorder(Sink):
    """A sink that keeps every event the relay routed to it: what the relay read from the
    engine, to compare a real sink's output with."""

    def __init__(self, name: str = "recorder") -> None:
        super().__init__(name)
        self.events: list[Event] = []

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Event]) -> None:
        self.events.extend(batch)

    async def aclose(self) -> None:
        pass


@contextlib.asynccontextmanager
async def started(sink: Sink) -> AsyncIterator[Sink]:
    """The sink started, and closed on exit (also when the body raises)."""
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()


class RelayThread:
    """A relay running on its own loop in a thread."""

    def __init__(self, settings: Settings, sinks: Sequence[tuple[Sink, RouteFilter]] | None):
        self.settings = settings
        self._sinks = sinks
        self.relay: Relay | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="relay", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sinks = self._sinks
        if sinks is None:
            sinks = plugins.build_sinks(self.settings)
        self.relay = Relay(self.settings, sinks)
        self._ready.set()
        await self.relay.run(self._stop)

    def start(self, wait_connected: float) -> Relay:
        self._thread.start()
        self._ready.wait(30)
        deadline = time.monotonic() + wait_connected
        while self.error is None and not (self.relay and self.relay.reader.connected):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"relay did not connect to the engine within {wait_connected}s: "
                    f"{self.relay.reader.last_error if self.relay else 'not built'}"
                )
            time.sleep(0.02)
        if self.error is not None:
            raise self.error
        assert self.relay is not None
        return self.relay

    def stop(self, timeout: float) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"relay did not stop within {timeout}s")
        if self.error is not None:
            raise self.error


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings,
    sinks: Sequence[tuple[Sink, RouteFilter]] | None = None,
    *,
    wait_connected: float = 30.0,
) -> AsyncIterator[Relay]:
    """Start the relay, wait until it is connected to the engine, yield it, stop it (SIGTERM
    path: drain, close sinks) on exit. `sinks=None` builds the sinks from `settings.sinks`."""
    runner = RelayThread(settings, sinks)
    relay = await asyncio.to_thread(runner.start, wait_connected)
    try:
        yield relay
    finally:
        await asyncio.to_thread(runner.stop, settings.drain_timeout + 20)


# -- the relay as a process ------------------------------------------------------------------


def spawn_relay(env: Mapping[str, str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    """`docker-event-relay run` as an operator starts it, configured by `env` alone."""
    with stderr.open("wb") as err, stdout.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )


def start_cli_relay(
    base_env: Mapping[str, str],
    docker_host: str,
    state: Path,
    out: Path,
    err: Path,
    **settings: str,
) -> subprocess.Popen[bytes]:
    """The relay process on `docker_host` (its stdout sink into `out`, its log into `err`), no
    HTTP port, `settings` as RELAY_* variables; returned once it logged its connection. A
    first start reads from then on: events before it are not its own."""
    env = {k: v for k, v in base_env.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_ENGINE__HOST=docker_host,
        RELAY_STATE_DIR=str(state),
        RELAY_HTTP__ENABLED="false",
        **settings,
    )
    proc = spawn_relay(env, out, err)
    wait_for(
        lambda: b"connected" in err.read_bytes() or proc.poll() is not None,
        timeout=30,
        message="the relay connected",
    )
    assert proc.poll() is None, err.read_text()
    return proc
