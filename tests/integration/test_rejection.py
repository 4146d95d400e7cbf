"""A destination that refuses one message: only that message is dead-lettered, the sink goes on.

Against a real Mosquitto and a real tansu, with events from a real engine and the relay's
default retry settings. The refusals are the real ones:

- Mosquitto with `max_packet_size` drops the connection of a client that sends a bigger packet
  (MQTT 5: a DISCONNECT 0x95 Packet too large; MQTT 3.1.1: the socket just closes); with
  `message_size_limit` it answers PUBACK 0x95, which paho takes for a malformed packet and
  drops the connection itself;
- tansu with a JSON schema for a topic (its embedded schema registry) refuses a record that
  does not conform with INVALID_RECORD, for the whole batch of records it came in.

The big event is made to travel in a batch with others (the broker is paused while the engine
writes them, as a broker stalled by a long pause would be), so that the relay must find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import PartialDeliveryError, RejectedSinkError, SinkError
from relay.schema import Event
from sinks.mqtt import MqttSink
from tests.contract import rebuilt, sample_events
from tests.harness import BrokerProcess, Mosquitto, PrivateEngine, Tansu, async_wait_for
from tests.integration.test_kafka_sink import consume, kafka_settings
from tests.integration.test_mqtt_sink import Subscriber, mqtt_sink
from tests.relay_harness import relay_settings, running_relay, started

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LABEL = "com.example.rejection-test"
# The broker's limit, and a label that takes one event well over it; every other event of the
# test is under 2 KiB.
LIMIT = 16 * 1024
BIG = "y" * (2 * LIMIT)
ORDINARY = 20


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def paused(broker: BrokerProcess) -> Iterator[None]:
    """The broker stopped (SIGSTOP) and continued on exit: a stalled broker keeps its
    connections and answers nothing, so what the relay reads meanwhile queues in its outbox."""
    proc = broker._proc
    assert proc is not None and proc.poll() is None, f"{broker!r} is not running"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def create_containers(
    engine: PrivateEngine, run: str, big_at: int, blob: str = BIG
) -> tuple[list[str], str]:
    """ORDINARY containers labelled for this run, and one more with the label `blob` at
    position `big_at`: the ordinary names in creation order, and the big one's."""
    ordinary = [f"{run}-{i:02d}" for i in range(ORDINARY)]
    big = f"{run}-big"
    names = [*ordinary[:big_at], big, *ordinary[big_at:]]
    for name in names:
        labels = ["--label", f"{LABEL}={run}"]
        if name == big:
            labels += ["--label", f"blob={blob}"]
        engine.cli("create", "--name", name, *labels, "--network", "none", "busybox:latest", "true")
    return ordinary, big


