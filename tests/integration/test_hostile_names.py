"""Hostile names from a real engine through every sink: networks named with a control
character, a newline, `$SYS` and MQTT's wildcards, created with the docker CLI (both engines
accept all four), sent with each sink's default names and binary mode to a real Mosquitto,
tansu and aiohttp receiver. Each arrives escaped exactly as relay/names.py says, the 20 events
created after each one arrive too, in order, and the relay stays ready all along: before
relay/names.py, the control character made Mosquitto drop the connection ("Malformed UTF-8")
and the relay resent the same batch forever."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay import plugins
from relay.app import Relay
from relay.router import RouteFilter
from relay.schema import Event
from relay.settings import Settings
from relay.sink import Sink
from sinks.mqtt import MqttSink
from sinks.stdout import StdoutSink
from tests.harness import Mosquitto, PrivateEngine, Tansu, async_wait_for
from tests.harness.receiver import Receiver
from tests.integration.test_kafka_sink import Record, consume, kafka_settings
from tests.integration.test_mqtt_sink import Subscriber
from tests.relay_harness import Recorder, relay_settings, running_relay
from tests.scenarios import create_volumes

pytestmark = pytest.mark.integration

# Each hostile network name (a run tag is appended) and what it must become, written out here
# rather than computed with relay/names.py: (MQTT topic level, MQTT user property and Kafka
# header or key, HTTP header, Kafka topic part).
HOSTILE: dict[str, tuple[str, str, str, str]] = {
    "ctl\x01name": ("ctl%01name", "ctl%01name", "ctl%01name", "ctl_name"),
    "new\nline": ("new%0Aline", "new%0Aline", "new%0Aline", "new_line"),
    "$SYS": ("%24SYS", "$SYS", "$SYS", "_SYS"),
    "+/#": ("___", "+/#", "+/#", "___"),
}
AFTER = 20  # events created after each hostile one
HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0}


@dataclass
class Run:
    """One scenario on the engine: what was created, and the relay's own record of it."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    networks: dict[str, str] = field(default_factory=dict)  # hostile name -> network id
    volumes: list[str] = field(default_factory=list)
    recorder: Recorder = field(default_factory=Recorder)

    def name(self, base: str) -> str:
        return f"{base}-{self.tag}"

    def escaped(self, base: str, column: int) -> str:
        return f"{HOSTILE[base][column]}-{self.tag}"

    def ours(self, subject: str | None) -> bool:
        return subject is not None and self.tag in subject

    def read(self) -> list[Event]:
        """Our creations, in the order the relay read them from the engine."""
        return [
            e
            for e in self.recorder.events
            if e.ce.data.action == "create" and self.ours(e.ce.subject)
        ]

    def read_ids(self) -> list[str]:
        return [e.id for e in self.read()]

    def hostile_event(self, base: str) -> Event:
        return next(e for e in self.read() if e.ce.subject == self.name(base))

    def create(self, engine: PrivateEngine) -> None:
        """Each hostile network, then AFTER volumes: 4 * (1 + 20) creations."""
        for n, base in enumerate(HOSTILE):
            created = engine.cli("network", "create", self.name(base))
            self.networks[self.name(base)] = created.stdout.strip()
            names = [f"hn-{self.tag}-{n}-{i:02d}" for i in range(AFTER)]
            create_volumes(engine, names, self.tag)
            self.volumes += names

    def clean(self, engine: PrivateEngine) -> None:
        # Every network is a bridge on the host, from an address pool all engines here
        # share: leaving them would exhaust it for every later test.
        if self.networks:
            engine.cli("network", "rm", *self.networks.values(), check=False)
        if self.volumes:
            engine.cli("volume", "rm", *self.volumes, check=False)


