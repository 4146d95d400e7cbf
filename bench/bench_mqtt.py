"""MQTT sink figures against a real Mosquitto.

    cd /work/main && .venv/bin/python bench/bench_mqtt.py [--events N] [--runs R]
        [--rate 500] [--seconds 10] [--no-latency]

1. Throughput at QoS 1: N recorded events through the relay's outbox worker (SinkWorker) and
   MqttSink (binary mode, max_batch 100, max_inflight 100) until every PUBACK is in, against a
   plain paho-mqtt loop (its own network thread, same max_inflight) publishing the same topics,
   payloads and user properties, encoded before its clock starts. Median of R runs each, and
   the ratio relay/paho.
2. Latency: a real private engine (Debian's dockerd) creating volumes at --rate events/s
   through its API for --seconds; a paho subscriber takes engine `timeNano` -> arrival time
   (same host clock), p50/p99 over all events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.load import paced_volume_creates
from bench.worker import delivered, delivery_path, feed
from relay.schema import Event
from relay.sink import SinkContext
from sinks.mqtt import MqttSinkConfig, topic_template
from tests.contract import sample_events
from tests.harness import Mosquitto

TOPIC = "bench/{engine_name}/{type}/{action}"


async def relay_run(port: int, events: list[Event], workdir: Path) -> float:
    sink = MqttSinkConfig(
        host="127.0.0.1",
        port=port,
        topic=TOPIC,
        client_id="bench-relay",
        status_topic="bench/status",
    ).build(SinkContext("bench"))
    await sink.start()
    async with delivery_path(sink, workdir) as worker:
        start = time.perf_counter()
        feed(worker, events)
        await delivered(worker, len(events))
        elapsed = time.perf_counter() - start
    await sink.aclose()
    return len(events) / elapsed


def paho_run(port: int, events: list[Event]) -> float:
    messages = []
    for event in events:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/json"
        props.UserProperty = list(event.attributes().items())
        messages.append((topic_template(TOPIC).render(event), event.data_json(), props))
    acked = threading.Event()
    count = [0]

    def on_publish(*_: object) -> None:
        count[0] += 1
        if count[0] == len(messages):
            acked.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.perf_counter()
    for topic, payload, props in messages:
        client.publish(topic, payload, qos=1, properties=props)
    if not acked.wait(120):
        raise RuntimeError(f"paho baseline: only {count[0]} of {len(messages)} acknowledged")
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return len(messages) / elapsed


async def latency(port: int, rate: float, seconds: float, workdir: Path) -> list[float]:

    from relay.router import RouteFilter
    from tests.harness import PrivateEngine
    from tests.relay_harness import relay_settings, running_relay

    engine = PrivateEngine("20.10", "/usr/sbin/dockerd", tempfile.mkdtemp(prefix="/tmp/bm"))
    engine.start()
    arrivals: list[float] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/volume/create"):
            now = time.time_ns()
            arrivals.append((now - json.loads(msg.payload)["time_nano"]) / 1e6)

    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("lat/#", qos=1)
    sub.loop_start()
    total = int(rate * seconds)
    try:
        sink = MqttSinkConfig(
            host="127.0.0.1",
            port=port,
            client_id="bench-lat",
            topic="lat/{type}/{action}",
            status_topic="lat/status",
        ).build(SinkContext("bench"))
        settings = relay_settings(engine.docker_host, workdir / "state")
        async with running_relay(settings, sinks=[(sink, RouteFilter())]):
            achieved = await paced_volume_creates(engine.socket_path, rate, total, "lat")
            deadline = time.monotonic() + 60
            while len(arrivals) < total and time.monotonic() < deadline:  # noqa: ASYNC110 (paho thread fills it)
                await asyncio.sleep(0.1)
        print(
            f"latency run: {total} volume creates at {achieved:.0f}/s achieved, "
            f"{len(arrivals)} arrived"
        )
    finally:
        sub.loop_stop()
        engine.stop()
    return arrivals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    try:
        relay_rates, paho_rates = [], []
        for run in range(args.runs):
            events = sample_events(args.events)
            for e in events:  # encode once, like the relay does before any sink sees them
                e.data_json()
            paho_rates.append(paho_run(broker.port, events))
            relay_rates.append(asyncio.run(relay_run(broker.port, events, work)))
            print(f"run {run + 1}: relay {relay_rates[-1]:,.0f}/s  paho {paho_rates[-1]:,.0f}/s")
        r, p = statistics.median(relay_rates), statistics.median(paho_rates)
        ratios = [a / b for a, b in zip(relay_rates, paho_rates, strict=True)]
        print(
            f"QoS 1 throughput, {args.events} events, median of {args.runs}: relay+sink "
            f"{r:,.0f} events/s, plain paho {p:,.0f} events/s, ratio {r / p:.2f} "
            f"(per-run ratios {', '.join(f'{x:.2f}' for x in ratios)})"
        )
        if not args.no_latency:
            lat = sorted(asyncio.run(latency(broker.port, args.rate, args.seconds, work)))
            if lat:
                p50 = lat[len(lat) // 2]
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                print(
                    f"engine->subscriber latency at {args.rate:.0f} events/s: "
                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms "
                    f"({len(lat)} events)"
                )
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