def dead_letter_list(state: Path) -> list[dict[str, Any]]:
    """`docker-event-relay dead-letter list --json`, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "dead-letter", "list", "--json"],
        cwd=REPO,
        env={"RELAY_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def isolated(caplog: pytest.LogCaptureFixture) -> list[int]:
    """How many events each isolation the relay logged began with."""
    found = (
        re.search(r"dropped (\d+) event\(s\) in flight", r.getMessage()) for r in caplog.records
    )
    return [int(m.group(1)) for m in found if m]


# -- MQTT: through the relay ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "limit"),
    [("5", "max_packet_size"), ("5", "message_size_limit"), ("3.1.1", "max_packet_size")],
)
async def test_mqtt_one_event_over_the_brokers_limit_is_dead_lettered_alone(
    engine: PrivateEngine,
    mosquitto_factory: Callable[..., Mosquitto],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    limit: str,
) -> None:
    broker = mosquitto_factory(f"{limit} {LIMIT}\n")
    run = unique("rj")
    root = unique("t")
    sub = Subscriber(broker.port, f"{root}/#", protocol=protocol)
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[
            {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": broker.port,
                "topic": root + "/{type}/{action}",
                "status_topic": root + "/{relay_id}/status",
                "protocol": protocol,
                "filter": {"labels": {LABEL: run}},
            }
        ],
    )
    caplog.set_level(logging.INFO)
    try:
        async with running_relay(settings) as relay:
            worker = relay.workers[0]
            await async_wait_for(lambda: relay.readiness()[0], 30, message="relay ready")
            with paused(broker):
                ordinary, big = await asyncio.to_thread(create_containers, engine, run, 10)
                # All read, none finished: the first is in flight, the rest wait behind it.
                await async_wait_for(
                    lambda: worker.held_events == ORDINARY + 1, 60, message="all 21 read"
                )

            def subjects() -> list[str]:
                return [e["subject"] for e in sub.events() if e["subject"].startswith(run)]

            await async_wait_for(
                lambda: set(subjects()) == set(ordinary) and relay.dead_letter.count == 1,
                120,
                message="the 20 delivered and the big one dead-lettered",
            )
            await async_wait_for(lambda: relay.readiness()[0], 30, message="ready again")
            permanent = relay.metrics.registry.get_sample_value(
                "relay_events_dead_lettered_total", {"sink": "mqtt", "reason": "permanent"}
            )
            assert permanent == 1
            assert worker.held_events == 0
    finally:
        sub.close()

    # In engine order, each at least once (one that arrived before the broker dropped the
    # connection, its PUBACK unread, is sent again).
    got = subjects()
    assert list(dict.fromkeys(got)) == ordinary, got
    assert big not in got
    # The big one travelled in a batch with others; the relay had to look for it.
    assert max(isolated(caplog), default=0) > 1, caplog.text
    (letter,) = dead_letter_list(tmp_path)
    assert (letter["event"]["subject"], letter["reason"], letter["sink"]) == (
        big,
        "permanent",
        "mqtt",
    )
    assert letter["event"]["data"]["actor"]["labels"]["blob"] == BIG
    assert "rejected by the destination when sent alone (2 times" in letter["error"]
    assert "with the message in flight" in letter["error"]


# -- MQTT: the sink itself -----------------------------------------------------------------------


def _oversized(event: Event) -> Event:
    return rebuilt(event, {"blob": BIG})


async def failures_of(sink: MqttSink, batch: list[Event]) -> dict[int, SinkError]:
    """The failed events of one send, by index; the send must fail."""
    try:
        await sink.send(batch)
    except PartialDeliveryError as exc:
        return exc.failures
    except SinkError as exc:
        return dict.fromkeys(range(len(batch)), exc)
    raise AssertionError("the broker took a packet over its limit")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_mqtt_a_refused_message_is_not_resent_by_paho_after_the_reconnect(
    mosquitto_factory: Callable[..., Mosquitto], protocol: str
) -> None:
    broker = mosquitto_factory(f"max_packet_size {LIMIT}\n")
    root = unique("t")
    sub = Subscriber(broker.port, f"{root}/#", protocol=protocol)
    sink = mqtt_sink(
        broker.port,
        topic=root + "/{type}/{action}",
        status_topic=root + "/status",
        protocol=protocol,
    )
    batch = sample_events(6)
    batch[2] = _oversized(batch[2])
    good = [e for i, e in enumerate(batch) if i != 2]
    try:
        async with started(sink):
            failed = await failures_of(sink, batch)
            # In flight when the broker dropped the connection: suspects, to be sent again one
            # at a time (those before the big one were acknowledged, unless the drop swallowed
            # their PUBACKs).
            assert {2, 3, 4, 5} <= set(failed), failed
            assert all(isinstance(e, RejectedSinkError) for e in failed.values()), failed
            # What the outbox does next: the others again, without the refused one. paho kept
            # no copy of the refused message to re-send by itself on the new connection (the
            # broker would drop that one too, and this send would fail).
            await sink.send([batch[i] for i in sorted(failed) if i != 2])
            await sink.send(sample_events(1))
            assert sink.connects == 2
            await async_wait_for(
                lambda: {e.id for e in good} <= set(sub.ids()), 30, message="the good ones"
            )
    finally:
        sub.close()
    assert batch[2].id not in sub.ids()
    assert list(dict.fromkeys(i for i in sub.ids() if i in {e.id for e in good})) == [
        e.id for e in good
    ]


# -- Kafka: tansu refusing one record ------------------------------------------------------------


# The longest label value the Kafka test's topic schema admits: small enough that the refused
# record shares the producer's batch (16 KiB) with others.
KAFKA_LABEL_MAX = 1024


class ValidatingTansu(Tansu):
    """tansu validating the records of a topic against `WORKDIR/schemas/<topic>.json` (its
    embedded schema registry): a record that does not conform is refused with INVALID_RECORD."""

    @property
    def schemas(self) -> Path:
        return self.workdir / "schemas"

    def command(self) -> list[str]:
        # tansu reads a file:// registry relative to its working directory, whatever the URL
        # says (`file:///abs` included): run it in its own.
        return [
            "env",
            "--chdir",
            str(self.workdir),
            *super().command(),
            "--schema-registry",
            "file://./schemas",
        ]


def label_schema(max_length: int) -> dict[str, Any]:
    """Records whose `data.actor.labels` values are at most `max_length` characters (binary
    mode: the record value is the event's data)."""
    labels = {"type": "object", "additionalProperties": {"type": "string", "maxLength": max_length}}
    actor = {"type": "object", "properties": {"labels": labels}}
    data = {"type": "object", "properties": {"actor": actor}}
    return {"type": "object", "properties": {"value": data}}


@pytest.fixture
def validating_tansu(tmp_path: Path) -> Iterator[tuple[ValidatingTansu, str]]:
    topic = unique("guarded")
    broker = ValidatingTansu(tmp_path / "tansu")
    broker.schemas.mkdir(parents=True)
    (broker.schemas / f"{topic}.json").write_text(json.dumps(label_schema(KAFKA_LABEL_MAX)))
    with broker:
        yield broker, topic


async def test_kafka_one_record_the_broker_refuses_is_dead_lettered_alone(
    engine: PrivateEngine,
    validating_tansu: tuple[ValidatingTansu, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, topic = validating_tansu
    run = unique("rk")
    state = tmp_path / "state"
    settings = relay_settings(
        engine.docker_host,
        state,
        sinks=[
            kafka_settings(
                broker.bootstrap,
                topic=topic,
                # One partition for all, so that arrival order is engine order, and the broker
                # answers for all the records of a send at once.
                key="one",
                filter={"labels": {LABEL: run}},
            )
        ],
    )
    caplog.set_level(logging.INFO)
    async with running_relay(settings) as relay:
        worker = relay.workers[0]
        await async_wait_for(lambda: relay.readiness()[0], 30, message="relay ready")
        with paused(broker):
            ordinary, big = await asyncio.to_thread(
                create_containers, engine, run, 10, "z" * (2 * KAFKA_LABEL_MAX)
            )
            await async_wait_for(
                lambda: worker.held_events == ORDINARY + 1, 60, message="all 21 read"
            )
        await async_wait_for(
            lambda: relay.dead_letter.count == 1 and worker.held_events == 0,
            120,
            message="the 20 delivered and the big one dead-lettered",
        )
        records = await consume(broker.bootstrap, [topic], lambda rs: len(rs) >= ORDINARY)
        await async_wait_for(lambda: relay.readiness()[0], 30, message="ready again")

    names = [r.structured["data"]["actor"]["name"] for r in records]
    # Each once: the broker wrote none of the batch it refused. Not in engine order: the
    # producer split the 20 into batches of `batch_bytes`, the broker took the batch after the
    # refused one, and the refused one's good records come after it, sent again one at a time
    # (in their order).
    assert sorted(names) == ordinary and len(names) == ORDINARY, names
    # The producer put the refused record in one batch with others, and the broker refused
    # them all: the relay had to look for it.
    assert max(isolated(caplog), default=0) > 1, caplog.text
    (letter,) = dead_letter_list(state)
    assert (letter["event"]["subject"], letter["reason"], letter["sink"]) == (
        big,
        "permanent",
        "kafka",
    )
    assert "rejected by the destination when sent alone (2 times" in letter["error"]
    assert "INVALID_RECORD" in letter["error"] or "InvalidRecordError" in letter["error"]
