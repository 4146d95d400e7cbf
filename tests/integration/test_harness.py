"""The harness itself works: real engines, tansu and Mosquitto start, answer and restart."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from aiokafka import (  # type: ignore[import-untyped]  # aiokafka ships no type hints
    AIOKafkaConsumer,
    AIOKafkaProducer,
)
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import EnginePool, EngineSpec, Mosquitto, PrivateEngine, Tansu

pytestmark = pytest.mark.integration

EXPECTED_API = {"20.10": "1.41", "28.5": "1.51"}


def test_engine_runs_a_container(engine: PrivateEngine) -> None:
    out = engine.cli("run", "--rm", "--network", "none", "busybox:latest", "sh", "-c", "echo hi")
    assert out.stdout == "hi\n"


def test_engine_version(engine: PrivateEngine) -> None:
    assert engine.version.startswith(f"{engine.name}.")
    assert engine.api_version == EXPECTED_API[engine.name]


def test_engines_run_side_by_side_with_own_containerd(
    engines: EnginePool, requested_engines: list[EngineSpec], engine: PrivateEngine
) -> None:
    # `engine` started this parameter's engine; start every other requested one as well
    # and check that each supervises a containerd of its own.
    running = [engines.get(spec) for spec in requested_engines]
    containerd_pids = set()
    for each in running:
        assert each.cli("info", "--format", "{{.ID}}").stdout.strip()
        pid_file = each.workdir / "exec" / "containerd" / "containerd.pid"
        pid = int(pid_file.read_text())
        assert Path(f"/proc/{pid}").exists(), f"containerd of {each.name} is not running"
        containerd_pids.add(pid)
    assert len(containerd_pids) == len(running)


def test_engine_restart_keeps_socket_and_state(engine_fresh: PrivateEngine) -> None:
    host = engine_fresh.docker_host
    old_pid = engine_fresh.pid
    engine_fresh.cli("create", "--name", "survivor", "--network", "none", "busybox:latest", "true")

    engine_fresh.restart()

    assert engine_fresh.docker_host == host
    assert engine_fresh.pid is not None and engine_fresh.pid != old_pid
    names = engine_fresh.cli("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert names == ["survivor"]
    out = engine_fresh.cli("start", "-a", "survivor")
    assert out.returncode == 0
    out = engine_fresh.cli("run", "--rm", "--network", "none", "busybox:latest", "echo", "again")
    assert out.stdout == "again\n"


async def _kafka_round_trip(bootstrap: str, count: int = 5) -> list[bytes]:
    topic = f"harness-{uuid.uuid4().hex[:12]}"
    sent = [f"message-{i}".encode() for i in range(count)]
    # tansu's memory storage cannot do InitProducerId, hence no idempotence (DESIGN.md §5).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for value in sent:
            # One key: one partition, so the consumer must see them in this order.
            await producer.send_and_wait(topic, value, key=b"harness")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    received: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(received) < count:
                message = await consumer.getone()
                assert message.value is not None
                received.append(message.value)
    finally:
        await consumer.stop()
    assert received == sent
    return received


async def test_tansu_produce_consume(tansu: Tansu) -> None:
    assert len(await _kafka_round_trip(tansu.bootstrap)) == 5


async def test_tansu_restart_same_port(tansu_fresh: Tansu) -> None:
    port = tansu_fresh.port
    await _kafka_round_trip(tansu_fresh.bootstrap)
    tansu_fresh.restart()
    assert tansu_fresh.port == port
    await _kafka_round_trip(tansu_fresh.bootstrap)


def _mqtt_round_trip(broker: Mosquitto) -> tuple[str, bytes]:
    topic = f"harness/{uuid.uuid4().hex[:12]}"
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    connected = threading.Event()
    subscribed = threading.Event()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2)
    sub.on_connect = lambda client, userdata, flags, reason, props: connected.set()
    sub.on_subscribe = lambda client, userdata, mid, reasons, props: subscribed.set()
    sub.on_message = lambda client, userdata, msg: received.put((msg.topic, bytes(msg.payload)))
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    try:
        assert connected.wait(10), "subscriber did not connect"
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        info = pub.publish(topic, b"hello", qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
        return received.get(timeout=10)
    finally:
        # disconnect() first: the network thread then leaves its select() at once, whereas
        # loop_stop() on a connected client waits out the select timeout.
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()


def test_mosquitto_publish_subscribe(mosquitto: Mosquitto) -> None:
    topic, payload = _mqtt_round_trip(mosquitto)
    assert topic.startswith("harness/")
    assert payload == b"hello"


def test_mosquitto_restart_same_port(mosquitto_fresh: Mosquitto) -> None:
    port = mosquitto_fresh.port
    assert _mqtt_round_trip(mosquitto_fresh)[1] == b"hello"
    mosquitto_fresh.restart()
    assert mosquitto_fresh.port == port
    assert _mqtt_round_trip(mosquitto_fresh)[1] == b"hello"
