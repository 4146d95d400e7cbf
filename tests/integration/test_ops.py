"""Operations against the real engine: /metrics counts, /healthz and /readyz, and the logs of a
relay run as an operator runs it (a subprocess, `python -m relay run`, configured by env)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.app import Relay
from relay.router import RouteFilter
from relay.sink import SinkContext
from sinks.stdout import StdoutSink
from sinks.webhook import WebhookSinkConfig
from tests.harness import (
    EnginePool,
    EngineSpec,
    PrivateEngine,
    async_wait_for,
    free_port,
    require_engine,
    wait_for,
)
from tests.harness.receiver import Receiver
from tests.relay_harness import relay_settings, running_relay, spawn_relay
from tests.scenarios import PRUNED_TYPES, engine_events, engine_time, prune_scenario

REPO = Path(__file__).resolve().parents[2]
HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0}


# -- scraping ----------------------------------------------------------------------------------


@dataclass
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {ls: v for (n, ls), v in self.samples.items() if n == name}


async def get(port: int, path: str, timeout: float | None = None) -> tuple[int, str]:  # noqa: ASYNC109
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.text()


async def scrape(port: int) -> Scrape:
    status, text = await get(port, "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(samples)


def port_of(relay: Relay) -> int:
    assert relay.http is not None and relay.http.bound_port, "the relay serves no HTTP port"
    return relay.http.bound_port


async def wait_readyz(port: int, status: int, within: float = 30) -> str:
    async def check() -> str | None:
        try:
            got, body = await get(port, "/readyz")
        except aiohttp.ClientError:
            return None
        return body if got == status else None

    body = await async_wait_for(check, within, message=f"/readyz answering {status}")
    assert body is not None
    return body


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- /metrics ----------------------------------------------------------------------------------


async def test_metrics_count_what_the_engine_sent(engine: PrivateEngine, tmp_path: Path) -> None:
    """Events read by type/action and delivered per sink equal what the sinks received, which
    equals what the engine itself reports for the same window."""
    out = tmp_path / "out.jsonl"
    tag = uuid.uuid4().hex[:8]
    names = [f"ops-{tag}-{i}" for i in range(25)]
    async with Receiver() as receiver:
        settings = relay_settings(engine.docker_host, tmp_path / "state", http=HTTP)
        hook = WebhookSinkConfig(name="hook", url=receiver.url(), mode="batch")
        sinks = [
            (StdoutSink("file", 500, stream=out.open("wb")), RouteFilter()),
            (hook.build(SinkContext()), RouteFilter()),
        ]
        async with running_relay(settings, sinks) as relay:
            port = port_of(relay)
            since = engine_time(engine)
            for name in names:
                await asyncio.to_thread(engine.cli, "volume", "create", name)
            await asyncio.to_thread(engine.cli, "volume", "rm", *names)
            until = engine_time(engine)
            await receiver.wait_for_events(
                2 * len(names),
                where=lambda e: e["data"]["actor"]["id"].startswith(f"ops-{tag}-"),
            )

            # The stream's last event is in; wait until both sinks acknowledged all it read.
            async def settled() -> Scrape | None:
                m = await scrape(port)
                read = m.total("relay_events_read_total")
                done = [m.get("relay_events_delivered_total", sink=s) for s in sink_names]
                return m if read and all(d == read for d in done) else None

            sink_names = [w.name for w in relay.workers]
            m = await async_wait_for(settled, 30, message="every event read delivered")
            assert m is not None

        reported = engine_events(engine, since, until)
        assert m.get("relay_events_read_total", type="volume", action="create") == len(names)
        assert m.get("relay_events_read_total", type="volume", action="destroy") == len(names)
        assert m.total("relay_events_read_total") == len(reported) == len(receiver.events())
        assert m.get("relay_events_delivered_total", sink="hook") == len(receiver.events())
        assert m.get("relay_events_delivered_total", sink="file") == len(read_jsonl(out))
        for sink in sink_names:
            assert m.total("relay_events_dead_lettered_total", sink=sink) == 0
            assert m.total("relay_events_dropped_total", sink=sink) == 0
            assert m.get("relay_outbox_depth", sink=sink) == 0
            assert m.get("relay_sink_up", sink=sink) == 1
            assert m.get("relay_delivery_latency_seconds_count", sink=sink) == len(reported)
        assert m.get("relay_engine_connected") == 1
        assert m.get("relay_events_malformed_total") == 0
        last = m.get("relay_last_event_timestamp_seconds")
        assert last is not None and abs(last - float(until)) < 60
        since_last = m.get("relay_seconds_since_last_event")
        assert since_last is not None and 0 <= since_last < 60


async def test_reclaimed_bytes_total_equals_the_prune_events(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    settings = relay_settings(engine.docker_host, tmp_path / "state", http=HTTP)
    async with running_relay(settings) as relay:
        port = port_of(relay)
        reported = await asyncio.to_thread(prune_scenario, engine)

        async def pruned() -> Scrape | None:
            m = await scrape(port)
            got = {t: m.get("relay_events_read_total", type=t, action="prune") for t in reported}
            return m if all(got.values()) else None

        m = await async_wait_for(pruned, 30, message="the five prune events read")
        assert m is not None
    reclaimed = {
        dict(labels)["type"]: value
        for labels, value in m.series("relay_reclaimed_bytes_total").items()
    }
    assert set(reclaimed) == set(PRUNED_TYPES)
    assert reclaimed == {t: float(b) for t, b in reported.items()}
    assert sum(reclaimed.values()) == sum(reported.values()) > 0


# -- /healthz and /readyz ----------------------------------------------------------------------


async def test_readyz_is_503_while_the_engine_is_down(
    engine_fresh: PrivateEngine, tmp_path: Path
) -> None:
    settings = relay_settings(engine_fresh.docker_host, tmp_path / "state", http=HTTP)
    async with running_relay(settings) as relay:
        port = port_of(relay)
        assert await wait_readyz(port, 200) == "ready\n"
        assert await get(port, "/healthz") == (200, "ok\n")
        before = await scrape(port)

        await asyncio.to_thread(engine_fresh.stop)
        body = await wait_readyz(port, 503)
        assert body.startswith("not ready: engine ") and "not connected" in body
        assert engine_fresh.docker_host.removeprefix("unix://") in body
        assert await get(port, "/healthz") == (200, "ok\n")  # alive, only not useful
        assert (await scrape(port)).get("relay_engine_connected") == 0

        await asyncio.to_thread(engine_fresh.start)
        assert await wait_readyz(port, 200, within=60) == "ready\n"
        after = await scrape(port)
        assert after.get("relay_engine_connected") == 1
        reconnects = after.get("relay_engine_reconnects_total") or 0
        assert reconnects == (before.get("relay_engine_reconnects_total") or 0) + 1


async def test_readyz_follows_a_failing_sink_and_a_stopped_one(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        settings = relay_settings(
            engine.docker_host,
            tmp_path / "state",
            http=HTTP,
            sinks=[{"type": "webhook", "name": "hook", "url": receiver.url()}],
        )
        async with running_relay(settings) as relay:
            port = port_of(relay)
            assert await wait_readyz(port, 200) == "ready\n"

            # Failing (500): not ready while it fails, ready again once it delivers.
            receiver.fail(500)
            await asyncio.to_thread(engine.cli, "volume", "create", f"ops-{tag}-a")
            body = await wait_readyz(port, 503)
            assert body.startswith("not ready: sink hook failing: ") and "500" in body
            assert (await scrape(port)).get("relay_sink_up", sink="hook") == 0
            receiver.reset()
            assert await wait_readyz(port, 200) == "ready\n"
            await receiver.wait_for_events(1, where=lambda e: e["subject"] == f"ops-{tag}-a")

            # Stopped (410): not ready, and it stays so: the destination said it is gone.
            receiver.fail(410)
            await asyncio.to_thread(engine.cli, "volume", "create", f"ops-{tag}-b")
            body = await wait_readyz(port, 503)
            assert body.startswith("not ready: sink hook stopped: ")
            m = await scrape(port)
            assert m.get("relay_sink_stopped", sink="hook") == 1
            assert m.get("relay_events_dead_lettered_total", sink="hook", reason="sink_stopped")
            receiver.reset()
            await asyncio.to_thread(engine.cli, "volume", "create", f"ops-{tag}-c")
            await async_wait_for(
                lambda: [
                    r
                    for r in read_jsonl(settings.dead_letter_file)
                    if r["event"]["subject"] == f"ops-{tag}-c"
                    and r["reason"] == "sink_stopped"
                    and r["sink"] == "hook"
                ],
                30,
                message="the event after the stop dead-lettered",
            )
            status, body = await get(port, "/readyz")
            assert status == 503 and "sink hook stopped" in body

        # A restarted relay starts the sink again: ready once more.
        async with running_relay(settings) as relay:
            assert await wait_readyz(port_of(relay), 200) == "ready\n"


# -- the relay as a process: logs --------------------------------------------------------------


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path
    stdout_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr().splitlines()]


def relay_env(engine: PrivateEngine, tmp_path: Path, port: int, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    base.update(
        DOCKER_HOST=engine.docker_host,
        RELAY_STATE_DIR=str(tmp_path / "state"),
        RELAY_HTTP__HOST="127.0.0.1",
        RELAY_HTTP__PORT=str(port),
        RELAY_RETRY__WAIT_INITIAL="0.05",
        RELAY_RETRY__WAIT_MAX="0.3",
        RELAY_STARTUP_TIMEOUT="1",
        RELAY_DRAIN_TIMEOUT="2",
    )
    base.update(env)
    return base


def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "check-config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def relay_process(env: dict[str, str], tmp_path: Path) -> AsyncIterator[RelayProcess]:
    stderr_path, stdout_path = tmp_path / "relay.stderr", tmp_path / "relay.stdout"
    proc = spawn_relay(env, stdout_path, stderr_path)
    rp = RelayProcess(proc, int(env["RELAY_HTTP__PORT"]), stderr_path, stdout_path)
    try:

        async def serving() -> bool:
            assert proc.poll() is None, f"relay exited {proc.returncode}: {rp.stderr()}"
            try:
                return (await get(rp.port, "/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await async_wait_for(serving, 30, message="the relay serving /healthz")
        yield rp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the relay did not stop on SIGTERM") from None
    assert proc.returncode == 0, rp.stderr()


async def test_logs_are_json_with_one_line_per_retry_burst(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        sinks = [{"type": "webhook", "name": "hook", "url": receiver.url(), "max_batch": 1}]
        env = relay_env(engine, tmp_path, free_port(), RELAY_SINKS=json.dumps(sinks))
        async with relay_process(env, tmp_path) as rp:
            await async_wait_for(
                lambda: "delivering" not in rp.stderr() and rp.stderr(), 10, message="a log line"
            )
            for burst in ("one", "two"):
                receiver.fail(503)
                names = [f"ops-{tag}-{burst}-{i}" for i in range(10)]
                for name in names:
                    await asyncio.to_thread(engine.cli, "volume", "create", name)

                async def retried_a_lot() -> bool:
                    m = await scrape(rp.port)
                    return (m.get("relay_events_retried_total", sink="hook") or 0) >= 20 and (
                        m.get("relay_outbox_depth", sink="hook") or 0
                    ) >= 9

                await async_wait_for(retried_a_lot, 30, message="many failed attempts")
                receiver.reset()
                await receiver.wait_for_events(
                    len(names), where=lambda e, b=burst: e["subject"].startswith(f"ops-{tag}-{b}-")
                )
        lines = rp.log_lines()  # every line parses as JSON, or this raises
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert {line["level"] for line in lines} <= {"info", "warning"}
    failing = [ln for ln in lines if "delivery failing" in ln["message"]]
    recovered = [ln for ln in lines if "delivering again" in ln["message"]]
    assert len(failing) == 2, failing
    assert len(recovered) == 2, recovered
    assert all(ln["level"] == "warning" and "hook" in ln["message"] for ln in failing + recovered)
    # Nothing else per event or per attempt: start-up, the bursts, shut-down.
    assert len(lines) < 15, [ln["message"] for ln in lines]


SECRETS = {
    "bearer": "bearer-5f1c9a0e-SECRET",
    "hmac": "hmac-0c8e77d2-SECRET",
    "hmacfile": "hmacfile-9d2b31aa-SECRET",
    "kafka": "kafka-a7e4c2b1-SECRET",
    "mqtt": "mqtt-3be8d940-SECRET",
}


def secret_sinks(tmp_path: Path, dead_port: int) -> list[dict[str, Any]]:
    """Every secret setting of every sink, each aimed at a port where nobody listens."""
    secret_file = tmp_path / "hmac.secret"
    secret_file.write_text(SECRETS["hmacfile"] + "\n")
    return [
        {
            "type": "webhook",
            "name": "hook",
            "url": f"http://127.0.0.1:{dead_port}/hook",
            "bearer_token": SECRETS["bearer"],
            "secret": SECRETS["hmac"],
        },
        {
            "type": "webhook",
            "name": "hook2",
            "url": f"http://127.0.0.1:{dead_port}/hook2",
            "secret_file": str(secret_file),
        },
        {
            "type": "kafka",
            "name": "kafka",
            "bootstrap_servers": [f"127.0.0.1:{dead_port}"],
            "sasl": {"mechanism": "PLAIN", "username": "relay", "password": SECRETS["kafka"]},
        },
        {
            "type": "mqtt",
            "name": "mqtt",
            "host": "127.0.0.1",
            "port": dead_port,
            "username": "relay",
            "password": SECRETS["mqtt"],
        },
    ]


def assert_no_secret(text: str, where: str) -> None:
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert not leaked, f"{where} shows the {leaked} secret(s):\n{text}"


async def test_secrets_never_logged(engine: PrivateEngine, tmp_path: Path) -> None:
    dead_port = free_port()
    sinks = secret_sinks(tmp_path, dead_port)
    env = relay_env(
        engine, tmp_path, free_port(), RELAY_SINKS=json.dumps(sinks), RELAY_LOG__LEVEL="DEBUG"
    )
    async with relay_process(env, tmp_path) as rp:
        await asyncio.to_thread(engine.cli, "volume", "create", f"ops-{uuid.uuid4().hex[:8]}")

        async def all_failing() -> bool:
            m = await scrape(rp.port)
            return all(
                (m.get("relay_events_retried_total", sink=s["name"]) or 0) >= 3
                or m.get("relay_outbox_depth", sink=s["name"])
                for s in sinks
            ) and all(f"sink {s['name']}" in rp.stderr() for s in sinks)

        await async_wait_for(all_failing, 30, message="every sink failing and saying so")
        status, body = await get(rp.port, "/readyz")
        assert status == 503
        assert_no_secret(body, "/readyz")
        assert_no_secret((await get(rp.port, "/metrics"))[1], "/metrics")
    stderr = rp.stderr()
    assert sum(1 for _ in stderr.splitlines()) > 10  # DEBUG really logs a lot
    assert any(line["level"] == "debug" for line in rp.log_lines())
    assert_no_secret(stderr, "the relay's stderr")
    assert_no_secret(rp.stdout(), "the relay's stdout")

    check = await asyncio.to_thread(check_config, env)
    assert check.returncode == 0, check.stderr
    assert "hook (webhook)" in check.stdout and "mqtt (mqtt)" in check.stdout
    assert_no_secret(check.stdout + check.stderr, "check-config")

    # A configuration error next to a secret names the setting, never the secret.
    bad = [dict(s) for s in sinks]
    bad[3]["port"] = "not-a-port"
    bad[0]["bearer_token"] = {"nested": SECRETS["bearer"]}
    check = await asyncio.to_thread(check_config, {**env, "RELAY_SINKS": json.dumps(bad)})
    assert check.returncode == 2
    assert "sinks[0].bearer_token" in check.stderr
    assert_no_secret(check.stdout + check.stderr, "check-config with an error")


def test_console_format_and_level(engine: PrivateEngine, tmp_path: Path) -> None:
    """The console format is for people: one readable line per record, no JSON; the level
    setting hides INFO."""

    async def run(level: str) -> str:
        env = relay_env(
            engine, tmp_path, free_port(), RELAY_LOG__FORMAT="console", RELAY_LOG__LEVEL=level
        )
        async with relay_process(env, tmp_path / level) as rp:
            pass
        return rp.stderr()

    (tmp_path / "INFO").mkdir()
    (tmp_path / "WARNING").mkdir()
    info = asyncio.run(run("INFO"))
    lines = info.splitlines()
    assert any(" INFO    relay.app: starting: engine " in ln for ln in lines), info
    for line in lines:
        assert not line.startswith("{")
    warning = asyncio.run(run("WARNING"))
    assert "INFO" not in warning


# -- the container image -----------------------------------------------------------------------

IMAGE = "docker-event-relay:test"


@pytest.fixture
def newest_engine(engines: EnginePool, requested_engines: list[EngineSpec]) -> PrivateEngine:
    """The image test needs one engine, not each: the newest requested."""
    spec = requested_engines[-1]
    require_engine(spec)
    return engines.get(spec)


@pytest.mark.skipif(
    os.environ.get("RELAY_TEST_IMAGE") == "0",
    reason="RELAY_TEST_IMAGE=0: the image build (about 3 min from scratch) is left out",
)
def test_container_image_relays_events_from_the_mounted_socket(
    newest_engine: PrivateEngine, tmp_path: Path
) -> None:
    """The image as a user runs it: socket mounted read-only, the socket's group added,
    read-only root, unprivileged; events on stdout, healthy, SIGTERM ends it cleanly."""
    engine = newest_engine
    build = subprocess.run(
        [str(REPO / "scripts" / "build-image.sh"), IMAGE],
        env=engine.env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    sock = engine.socket_path
    name = f"relay-{uuid.uuid4().hex[:8]}"
    engine.cli(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        f"{sock}:/var/run/docker.sock:ro",
        "--group-add",
        str(sock.stat().st_gid),
        "--health-interval",
        "1s",
        "--health-start-period",
        "1s",
        IMAGE,
    )
    try:
        wait_for(
            lambda: "connected" in engine.cli("logs", name).stderr,
            60,
            message="the relay connected to the engine",
        )
        volume = f"ops-{uuid.uuid4().hex[:8]}"
        engine.cli("volume", "create", volume)

        def relayed() -> list[dict[str, Any]]:
            out = engine.cli("logs", name).stdout
            return [e for e in map(json.loads, out.splitlines()) if e["subject"] == volume]

        (event,) = wait_for(relayed, 30, message="the event on the container's stdout")
        assert event["type"].endswith("volume.create")
        wait_for(
            lambda: (
                engine.cli("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
                == "healthy"
            ),
            60,
            message="HEALTHCHECK healthy",
        )
        top = engine.cli("top", name, "-o", "pid,user,args").stdout.splitlines()[1:]
        assert len(top) == 1 and "docker-event-relay run" in top[0]  # the relay alone, PID 1
        assert engine.cli("exec", name, "id", "-u").stdout.strip() == "10001"
        engine.cli("stop", "--time", "20", name)
        state = engine.cli("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert state == "0"
        assert "held in the spool for the next start" in engine.cli("logs", name).stderr
    finally:
        engine.cli("rm", "--force", name, check=False)
