"""MQTT transport figures: the current MqttSink against an aiomqtt-based publisher and plain paho.

    cd /work/main && .venv/bin/python bench/bench_mqtt_aiomqtt.py [--events N] [--runs R]
        [--variants KEY,KEY,...] [--no-check] [--rss-reps 7]

Against a real Mosquitto (tests.harness.Mosquitto), QoS 1, MQTT 5 binary mode (payload = `data`,
Content Type + one user property per context attribute), the topics of bench_mqtt.py, max 100
in flight; events/s until every PUBACK is in. Each run draws fresh recorded events
(tests.contract.sample_events), encodes their payloads once (as the relay does before any sink
sees them) and hands the same list to every variant, in an order rotated from run to run:

- paho: bench_mqtt.paho_run, the plain paho loop with its own network thread; topics and
  `Properties` built before its clock starts. Every ratio is against this variant in the same run.
- sink: MqttSink built as bench_mqtt.relay_run builds it, `await sink.send(batch)` per batch of 100
  (what SinkWorker does, without the outbox around it).
- aio-*: an aiomqtt-based sink's publish path: `aiomqtt.Client` (MQTT 5, max_inflight_messages
  100) as async context manager, per batch of 100 the topics rendered and properties built, then
  `asyncio.gather` of `client.publish(topic, payload, qos=1, properties=...)`. Properties are
  either paho's `Properties` (`props`) or `sinks.mqtt.PackedProperties` (`packed`). Socket:
  nothing set; `nd` = TCP_NODELAY through aiomqtt's public `socket_options`; `qa1` = TCP_NODELAY
  and TCP_QUICKACK through `socket_options` (set once, after connect); `qa` = TCP_NODELAY and
  TCP_QUICKACK set again after every read, as MqttSink does, which needs aiomqtt's reader
  replaced through its private `_client` (paho) and `_disconnected` attributes.

Before the timed runs a check pass sends the same 40 events through every variant to a
subscriber and compares what arrived (topic, payload, content type, user properties).

Import cost: VmRSS (/proc/self/status) and wall time of `import aiomqtt` in fresh interpreters,
bare and on top of what the relay with an MQTT sink has loaded anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.bench_mqtt import TOPIC, paho_run
from relay.schema import Event
from relay.sink import SinkContext
from sinks.mqtt import MqttSinkConfig, PackedProperties, topic_template
from tests.contract import sample_events
from tests.harness import Mosquitto

BATCH = 100
INFLIGHT = 100
CHECK_EVENTS = 40
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
# CPU time of this process per event during the last timed publish loop (the asyncio variants
# only: the paho loop's clock starts after its setup, its process time would not).
_cpu_us: list[float] = [float("nan")]


# -- the current sink ---------------------------------------------------------------------------


async def sink_run(port: int, events: Sequence[Event]) -> float:
    sink = MqttSinkConfig(
        host="127.0.0.1",
        port=port,
        topic=TOPIC,
        client_id="bench-sink",
        status_topic="bench/status",
        max_inflight=INFLIGHT,
        max_batch=BATCH,
    ).build(SinkContext("bench"))
    await sink.start()
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(events), BATCH):
            await sink.send(events[i : i + BATCH])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        await sink.aclose()
    _cpu_us[-1] = cpu / len(events) * 1e6
    return len(events) / elapsed


# -- an aiomqtt-based publisher ------------------------------------------------------------------


def paho_properties(event: Event) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = event.ce.datacontenttype
    props.UserProperty = list(event.attributes().items())
    return props


def packed_properties(event: Event) -> PackedProperties:
    return PackedProperties(event.ce.datacontenttype, list(event.attributes().items()))


def quickack_after_reads(client: aiomqtt.Client) -> None:
    """Replace aiomqtt's socket reader by one that asks for a quick ACK after every read.

    aiomqtt has no hook for this: the reader is a closure registered by its private
    `_on_socket_open`, so this reaches into `_client` and `_disconnected`, and has to be done
    again after every (re)connect."""
    paho = client._client
    sock = paho.socket()
    assert sock is not None and _TCP_QUICKACK is not None
    loop = asyncio.get_running_loop()
    fd = sock.fileno()

    def readable() -> None:
        try:
            while True:
                paho.loop_read()
                current = paho.socket()
                if current is None:
                    return
                with contextlib.suppress(OSError, AttributeError, ValueError):
                    current.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                pending = getattr(current, "pending", None)
                if pending is None or not pending():
                    return
        except Exception as exc:
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)

    loop.remove_reader(fd)
    loop.add_reader(fd, readable)


async def aiomqtt_run(
    port: int, events: Sequence[Event], packed: bool, sock_mode: str, client_id: str
) -> float:
    options: list[tuple[int, int, int]] = []
    if sock_mode in ("nd", "qa1", "qa"):
        options.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    if sock_mode == "qa1":
        assert _TCP_QUICKACK is not None
        options.append((socket.IPPROTO_TCP, _TCP_QUICKACK, 1))
    topic = topic_template(TOPIC)
    encode: Callable[[Event], Any] = packed_properties if packed else paho_properties
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=INFLIGHT,
        socket_options=options,
        timeout=60,
    ) as client:
        # The default (10) logs a warning for every publish beyond the tenth pending one; a sink
        # gathering a batch raises it to the batch size.
        client.pending_calls_threshold = BATCH
        if sock_mode == "qa":
            quickack_after_reads(client)
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(events), BATCH):
            await asyncio.gather(
                *(
                    client.publish(topic.render(e), e.data_json(), qos=1, properties=encode(e))
                    for e in events[i : i + BATCH]
                )
            )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    _cpu_us[-1] = cpu / len(events) * 1e6
    return len(events) / elapsed


# -- the variants --------------------------------------------------------------------------------

Runner = Callable[[int, Sequence[Event]], float]


def _aio(packed: bool, sock_mode: str, key: str) -> Runner:
    def run(port: int, events: Sequence[Event]) -> float:
        return asyncio.run(aiomqtt_run(port, events, packed, sock_mode, f"bench-{key}"))

    return run


VARIANTS: dict[str, tuple[str, Runner]] = {
    "paho": ("plain paho loop (baseline)", lambda port, ev: paho_run(port, list(ev))),
    "sink": ("MqttSink.send, batches of 100", lambda port, ev: asyncio.run(sink_run(port, ev))),
    "aio-props": ("aiomqtt, paho Properties", _aio(False, "none", "aio-props")),
    "aio-props-qa": (
        "aiomqtt, paho Properties, NODELAY + QUICKACK per read",
        _aio(False, "qa", "aio-props-qa"),
    ),
    "aio-packed": ("aiomqtt, PackedProperties", _aio(True, "none", "aio-packed")),
    "aio-packed-nd": ("aiomqtt, PackedProperties, NODELAY", _aio(True, "nd", "aio-packed-nd")),
    "aio-packed-qa1": (
        "aiomqtt, PackedProperties, NODELAY + QUICKACK once (socket_options)",
        _aio(True, "qa1", "aio-packed-qa1"),
    ),
    "aio-packed-qa": (
        "aiomqtt, PackedProperties, NODELAY + QUICKACK per read",
        _aio(True, "qa", "aio-packed-qa"),
    ),
}


# -- same messages on the wire -------------------------------------------------------------------


def check_same_messages(port: int, keys: Sequence[str]) -> None:
    """Every variant delivers the same topics, payloads and properties for the same events."""
    got: list[tuple[str, bytes, str | None, tuple[tuple[str, str], ...]]] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        content_type = getattr(props, "ContentType", None)
        user = tuple(sorted(getattr(props, "UserProperty", None) or []))
        with lock:
            got.append((msg.topic, msg.payload, content_type, user))

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-check", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/+/+/+", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.5)
        events = sample_events(CHECK_EVENTS)
        for e in events:
            e.data_json()
        seen: dict[str, list[Any]] = {}
        for key in keys:
            VARIANTS[key][1](port, events)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with lock:
                    if len(got) >= CHECK_EVENTS:
                        break
                time.sleep(0.05)
            with lock:
                seen[key] = sorted(got)
                got.clear()
            if len(seen[key]) != CHECK_EVENTS:
                raise RuntimeError(f"check: {key} delivered {len(seen[key])} of {CHECK_EVENTS}")
        reference_key = keys[0]
        for key in keys[1:]:
            if seen[key] != seen[reference_key]:
                raise RuntimeError(f"check: {key} and {reference_key} sent different messages")
        sample = seen[reference_key][0]
        print(
            f"check: {len(keys)} variants sent identical messages ({CHECK_EVENTS} events; e.g. "
            f"topic {sample[0]}, {len(sample[1])} B payload, content type {sample[2]}, "
            f"{len(sample[3])} user properties)"
        )
    finally:
        # DISCONNECT first, so the broker drops the subscription before the timed runs.
        sub.disconnect()
        sub.loop_stop()


# -- import cost ----------------------------------------------------------------------------------

_RSS_PROBE = """
import time
{prelude}
def rss():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
before = rss()
t = time.perf_counter()
{imports}
dt = time.perf_counter() - t
print(before, rss(), dt)
"""

# What a relay with an MQTT sink has loaded before the sink's first connect.
_RELAY_PRELUDE = (
    "import relay.cli, sinks.mqtt, paho.mqtt.client, paho.mqtt.enums, "
    "paho.mqtt.packettypes, paho.mqtt.properties, paho.mqtt.reasoncodes"
)
IMPORT_CASES = [
    ("bare python: import paho.mqtt.client", "", "import paho.mqtt.client"),
    ("bare python: import aiomqtt (pulls paho, asyncio, ssl)", "", "import aiomqtt"),
    (
        "after asyncio, ssl, logging, paho.mqtt.client: import aiomqtt",
        "import asyncio, ssl, logging, paho.mqtt.client",
        "import aiomqtt",
    ),
    ("after the relay + MqttSink's imports: import aiomqtt", _RELAY_PRELUDE, "import aiomqtt"),
]


def import_costs(reps: int) -> None:
    root = Path(__file__).resolve().parents[1]
    baseline = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE.format(prelude="", imports="pass")],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        baseline.append(int(out[1]))
    print(f"\nimport cost, median of {reps} fresh interpreters (VmRSS, KiB)")
    print(f"  `python -c pass`: VmRSS {statistics.median(baseline):,.0f} KiB")
    print(f"  {'case':<62} {'RSS delta':>11} {'RSS after':>11} {'time':>8}")
    for label, prelude, imports in IMPORT_CASES:
        deltas, afters, times = [], [], []
        for _ in range(reps):
            out = subprocess.run(
                [sys.executable, "-c", _RSS_PROBE.format(prelude=prelude, imports=imports)],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            before, after, dt = int(out[0]), int(out[1]), float(out[2])
            deltas.append(after - before)
            afters.append(after)
            times.append(dt * 1000)
        print(
            f"  {label:<62} {statistics.median(deltas):>7,.0f} KiB "
            f"{statistics.median(afters):>7,.0f} KiB {statistics.median(times):>5.1f} ms"
        )


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated keys: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--rss-reps", type=int, default=7)
    args = parser.parse_args()
    keys = [k for k in args.variants.split(",") if k]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    if "paho" not in keys:
        keys.insert(0, "paho")
    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-aiomqtt-"))
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    rates: dict[str, list[float]] = {k: [] for k in keys}
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    to_sink: dict[str, list[float]] = {k: [] for k in keys}
    cpu_us: dict[str, list[float]] = {k: [] for k in keys}
    try:
        if not args.no_check:
            check_same_messages(broker.port, keys)
        for run in range(args.runs):
            events = sample_events(args.events)
            for e in events:
                e.data_json()
            shift = run % len(keys)
            order = keys[shift:] + keys[:shift]
            got: dict[str, float] = {}
            for key in order:
                _cpu_us[-1] = float("nan")
                got[key] = VARIANTS[key][1](broker.port, events)
                cpu_us[key].append(_cpu_us[-1])
            for key in keys:
                rates[key].append(got[key])
                ratios[key].append(got[key] / got["paho"])
                if "sink" in got:
                    to_sink[key].append(got[key] / got["sink"])
            print(
                f"run {run + 1} (order {', '.join(order)}): "
                + "  ".join(f"{k} {got[k]:,.0f}/s" for k in keys)
            )
    finally:
        broker.stop()
    print(
        f"\nQoS 1 throughput, {args.events} events, {args.runs} runs interleaved; "
        "median events/s, medians of the per-run ratios to the paho loop and to the sink of the "
        "same run, median CPU time of this process per event in the timed loop"
    )
    print(
        f"  {'variant':<68} {'events/s':>9} {'/paho':>6} {'/sink':>6} {'CPU us/ev':>9}  "
        "per-run ratios to paho"
    )
    for key in keys:
        cpu = [c for c in cpu_us[key] if c == c]  # none for the paho loop
        cpu_text = f"{statistics.median(cpu):.1f}" if cpu else "-"
        sink_text = f"{statistics.median(to_sink[key]):.2f}" if to_sink[key] else "-"
        print(
            f"  {VARIANTS[key][0]:<68} {statistics.median(rates[key]):>9,.0f} "
            f"{statistics.median(ratios[key]):>6.2f} {sink_text:>6} {cpu_text:>9}  "
            + ", ".join(f"{r:.2f}" for r in ratios[key])
        )
    import_costs(args.rss_reps)


if __name__ == "__main__":
    main()
