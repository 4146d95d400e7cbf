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

from tests.harness import (
    DelayProxy,
    EnginePool,
    EngineSpec,
    Mosquitto,
    PrivateEngine,
    Tansu,
    async_wait_for,
)

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


async def test_tansu_on_s3_keeps_records_across_a_restart(tansu_s3_fresh: Tansu) -> None:
    # Why restart tests use this tansu: in memory a restarted tansu has no topics, yet still
    # acknowledges records sent to them, which then vanish (DESIGN.md section 5).
    broker = tansu_s3_fresh
    topic = f"harness-{uuid.uuid4().hex[:12]}"
    keys = [f"key-{n}".encode() for n in range(4)]
    sent = [(keys[n % 4], f"record-{n:03d}".encode()) for n in range(200)]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        acks = [await producer.send(topic, value, key=key) for key, value in sent]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()

    broker.restart()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    received: list[tuple[bytes | None, bytes | None, int, int]] = []
    try:

        async def fetched() -> bool:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                received.extend((m.key, m.value, m.partition, m.offset) for m in messages)
            return len(received) >= len(sent)

        await async_wait_for(fetched, 60, interval=0, message="200 records after the restart")
    finally:
        await consumer.stop()
    assert sorted((key, value) for key, value, _, _ in received) == sorted(sent)
    # Each key's records kept their order within its partition.
    for key in keys:
        mine = sorted((p, o, v) for k, v, p, o in received if k == key)
        assert [v for _, _, v in mine] == [v for k, v in sent if k == key]
        assert len({p for p, _, _ in mine}) == 1


async def test_delay_proxy_adds_latency_both_ways_and_keeps_order() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    delay = 0.15
    loop = asyncio.get_running_loop()
    async with server:
        with DelayProxy(port, delay) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            began = loop.time()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            # One delay there and one back: a lower bound only, which no load can break.
            assert loop.time() - began >= 2 * delay
            chunks = [f"chunk-{n:03d};".encode() for n in range(100)]
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            echoed = await reader.read()  # to the end: the half-close went through too
            writer.close()
    assert echoed == b"".join(chunks)
    assert proxy.connections == 1


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
