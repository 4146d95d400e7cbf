"""Lines no real engine sends, from a fake engine (tests/harness/fake_engine.py), to a real relay
process: a timeNano of 10**30, attributes nested 5,000 deep, a prune reclaiming "-5", a line of
100 MiB without a newline, invalid UTF-8 and garbage. Each is dead-lettered as malformed and
counted; the relay stays up, ready and on the same stream, and every ordinary event after a bad
line reaches the sink (stdout, a real file), in order, with its content."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import async_wait_for, free_port
from tests.harness.fake_engine import FakeEngine
from tests.integration.test_ops import get
from tests.relay_harness import spawn_relay

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
HUGE = 100 * MiB
# What the relay keeps of an oversized line for its dead letter.
OVERSIZED_HEAD_BYTES = 1024


# -- the relay, as an operator runs it ---------------------------------------------------------


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    stdout_path: Path
    stderr_path: Path

    def events(self) -> list[dict[str, Any]]:
        """The events the stdout sink wrote: complete lines only (it may be writing one)."""
        lines = self.stdout_path.read_bytes().split(b"\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self, key: str) -> int:
        """A line of /proc/<pid>/status in kB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} in /proc/{self.proc.pid}/status")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def dead_letters(self) -> list[dict[str, Any]]:
        """What `docker-event-relay dead-letter list --json` prints, parsed."""
        done = subprocess.run(
            [sys.executable, "-m", "relay", "dead-letter", "list", "--json"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


async def scrape(port: int) -> dict[str, float]:
    """Series without labels by name; labelled ones as name{k="v",...}."""
    status, text = await get(port, "/metrics", timeout=10)
    assert status == 200, text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


@contextlib.asynccontextmanager
async def relay_process(engine: FakeEngine, workdir: Path) -> AsyncIterator[RelayProcess]:
    """`python -m relay run` with the defaults users run, on the fake engine, the stdout sink
    writing to a file; stopped with SIGTERM, which must end it with exit 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "DOCKER_"))}
    env.update(
        RELAY_ENGINE__HOST=engine.docker_host,
        RELAY_STATE_DIR=str(workdir / "state"),
        RELAY_HTTP__HOST="127.0.0.1",
        RELAY_HTTP__PORT=str(port),
    )
    stdout_path, stderr_path = workdir / "relay.stdout", workdir / "relay.stderr"
    proc = spawn_relay(env, stdout_path, stderr_path)
    relay = RelayProcess(proc, port, env, stdout_path, stderr_path)
    try:

        async def ready() -> bool:
            assert proc.poll() is None, f"relay exited {proc.returncode}: {relay.stderr()}"
            try:
                return (await get(port, "/readyz", timeout=10))[0] == 200
            except aiohttp.ClientError:
                return False

        await async_wait_for(ready, 60, message="the relay ready on the fake engine")
        yield relay
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the relay did not stop on SIGTERM") from None
    assert proc.returncode == 0, relay.stderr()


@dataclass
class ReadyWatch:
    """/readyz asked again and again while the test runs: every answer must be 200 ready."""

    port: int
    answers: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            try:
                status, body = await get(self.port, "/readyz", timeout=10)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            self.answers += 1
            if status != 200:
                self.failures.append(f"{status} {body}")
            await asyncio.sleep(0.1)  # the pace of the probe, not a synchronisation


# -- what the fake engine sends ----------------------------------------------------------------


def ordinary(tag: str, count: int = 5) -> list[dict[str, Any]]:
    """Volume creations as engine 20.10 sends them, each with its own name and timeNano."""
    base = time.time_ns()
    return [
        {
            "Type": "volume",
            "Action": "create",
            "Actor": {"ID": f"{tag}-{i}", "Attributes": {"driver": "local"}},
            "scope": "local",
            "time": (base + i) // 10**9,
            "timeNano": base + i,
        }
        for i in range(count)
    ]


def lines_of(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in messages)


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b'"x"' + b"}" * depth


HUGE_TIME = (
    b'{"Type":"container","Action":"start","Actor":{"ID":"c1","Attributes":{"name":"web"}},'
    b'"scope":"local","time":1000000000000000000000,"timeNano":' + str(10**30).encode() + b"}"
)
DEEP = (
    b'{"Type":"network","Action":"create","Actor":{"ID":"n1","Attributes":'
    + nested(5000)
    + b'},"scope":"local","time":1796010617,"timeNano":1796010617000000001}'
)
NEGATIVE_PRUNE = (
    b'{"Type":"volume","Action":"prune","Actor":{"ID":"","Attributes":{"reclaimed":"-5"}},'
    b'"scope":"local","time":1796010618,"timeNano":1796010618000000001}'
)
GARBAGE = [
    b"\xff\xfe\xfd\xfc",
    b"this is not json",
    b'{"Type":"container","Action":"st\xffart","Actor":{"ID":"c2","Attributes":{}},"timeNano":1}',
    b"[1,2,3]",
    b'"a string"',
    b"\x00\x01\x02\x1b[31mred",
    b'{"Type":"volume","Action":"create","Actor":',
]
HUGE_PREFIX = b'{"Type":"container","Action":"create","Actor":{"ID":"huge","Attributes":{"junk":"'
HUGE_SUFFIX = b'"}},"scope":"local","time":1796010619,"timeNano":1796010619000000001}'


def huge_line_chunks(chunk: int = MiB) -> Iterator[bytes]:
    """HUGE_PREFIX, HUGE bytes of filler, then HUGE_SUFFIX: no newline anywhere."""
    yield HUGE_PREFIX
    filler = b"x" * chunk
    for _ in range(HUGE // chunk):
        yield filler
    yield HUGE_SUFFIX


@pytest.fixture
def fake_engine_dir() -> Iterator[Path]:
    # Short: a unix socket path has at most 107 bytes, and pytest's tmp_path can be long.
    path = Path(tempfile.mkdtemp(prefix="fake-engine-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_hostile_lines_never_crash_nor_wedge_the_relay(
    fake_engine_dir: Path, tmp_path: Path
) -> None:
    async with FakeEngine(fake_engine_dir / "engine.sock") as engine:
        async with relay_process(engine, tmp_path) as relay:
            stream = await engine.wait_streams(1)
            assert "since" in stream.query
            watch = ReadyWatch(relay.port)
            watcher = asyncio.create_task(watch.run())
            expected: list[dict[str, Any]] = []
            bad: list[bytes] = []

            async def then_ordinary(tag: str, write_first: bytes = b"") -> None:
                # The bad line's newline and the ordinary events after it in one write: the
                # relay must tell them apart within a read.
                good = ordinary(tag)
                expected.extend(good)
                await engine.write(write_first + lines_of(good))
                await async_wait_for(
                    lambda: len(relay.events()) >= len(expected),
                    60,
                    message=f"the ordinary events after case {tag} at the sink",
                )

            await then_ordinary("before")

            # (a), (b), (c): lines the normalizer cannot make an event of.
            for tag, line in (("a", HUGE_TIME), ("b", DEEP), ("c", NEGATIVE_PRUNE)):
                bad.append(line)
                await then_ordinary(tag, line + b"\n")

            # (d): 100 MiB without a newline, in 1 MiB writes, then its end and its newline.
            rss_before, hwm_before = relay.status("VmRSS"), relay.status("VmHWM")
            cpu_before = relay.cpu_seconds()
            started = time.monotonic()
            chunks = list(huge_line_chunks())
            await engine.write_all(chunks[:-1])
            # Mid-line (100 MiB written, no newline yet): still ready, nothing counted yet.
            mid_line = await get(relay.port, "/readyz", timeout=10)
            mid_metrics = await scrape(relay.port)
            bad.append((HUGE_PREFIX + b"x" * OVERSIZED_HEAD_BYTES)[:OVERSIZED_HEAD_BYTES])
            await then_ordinary("d", chunks[-1] + b"\n")
            elapsed = time.monotonic() - started
            cpu = relay.cpu_seconds() - cpu_before
            hwm_after = relay.status("VmHWM")

            # (e): invalid UTF-8 and garbage, each on its own line, then ordinary events.
            bad.extend(GARBAGE)
            await then_ordinary("e", b"".join(line + b"\n" for line in GARBAGE))
            await then_ordinary("after")

            metrics = await async_wait_for(
                lambda: _settled(relay.port, len(bad)),
                30,
                message="every bad line counted in /metrics",
            )
            assert metrics is not None

            async def dead_lettered() -> list[dict[str, Any]] | None:
                letters = await asyncio.to_thread(relay.dead_letters)
                return letters if len(letters) >= len(bad) else None

            letters = await async_wait_for(
                dead_lettered,
                60,
                interval=0.5,
                message="every bad line in the dead letters",
            )
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            final_ready = await get(relay.port, "/readyz", timeout=10)

    print(
        f"\n100 MiB line without a newline: {elapsed:.2f}s until the events after it were "
        f"delivered; relay CPU {cpu:.2f}s; RSS before {rss_before / 1024:.1f} MiB, peak "
        f"(VmHWM) before {hwm_before / 1024:.1f} MiB, after {hwm_after / 1024:.1f} MiB; "
        f"/readyz answered {watch.answers} times during the test"
    )

    # Up, ready and on the one stream it opened: nothing made it reconnect or stall.
    assert watch.failures == [], watch.failures
    assert watch.answers > 0
    assert mid_line == (200, "ready\n")
    assert mid_metrics["relay_engine_lines_oversized_total"] == 0
    assert final_ready == (200, "ready\n")
    assert len(engine.streams) == 1
    assert metrics.get("relay_engine_reconnects_total") == 0

    # Every ordinary event, in order, with its content; nothing from the bad lines.
    out = relay.events()
    assert [e["data"]["actor"]["id"] for e in out] == [m["Actor"]["ID"] for m in expected]
    for event, message in zip(out, expected, strict=True):
        data = event["data"]
        assert (data["type"], data["action"]) == ("volume", "create")
        assert data["time_nano"] == message["timeNano"]
        assert data["actor"]["attributes"] == {"driver": "local"}
        assert event["source"] == f"urn:docker:engine:{engine.engine_id}"

    # Every bad line dead-lettered as malformed, in the order it came, and counted.
    assert [letter["reason"] for letter in letters] == ["malformed"] * len(bad)
    assert [letter["raw"] for letter in letters] == [
        line.decode("utf-8", "replace") for line in bad
    ]
    oversized = letters[3]
    huge_size = len(HUGE_PREFIX) + HUGE + len(HUGE_SUFFIX)
    assert f"line of {huge_size} bytes exceeds engine.max_line_bytes" in oversized["error"]
    assert metrics["relay_events_malformed_total"] == len(bad)
    assert metrics["relay_engine_lines_oversized_total"] == 1
    assert metrics['relay_events_read_total{action="create",type="volume"}'] == len(expected)
    assert metrics["relay_reader_lines_dropped_total"] == 0
    assert relay.stderr().count("oversized line from the engine") == 1

    # Memory is deterministic (the limit, a read or two, aiohttp's buffer), unlike time: a
    # generous bound that a framer holding the line (100 MiB) would break.
    assert hwm_after - rss_before < 100 * 1024, (rss_before, hwm_after)


async def _settled(port: int, bad: int) -> dict[str, float] | None:
    metrics = await scrape(port)
    return metrics if metrics.get("relay_events_malformed_total") == bad else None
