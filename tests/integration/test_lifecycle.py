"""One supervised lifecycle, against a real engine: whichever component fails, every sink is
closed, the checkpoint is written and the HTTP port is released; run as an operator runs it,
the process then exits 1 with one clear line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.app import Relay, failed_components
from relay.lifecycle import TaskStatus
from relay.router import RouteFilter
from relay.sink import Event, Sink
from tests.harness import PrivateEngine, async_wait_for
from tests.harness.receiver import Receiver
from tests.relay_harness import relay_settings

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ["http", "sink:first", "sink:second", "checkpoint", "pipeline", "reader"]


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
async def test_a_failing_component_closes_every_sink_and_writes_the_checkpoint(
    engine: PrivateEngine, tmp_path: Path, component: str
) -> None:
    first, second = Keeping("first"), Keeping("second")
    tag = uuid.uuid4().hex[:8]
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        # This test's volumes only: a neighbour's last events may share the relay's first
        # milliseconds.
        engine={"filters": {"volume": [f"life-{tag}-{i}" for i in range(3)]}},
        http={"enabled": True, "host": "127.0.0.1", "port": 0},
        # Never on its own schedule here: a checkpoint on disk can only be the teardown's.
        checkpoint_interval=3600,
    )
    relay = Relay(settings, [(first, RouteFilter()), (second, RouteFilter())])
    owners = {
        "http": relay.http,
        "sink:first": relay.workers[0],
        "sink:second": relay.workers[1],
        "checkpoint": relay.checkpoint,
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
        lambda: len(first.events) == len(second.events) == 3,
        30,
        message="3 events each",
    )
    assert not (tmp_path / "checkpoint.json").exists()

    trigger.set()
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(running, 30)

    assert [f.component for f in failed_components(raised.value)] == [component]
    assert "injected failure" in str(failed_components(raised.value)[0])
    assert (first.closes, second.closes) == (1, 1)
    stored = json.loads((tmp_path / "checkpoint.json").read_text())
    assert stored["time_nano"] == first.events[-1].time_nano
    assert stored["ids"][-3:] == [e.id for e in first.events]
    assert await refused(port)


def start_relay_process(env: dict[str, str], err: Path) -> subprocess.Popen[bytes]:
    with open(err, "wb") as err_file:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err_file,
        )


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_a_crash_exits_1_with_one_clear_line(
    engine: PrivateEngine, tmp_path: Path, level: str
) -> None:
    """The finding this lifecycle answers: an unwritable dead-letter path crashed the relay with
    a traceback, no sink closed and no checkpoint written."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    state = tmp_path / "state"
    err = tmp_path / "err.log"
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        receiver.fail(204, times=1)
        receiver.fail(400, body="no")
        env = {k: v for k, v in engine.env().items() if not k.startswith("RELAY_")}
        env.update(
            {
                "RELAY_ENGINE__HOST": engine.docker_host,
                "RELAY_ENGINE__FILTERS": json.dumps(
                    {"volume": [f"crash-{tag}-ok", f"crash-{tag}-bad"]}
                ),
                "RELAY_STATE_DIR": str(state),
                "RELAY_DEAD_LETTER_PATH": str(not_a_dir / "dead-letter.jsonl"),
                "RELAY_HTTP__ENABLED": "false",
                "RELAY_LOG__LEVEL": level,
                "RELAY_SINKS": json.dumps(
                    [{"type": "webhook", "url": receiver.url()}, {"type": "stdout"}]
                ),
            }
        )
        proc = await asyncio.to_thread(start_relay_process, env, err)
        try:
            await async_wait_for(
                lambda: b"connected" in err.read_bytes() or proc.poll() is not None,
                30,
                message="relay connected",
            )
            await asyncio.to_thread(engine.cli, "volume", "create", f"crash-{tag}-ok")
            await receiver.wait_for_requests(1, timeout=30)
            await asyncio.to_thread(engine.cli, "volume", "create", f"crash-{tag}-bad")
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
    assert "sink:webhook failed" in errors[0]["message"]
    assert str(not_a_dir) in errors[0]["message"]
    assert "every sink was closed and the checkpoint written" in errors[0]["message"]
    assert ("exception" in errors[0]) is (level == "DEBUG")
    assert ("Traceback" in stderr) is (level == "DEBUG")
    written = [json.loads(line) for line in out.decode().splitlines()]
    # The second event may or may not have reached stdout before the webhook's worker failed.
    assert [e["subject"] for e in written] in (
        [f"crash-{tag}-ok"],
        [f"crash-{tag}-ok", f"crash-{tag}-bad"],
    )
    # Both sinks finished with the first event, the webhook never with the second.
    stored = json.loads((state / "checkpoint.json").read_text())
    assert stored["time_nano"] == written[0]["data"]["time_nano"]
