"""One supervised lifecycle, against a real engine: whichever component fails, every sink is
closed, the spool committed (the position in the engine's stream, and every event a sink still
owes) and the HTTP port released; run as an operator runs it, the process then exits 1 with
one clear line."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.app import Relay, failed_components
from relay.lifecycle import TaskStatus
from relay.router import RouteFilter
from relay.sink import Event, RetryableSinkError, Sink
from tests.harness import PrivateEngine, async_wait_for
from tests.harness.receiver import Receiver
from tests.relay_harness import relay_settings, spool_cursor, spool_owed

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ["http", "sink:first", "sink:down", "spool", "pipeline", "reader"]


class Down(Sink):
    """A destination that is down: every send fails, retryably."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.closes = 0

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Event]) -> None:
        raise RetryableSinkError("down", sink=self.name)

    async def aclose(self) -> None:
        self.closes += 1


class Keeping(Sink):
    """Keeps what it is sent and counts its closes."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.events: list[Event] = []
        self.closes = 0

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Event]) -> None:
        self.events.extend(batch)

    async def aclose(self) -> None:
        self.closes += 1


def fail_on(owner: object, trigger: asyncio.Event) -> None:
    """Make `owner.run` (a component) work as usual until `trigger` is set, then raise."""
    original = owner.run  # type: ignore[attr-defined]

    async def run(task_status: TaskStatus) -> None:
        working = asyncio.ensure_future(original(task_status))
        armed = asyncio.ensure_future(trigger.wait())
        try:
            await asyncio.wait([working, armed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            working.cancel()
            armed.cancel()
            await asyncio.wait([working, armed])
        raise RuntimeError("injected failure")

    owner.run = run  # type: ignore[attr-defined]


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


@pytest.mark.parametrize("component", COMPONENTS)
async def test_a_failing_component_closes_every_sink_and_commits_the_spool(
    engine: PrivateEngine, tmp_path: Path, component: str
) -> None:
    first, down = Keeping("first"), Down("down")
    tag = uuid.uuid4().hex[:8]
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        # This test's volumes only: a neighbour's last events may share the relay's first
        # milliseconds.
        engine={"filters": {"volume": [f"life-{tag}-{i}" for i in range(3)]}},
        http={"enabled": True, "host": "127.0.0.1", "port": 0},
    )
    relay = Relay(settings, [(first, RouteFilter()), (down, RouteFilter())])
    owners = {
        "http": relay.http,
        "sink:first": relay.workers[0],
        "sink:down": relay.workers[1],
        "spool": relay.spool,
        "pipeline": relay.pipeline,
        "reader": relay.reader,
    }
    trigger = asyncio.Event()
    fail_on(owners[component], trigger)
    running = asyncio.create_task(relay.run(asyncio.Event()))
    await async_wait_for(lambda: relay.reader.connected, 30, message="connected")
    assert relay.http is not None and relay.http.bound_port
    port = relay.http.bound_port

    for i in range(3):
        await asyncio.to_thread(engine.cli, "volume", "create", f"life-{tag}-{i}")
    await async_wait_for(
        lambda: len(first.events) == 3 and relay.workers[1].held_events == 3,
        30,
        message="3 events delivered by one sink, held for the other",
    )

    trigger.set()
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(running, 30)

    assert [f.component for f in failed_components(raised.value)] == [component]
    assert "injected failure" in str(failed_components(raised.value)[0])
    assert (first.closes, down.closes) == (1, 1)
    cursor = spool_cursor(tmp_path)
    assert cursor is not None and cursor["time_nano"] == first.events[-1].time_nano
    assert cursor["ids"][-3:] == [e.id for e in first.events]
    # What the down sink never got is on disk, for the next start.
    assert [e["id"] for e in spool_owed(tmp_path)] == [e.id for e in first.events]
    assert await refused(port)


# The relay as an operator runs it, with one fault nobody foresaw: the webhook sink's worker
# raises on the event of the volume named *-bad.
INJECTED = """
import sys
from relay import cli, outbox

original = outbox.SinkWorker._deliver


async def deliver(self, batch):
    if self.name == "webhook" and any(e.ce.subject.endswith("-bad") for e in batch):
        raise RuntimeError("injected failure")
    await original(self, batch)


outbox.SinkWorker._deliver = deliver
sys.exit(cli.main(["run"]))
"""


def start_relay_process(
    env: dict[str, str], err: Path, code: str | None = None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "relay", "run"]
    with open(err, "wb") as err_file:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_a_crash_exits_1_with_one_clear_line_and_loses_nothing(
    engine: PrivateEngine, tmp_path: Path, level: str
) -> None:
    state = tmp_path / "state"
    tag = uuid.uuid4().hex[:8]
    names = [f"crash-{tag}-ok", f"crash-{tag}-bad"]
    async with Receiver() as receiver:
        env = {k: v for k, v in engine.env().items() if not k.startswith("RELAY_")}
        env.update(
            {
                "RELAY_ENGINE__HOST": engine.docker_host,
                "RELAY_ENGINE__FILTERS": json.dumps({"volume": names}),
                "RELAY_STATE_DIR": str(state),
                "RELAY_HTTP__ENABLED": "false",
                "RELAY_LOG__LEVEL": level,
                "RELAY_SINKS": json.dumps(
                    [{"type": "webhook", "url": receiver.url()}, {"type": "stdout"}]
                ),
            }
        )
        err = tmp_path / "err.log"
        proc = await asyncio.to_thread(start_relay_process, env, err, INJECTED)
        try:
            await async_wait_for(
                lambda: b"connected" in err.read_bytes() or proc.poll() is not None,
                30,
                message="relay connected",
            )
            await asyncio.to_thread(engine.cli, "volume", "create", names[0])
            await receiver.wait_for_requests(1, timeout=30)
            await asyncio.to_thread(engine.cli, "volume", "create", names[1])
            out, _ = await asyncio.to_thread(proc.communicate, None, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        stderr = err.read_text()
        assert proc.returncode == 1, stderr
        records = [json.loads(line) for line in stderr.splitlines()]
        errors = [r for r in records if r["level"] == "error"]
        assert len(errors) == 1, errors
        assert errors[0]["message"] == (
            "sink:webhook failed: RuntimeError: injected failure; every sink was closed and the "
            "spool committed; exiting"
        )
        assert ("exception" in errors[0]) is (level == "DEBUG")
        assert ("Traceback" in stderr) is (level == "DEBUG")
        # The second event may or may not have reached stdout before the relay stopped.
        assert [json.loads(line)["subject"] for line in out.decode().splitlines()] in (
            names[:1],
            names,
        )
        # The webhook never got the second event: it is in the spool, and the next start
        # delivers it.
        assert [e["subject"] for e in spool_owed(state)] == names[1:]
        again = await asyncio.to_thread(start_relay_process, env, tmp_path / "err2.log")
        try:
            await receiver.wait_for_events(2, timeout=30)
        finally:
            again.send_signal(signal.SIGTERM)
            await asyncio.to_thread(again.wait, 30)
        assert [e["subject"] for e in receiver.events()] == names
        assert again.returncode == 0