async def readyz(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status, await response.text()


@contextlib.asynccontextmanager
async def scenario(
    engine: PrivateEngine, settings: Settings, run: Run, *extra: tuple[Sink, RouteFilter]
) -> AsyncIterator[tuple[Relay, list[str]]]:
    """The relay with its configured sinks, `extra` ones and `run`'s recorder, ready; the
    scenario created and read by the relay; yields the relay and every /readyz answer that was
    not 200, sampled from the start to the end of the body."""
    sinks = [*plugins.build_sinks(settings), *extra, (run.recorder, RouteFilter())]
    not_ready: list[str] = []
    try:
        async with running_relay(settings, sinks) as relay:
            assert relay.http is not None and relay.http.bound_port
            port = relay.http.bound_port

            async def ready() -> bool:
                status, _ = await readyz(port)
                return status == 200

            await async_wait_for(ready, 30, message="/readyz answering 200 before the names")
            done = asyncio.Event()

            async def sample() -> None:
                # Sampling readiness while the sinks work, not waiting for anything.
                while not done.is_set():
                    status, body = await readyz(port)
                    if status != 200:
                        not_ready.append(body)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.05)

            sampler = asyncio.create_task(sample())
            try:
                await asyncio.to_thread(run.create, engine)
                await async_wait_for(
                    lambda: len(run.read()) == len(HOSTILE) * (1 + AFTER),
                    60,
                    message="the relay read every creation",
                )
                yield relay, not_ready
                status, body = await readyz(port)
                assert status == 200, body
            finally:
                done.set()
                await sampler
    finally:
        await asyncio.to_thread(run.clean, engine)


def metric(relay: Relay, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


def assert_clean_delivery(
    relay: Relay, settings: Settings, not_ready: list[str], *sinks: str
) -> None:
    """Nothing retried, nothing dead-lettered, never not ready."""
    assert not_ready == []
    for sink in sinks:
        assert metric(relay, "relay_events_retried_total", sink=sink) == 0, sink
    path = settings.dead_letter_file
    assert not path.exists() or path.read_text() == ""


# -- MQTT --------------------------------------------------------------------------------------


@dataclass
class Message:
    topic: str
    user: dict[str, str]  # MQTT 5 user properties
    payload: bytes

    @property
    def levels(self) -> int:
        return self.topic.count("/") + 1


async def test_mqtt(engine: PrivateEngine, mosquitto_fresh: Mosquitto, tmp_path: Path) -> None:
    run = Run()
    # A broker of this test's own: the default topics (docker/...) are ours alone.
    sub = Subscriber(mosquitto_fresh.port, "docker/#")
    mqtt: dict[str, Any] = {"type": "mqtt", "host": "127.0.0.1", "port": mosquitto_fresh.port}
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        http=HTTP,
        sinks=[
            mqtt,  # every default: topic docker/{engine_name}/{type}/{action}, MQTT 5 binary
            {
                **mqtt,
                "name": "mqtt-names",
                "topic": "docker/{engine_name}/{type}/{action}/{actor_name}",
                "status_topic": "",
                "filter": {"types": ["network"]},
            },
        ],
    )
    try:
        async with scenario(engine, settings, run) as (relay, not_ready):
            expected = run.read_ids()

            def delivered() -> list[Message]:
                messages = (
                    Message(r.topic, dict(r.user_properties), r.payload)
                    for r in sub.snapshot()
                    if not r.topic.endswith("/status")
                )
                return [m for m in messages if run.ours(m.user.get("subject"))]

            await async_wait_for(
                lambda: [m.user["id"] for m in delivered() if m.levels == 4] == expected,
                60,
                message="every creation at the default topics, in order",
            )
            await async_wait_for(
                lambda: sum(m.levels == 5 for m in delivered()) == len(HOSTILE),
                30,
                message="the network creations at the topics with the network name",
            )
            assert_clean_delivery(relay, settings, not_ready, "mqtt", "mqtt-names")
            # Mosquitto never dropped the connection over a malformed string.
            connects = [w.sink.connects for w in relay.workers if isinstance(w.sink, MqttSink)]
            assert connects == [1, 1]
    finally:
        sub.close()

    messages = delivered()
    engine_name = run.read()[0].ce.data.engine.name
    for base in HOSTILE:
        event = run.hostile_event(base)
        ours = [m for m in messages if m.user["id"] == event.id]
        by_levels = {m.levels: m for m in ours}
        assert len(ours) == 2 and set(by_levels) == {4, 5}
        assert by_levels[4].topic == f"docker/{engine_name}/network/create"
        assert by_levels[5].topic == f"docker/{engine_name}/network/create/{run.escaped(base, 0)}"
        for m in ours:
            assert m.user["subject"] == run.escaped(base, 1)
            assert json.loads(m.payload)["actor"]["name"] == run.name(base)


# -- Kafka -------------------------------------------------------------------------------------


