"""The durable spool's costs: throughput into it, latency it adds, memory with a backlog.

    cd /work/main && .venv/bin/python -m bench.bench_spool [--events 200000] [--runs 5]
        [--rate 500] [--seconds 10] [--backlog 200000] [--skip throughput,latency,rss]

1. Throughput, one core for the pipeline (SQLite writes in the spool's own thread): recorded
   engine events framed, normalized and encoded, then handed to the spool (group commit, WAL,
   synchronous=FULL, every event owed by a sink that never finishes it, so every one is
   written), until the last commit is on disk; against the same loop without the spool, in
   the same run. Also with spool.fsync false.
2. Latency at --rate volume creations/s from a real engine (20.10) to an MQTT subscriber
   (engine timeNano -> arrival), the relay with its spool on disk (the default) against the
   same relay with `spool.durable: false`, alternating, --runs times each: p50/p99/max.
3. RSS of `python -m relay run` holding a --backlog-event backlog for a webhook that is down
   (nothing listens on its port), fed by a stand-in engine at --feed-rate events/s (5,000:
   3.5x the fastest burst measured from a real engine, so the backlog, not the reader's queue
   of a flood, is what is measured); against the same relay delivering the same events to
   stdout (/dev/null), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_pipeline import metric, rss_kb
from bench.replay_engine import recorded_stream
from relay.engine import LineFramer
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.normalize import Normalizer
from relay.schema import Engine, Event
from relay.spool import Spool

REPO = Path(__file__).resolve().parents[1]


# -- 1. throughput -------------------------------------------------------------------------------


async def through(stream: bytes, count: int, spool_dir: Path | None, fsync: bool) -> float:
    normalizer = Normalizer(Engine(id="E", name="bench", version="28.5.2", api_version="1.51"))
    framer = LineFramer()
    spool: Spool | None = None
    writer: asyncio.Task[None] | None = None
    bit = 0
    if spool_dir is not None:
        spool = Spool(spool_dir / "spool.db", Metrics(), fsync=fsync)
        spool.open(["down"])
        bit = spool.bits["down"]
        status = TaskStatus(asyncio.get_running_loop().create_future())
        writer = asyncio.create_task(spool.run(status))
    started = time.perf_counter()
    seq = 0
    for i in range(0, len(stream), 65536):
        for line in framer.feed(stream[i : i + 65536]):
            seq += 1
            event = Event(normalizer.normalize(line), seq)
            event.json()
            if spool is not None:
                spool.add(event, bit)
        # The relay's pipeline yields to the loop between reads: so does this one, and the
        # writer commits meanwhile.
        await asyncio.sleep(0)
    if spool is not None:
        while spool.held(bit, 0):
            await spool.commit()
    elapsed = time.perf_counter() - started
    if spool is not None and writer is not None:
        writer.cancel()
        await asyncio.wait([writer])
        spool.close()
    return count / elapsed


def throughput(count: int, runs: int) -> None:
    stream = b"".join(recorded_stream(count))
    results: dict[str, list[float]] = {"no spool": [], "spool, fsync": [], "spool, no fsync": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
            results["no spool"].append(asyncio.run(through(stream, count, None, True)))
            results["spool, fsync"].append(
                asyncio.run(through(stream, count, Path(tmp) / "a", True))
            )
            results["spool, no fsync"].append(
                asyncio.run(through(stream, count, Path(tmp) / "b", False))
            )
    base = statistics.median(results["no spool"])
    print(f"\n1. throughput, {count} events, median of {runs} runs (events/s, ratio to no spool)")
    for name, values in results.items():
        m = statistics.median(values)
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"   {name:18s} {m:12,.0f}  ({spread})  ratio {m / base:.2f}")


# -- 2. latency ---------------------------------------------------------------------------------


async def latency_run(
    port: int, durable: bool, rate: float, total: int, workdir: Path
) -> list[float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bench.load import paced_volume_creates
    from relay.router import RouteFilter
    from relay.sink import SinkContext
    from sinks.mqtt import MqttSinkConfig
    from tests.harness import PrivateEngine
    from tests.relay_harness import relay_settings, running_relay

    engine = PrivateEngine("20.10", "/usr/sbin/dockerd", tempfile.mkdtemp(prefix="/tmp/bs"))
    engine.start()
    arrivals: list[float] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    root = f"lat{int(durable)}{time.monotonic_ns()}"

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/volume/create"):
            arrivals.append((time.time_ns() - json.loads(msg.payload)["time_nano"]) / 1e6)

    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(f"{root}/#", qos=1)
    sub.loop_start()
    try:
        sink = MqttSinkConfig(
            host="127.0.0.1",
            port=port,
            client_id=f"bench-{root}",
            topic=root + "/{type}/{action}",
            status_topic=f"{root}/status",
        ).build(SinkContext("bench"))
        settings = relay_settings(
            engine.docker_host, workdir / f"state-{root}", spool={"durable": durable}
        )
        async with running_relay(settings, sinks=[(sink, RouteFilter())]):
            await paced_volume_creates(engine.socket_path, rate, total, root)
            deadline = time.monotonic() + 60
            while len(arrivals) < total and time.monotonic() < deadline:  # noqa: ASYNC110 (paho thread fills it)
                await asyncio.sleep(0.1)
    finally:
        sub.loop_stop()
        engine.stop()
    return arrivals


def latency(rate: float, seconds: float, runs: int) -> None:
    from tests.harness import Mosquitto

    total = int(rate * seconds)
    stats: dict[bool, list[tuple[float, float, float, int]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp, Mosquitto(Path(tmp)) as broker:
        for run in range(runs):
            for durable in (True, False) if run % 2 == 0 else (False, True):
                got = sorted(asyncio.run(latency_run(broker.port, durable, rate, total, Path(tmp))))
                p50 = got[len(got) // 2]
                p99 = got[min(len(got) - 1, int(len(got) * 0.99))]
                stats[durable].append((p50, p99, got[-1], total - len(got)))
    print(f"\n2. MQTT latency at {rate:.0f} events/s, {total} events, median of {runs} runs (ms)")
    for durable, name in ((False, "spool in memory"), (True, "spool on disk")):
        rows = stats[durable]
        p50 = statistics.median(r[0] for r in rows)
        p99 = statistics.median(r[1] for r in rows)
        worst = statistics.median(r[2] for r in rows)
        lost = sum(r[3] for r in rows)
        print(f"   {name:16s} p50 {p50:6.2f}  p99 {p99:6.2f}  max {worst:7.2f}  lost {lost}")
    d50 = statistics.median(a[0] - b[0] for a, b in zip(stats[True], stats[False], strict=True))
    d99 = statistics.median(a[1] - b[1] for a, b in zip(stats[True], stats[False], strict=True))
    print(f"   added by the disk (median of per-pair differences): p50 {d50:+.2f}  p99 {d99:+.2f}")


# -- 3. memory with a backlog -------------------------------------------------------------------


def total(port: int, name: str) -> float:
    """The sum of every series of `name` (one per type and action, say)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def backlog_rss(count: int, down: bool, rate: float) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB once the relay read `count` events: held for a down webhook, or
    delivered to stdout."""
    from tests.harness import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        sock = f"{tmp}/engine.sock"
        engine = subprocess.Popen(
            [sys.executable, "-m", "bench.replay_engine", sock, str(count), str(rate)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert engine.stdout is not None and engine.stdout.readline().strip() == b"ready"
        sinks = [{"type": "webhook", "name": "down", "url": f"http://127.0.0.1:{free_port()}/"}]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_ENGINE__HOST=f"unix://{sock}",
            RELAY_STATE_DIR=f"{tmp}/state",
            RELAY_HTTP__PORT=str(port),
            RELAY_HTTP__HOST="127.0.0.1",
            RELAY_LOG__LEVEL="ERROR",
            RELAY_SPOOL__MAX_BYTES=str(4 * 1024**3),
            RELAY_SPOOL__MAX_TOTAL_BYTES=str(4 * 1024**3),
        )
        if down:
            env["RELAY_SINKS"] = json.dumps(sinks)
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    read = total(port, "relay_events_read_total")
                except OSError:
                    read = 0
                if read >= count:
                    break
                time.sleep(0.5)
            # Wait for the spool to hold (or stdout to have) all of them.
            name = "relay_spool_events" if down else "relay_events_delivered_total"
            while time.monotonic() < deadline and metric(port, name) < count:
                time.sleep(0.5)
            status = Path(f"/proc/{relay.pid}/status").read_text()
            hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:"))
            return rss_kb(relay.pid) / 1024, hwm / 1024
        finally:
            relay.terminate()
            relay.wait(60)
            engine.terminate()
            engine.wait(10)


def rss(count: int, runs: int, rate: float) -> None:
    results: dict[str, list[tuple[float, float]]] = {"delivered to stdout": [], "held": []}
    for _ in range(runs):
        results["delivered to stdout"].append(backlog_rss(count, down=False, rate=rate))
        results["held"].append(backlog_rss(count, down=True, rate=rate))
    print(f"\n3. RSS after {count} events at {rate:.0f}/s, median of {runs} runs (MB)")
    for name, values in results.items():
        now = statistics.median(v[0] for v in values)
        peak = statistics.median(v[1] for v in values)
        label = f"{name} (a webhook that is down)" if name == "held" else name
        print(f"   {label:38s} RSS {now:6.1f}  peak {peak:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--rss-runs", type=int, default=3)
    parser.add_argument("--feed-rate", type=float, default=5000)
    parser.add_argument("--skip", default="", help="comma-separated: throughput,latency,rss")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    (REPO / ".cache").mkdir(exist_ok=True)
    if "throughput" not in skip:
        throughput(args.events, args.runs)
    if "latency" not in skip:
        latency(args.rate, args.seconds, args.runs)
    if "rss" not in skip:
        rss(args.backlog, args.rss_runs, args.feed_rate)


if __name__ == "__main__":
    main()