async def test_kafka(engine: PrivateEngine, tansu_fresh: Tansu, tmp_path: Path) -> None:
    run = Run()
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        http=HTTP,
        sinks=[
            # Defaults (topic docker-events: no event field in it; binary mode) but for
            # idempotence, which tansu cannot do (DESIGN.md section 5).
            kafka_settings(tansu_fresh.bootstrap),
            kafka_settings(
                tansu_fresh.bootstrap,
                name="kafka-names",
                topic="docker.{actor_name}",
                filter={"types": ["network"]},
            ),
        ],
    )
    topics = {base: "docker." + run.escaped(base, 3) for base in HOSTILE}
    async with scenario(engine, settings, run) as (relay, not_ready):
        expected = run.read_ids()
        records = await consume(
            tansu_fresh.bootstrap,
            ["docker-events"],
            lambda rs: {r.id for r in rs} >= set(expected),
            timeout=60,
        )
        named = await consume(
            tansu_fresh.bootstrap,
            list(topics.values()),
            lambda rs: len(rs) >= len(HOSTILE),
            timeout=60,
        )
        assert_clean_delivery(relay, settings, not_ready, "kafka", "kafka-names")

    records = [r for r in records if r.id in set(expected)]
    assert sorted(r.id for r in records) == sorted(expected)  # each once
    # Kafka orders within a partition (the default key: one actor, one partition): each
    # partition holds our events in the engine's order.
    order = {event_id: n for n, event_id in enumerate(expected)}
    for partition in {r.partition for r in records}:
        mine = sorted((r for r in records if r.partition == partition), key=lambda r: r.offset)
        assert [order[r.id] for r in mine] == sorted(order[r.id] for r in mine)
    by_id: dict[str, list[Record]] = {}
    for r in [*records, *named]:
        by_id.setdefault(r.id, []).append(r)
    for base in HOSTILE:
        event = run.hostile_event(base)
        default, in_named = by_id[event.id]
        assert default.topic == "docker-events"
        assert in_named.topic == topics[base]
        for r in (default, in_named):
            assert r.headers["ce_subject"] == run.escaped(base, 1).encode()
            assert json.loads(r.value)["actor"]["name"] == run.name(base)
            assert r.key == f"{event.ce.data.engine.id}/{event.ce.data.actor.id}".encode()


# -- webhook and stdout ------------------------------------------------------------------------


def received(receiver: Receiver, run: Run) -> list[Any]:
    return [r for r in receiver.delivered() if run.ours(r.headers.get("ce-subject"))]


def lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines written so far, each one JSON document."""
    text = path.read_bytes().decode()
    return [json.loads(line) for line in text.split("\n")[:-1]]


async def test_webhook_and_stdout(engine: PrivateEngine, tmp_path: Path) -> None:
    run = Run()
    out = tmp_path / "stdout.jsonl"
    async with Receiver() as receiver:
        settings = relay_settings(
            engine.docker_host,
            tmp_path / "state",
            http=HTTP,
            sinks=[{"type": "webhook", "url": receiver.url()}],  # binary, one at a time
        )
        with out.open("wb") as stream:
            stdout = (StdoutSink("stdout", 500, stream=stream), RouteFilter())
            async with scenario(engine, settings, run, stdout) as (relay, not_ready):
                expected = run.read_ids()
                await async_wait_for(
                    lambda: [r.headers["ce-id"] for r in received(receiver, run)] == expected,
                    60,
                    message="every creation at the receiver, in order",
                )
                await async_wait_for(
                    lambda: [e["id"] for e in lines(out) if run.ours(e.get("subject"))] == expected,
                    60,
                    message="every creation on stdout, in order",
                )
                assert_clean_delivery(relay, settings, not_ready, "webhook", "stdout")

    requests = {r.headers["ce-id"]: r for r in received(receiver, run)}
    written = {e["id"]: e for e in lines(out)}
    # One line per event: a newline in a name is JSON-escaped, never a line break.
    assert len(written) == len(lines(out)) == len(run.recorder.events)
    for base in HOSTILE:
        event = run.hostile_event(base)
        request = requests[event.id]
        assert request.headers["ce-subject"] == run.escaped(base, 2)
        assert json.loads(request.body)["actor"]["name"] == run.name(base)
        assert written[event.id]["subject"] == run.name(base)
        assert written[event.id]["data"]["actor"]["name"] == run.name(base)
