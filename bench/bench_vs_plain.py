"""The relay against the plain tools, in one run: end-to-end latency and CPU per event, per sink.

    cd /work/main && .venv/bin/python -m bench.bench_vs_plain [--events 5000] [--runs 3]
        [--rates 100,500] [--sinks mqtt,kafka,webhook] [--all-rate 500] [--no-all]
        [--profile | --profile-only] [--profiler py-spy|cprofile] [--profile-events 10000]
        [--tree DIR] [--relay-env RELAY_X=V] [--sink-option kafka.linger_ms=0]
        [--out results.json] [--profile-out FILE]

`--tree` runs the relay from another source tree (e.g. `git archive HEAD | tar -x -C DIR`), so
that a before/after pair, or a checkout others are editing, is measured on a fixed tree;
`--relay-env` and `--sink-option` change a setting for a before/after figure (the defaults are
what the bench measures without them).

Everything is real and local, started once for the whole run: a private Docker Engine (20.10,
tests/harness), Mosquitto, tansu (memory storage) and an aiohttp webhook receiver
(bench/plain/webhook_receiver.py, its own process). For every rate, run and sink, two sides take
turns on that same engine, broker and load, one after the other, the order alternating so that
the machine's noise hits both:

- relay: `python -m relay run` (the tree `--tree`, default this checkout) as an operator runs
  it, with only that sink and its defaults (Kafka: idempotence off, tansu cannot do it);
- plain: the docker CLI's `docker events --format '{{json .}}'` piped into
  `mosquitto_pub -l -q 1 -t plain/events` (MQTT), bench/plain/kafka_forward.py (a plain
  aiokafka producer with the sink's acks and linger) or bench/plain/webhook_forward.py (one
  aiohttp POST per line).

Each side: 10 warm-up volume creations that must all arrive (so both are connected and have
their topics' metadata), then --events volume creations paced at the rate through the engine's
API by another process (bench/load.py). Latency = arrival time at the MQTT subscriber
(`mosquitto_sub`), Kafka consumer (in this process) or webhook receiver, each stamping arrivals,
minus the engine's `timeNano`, same host clock; loss = created but not arrived within --deadline
seconds of the last creation. CPU = utime + stime from /proc/<pid>/stat of every process of the
side (relay: its process; plain: the docker CLI and the forwarder), from the end of the warm-up
until the last event arrived. The volumes are pruned after each side, while nothing listens, and
a side with a Kafka sink starts on a restarted tansu: its memory storage slows down as records
pile up (p50 grew from tens of ms to seconds over one whole run, for both sides), which would
favour whichever side ran first.

`--no-all` skips the last case: all three sinks in one relay at --all-rate against the three
plain forwarders running at once. `--profile` adds one more relay run with all three sinks at
--all-rate under py-spy (`py-spy record --format raw --function`, attached to the running
relay), or, with `--profiler cprofile` (where ptrace is denied), under cProfile through a
wrapper that runs relay.cli.main and dumps its statistics when SIGTERM ends it; it prints the
top functions by own and by cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from bench.bench_footprint import TICKS, cpu_seconds, get  # noqa: E402
from bench.load import paced_volume_creates  # noqa: E402
from tests.harness import Mosquitto, PrivateEngine, Tansu, free_port, wait_for  # noqa: E402
from tests.harness.engine import SYSTEM_DOCKERD, docker_cli_path  # noqa: E402

SINKS = ("mqtt", "kafka", "webhook")
PLAIN_TOPIC = "plain/events"
KAFKA_TOPICS = {"relay": "vs-relay", "plain": "vs-plain"}
WARMUP = 10

# Paced creations from another process, so that the API calls cost this process nothing while
# it timestamps arrivals.
GENERATOR = """
import asyncio, sys
from pathlib import Path
from bench.load import paced_volume_creates
print(asyncio.run(paced_volume_creates(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]),
                                       sys.argv[4])))
"""

# cProfile around the relay's own entry point: the relay turns SIGTERM into a clean return
# from main(), after which the statistics are written.
CPROFILE_WRAPPER = """
import cProfile, sys
from relay.cli import main
out = sys.argv.pop(1)
profile = cProfile.Profile()
try:
    profile.runcall(main, sys.argv[1:])
finally:
    profile.dump_stats(out)
"""


# --- what arrives ----------------------------------------------------------------------------


def parse(payload: bytes) -> list[tuple[str, int]]:
    """(volume name, engine timeNano) of each volume creation in a payload: the relay's v1
    data (binary mode), a structured CloudEvent or a batch of them, or the docker CLI's JSON
    line; status messages and other events give none."""
    try:
        d = json.loads(payload)
    except ValueError:
        return []
    found = [one for item in (d if isinstance(d, list) else [d]) if (one := _creation(item))]
    return found


def _creation(d: Any) -> tuple[str, int] | None:
    if not isinstance(d, dict):
        return None
    if isinstance(d.get("data"), dict) and "specversion" in d:
        d = d["data"]
    if "time_nano" in d:
        if d.get("type") == "volume" and d.get("action") == "create":
            return str(d["actor"]["id"]), int(d["time_nano"])
        return None
    if d.get("Type") == "volume" and d.get("Action") == "create":
        return str(d["Actor"]["ID"]), int(d["timeNano"])
    return None


@dataclass
class Tracker:
    """Arrivals at one destination: raw (arrival ns, payload) appended by whoever receives
    (the destination processes' reader threads, the consumer task), parsed later on the
    bench's loop."""

    raw: list[tuple[int, bytes]] = field(default_factory=list)
    seen: int = 0
    # prefix -> name -> (first arrival ns, timeNano)
    first: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)

    def drain(self) -> None:
        end = len(self.raw)
        for arrived, payload in self.raw[self.seen : end]:
            for name, time_nano in parse(payload):
                prefix = name.rsplit("-", 1)[0]
                names = self.first.setdefault(prefix, {})
                if name in names:
                    self.duplicates[prefix] = self.duplicates.get(prefix, 0) + 1
                else:
                    names[name] = (arrived, time_nano)
        self.seen = end

    def count(self, prefix: str) -> int:
        return len(self.first.get(prefix, ()))

    def reset(self) -> None:
        self.raw.clear()
        self.seen = 0
        self.first.clear()
        self.duplicates.clear()


class Destinations:
    """The MQTT subscriber, Kafka consumer and webhook receiver, shared by every run."""

    def __init__(self, mosquitto: Mosquitto, tansu: Tansu) -> None:
        self.mosquitto = mosquitto
        self.tansu = tansu
        self.trackers = {sink: Tracker() for sink in SINKS}
        self.receiver_port = free_port()
        self._receiver: subprocess.Popen[bytes] | None = None
        self._subscriber: subprocess.Popen[bytes] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._consuming: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._receiver = self._receive()
        self._subscriber = self._subscribe()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.receiver_port}{path}"

    def _receive(self) -> subprocess.Popen[bytes]:
        webhook_raw = self.trackers["webhook"].raw
        port = str(self.receiver_port)
        receiver = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "plain" / "webhook_receiver.py"), port],
            stdout=subprocess.PIPE,
        )
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != b"ready":
            raise RuntimeError("the webhook receiver did not start")
        threading.Thread(
            target=_stamped_lines, args=(receiver, webhook_raw), name="receiver", daemon=True
        ).start()
        return receiver

    def _subscribe(self) -> subprocess.Popen[bytes]:
        mqtt_raw = self.trackers["mqtt"].raw
        # mosquitto_sub (C, its own process) stamps each message as it arrives (%U: Unix time
        # with ns). A Python subscriber in this process decoded the relay's MQTT 5 user
        # properties (one per CloudEvents attribute) at ~0.1 ms a message while sharing the GIL
        # with the load: it counted its own decoding, and the pipe's messages carry none.
        sub = subprocess.Popen(
            [
                shutil.which("mosquitto_sub") or "mosquitto_sub",
                *("-h", "127.0.0.1", "-p", str(self.mosquitto.port), "-t", "#", "-q", "1"),
                *("-V", "mqttv5", "-F", "%U %p"),
            ],
            stdout=subprocess.PIPE,
        )

        threading.Thread(
            target=_stamped_lines, args=(sub, mqtt_raw), name="mosquitto_sub", daemon=True
        ).start()
        return sub

    async def fresh_kafka(self) -> None:
        """A restarted tansu (memory storage: no records) and a new consumer on its topics, so
        that no run pays for the records of the runs before it."""
        await self.stop_kafka()
        await asyncio.to_thread(self.tansu.restart)
        # Both topics exist before anyone subscribes or forwards (auto-created, 4 partitions).
        producer = AIOKafkaProducer(
            bootstrap_servers=self.tansu.bootstrap, enable_idempotence=False
        )
        await producer.start()
        for topic in KAFKA_TOPICS.values():
            await producer.send_and_wait(topic, b"{}")
        await producer.stop()
        consumer = AIOKafkaConsumer(
            *KAFKA_TOPICS.values(),
            bootstrap_servers=self.tansu.bootstrap,
            group_id=None,
            auto_offset_reset="latest",
            fetch_max_wait_ms=5,  # an idle fetch returns this soon: the consumer's share
        )
        await consumer.start()
        self._consumer = consumer
        kafka_raw = self.trackers["kafka"].raw

        async def consume() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=100)
                now = time.time_ns()
                for records in batches.values():
                    kafka_raw.extend((now, r.value) for r in records)

        self._consuming = asyncio.create_task(consume())

    async def stop_kafka(self) -> None:
        consuming, self._consuming = self._consuming, None
        consumer, self._consumer = self._consumer, None
        if consuming is not None:
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
        if consumer is not None:
            await consumer.stop()

    def drain(self) -> None:
        for tracker in self.trackers.values():
            tracker.drain()

    def reset(self) -> None:
        self.drain()
        for tracker in self.trackers.values():
            tracker.reset()

    async def aclose(self) -> None:
        await self.stop_kafka()
        if self._subscriber is not None:
            self._subscriber.terminate()
            self._subscriber.wait(10)
        if self._receiver is not None:
            self._receiver.terminate()
            self._receiver.wait(10)


def _stamped_lines(proc: subprocess.Popen[bytes], into: list[tuple[int, bytes]]) -> None:
    """Lines `<time> <payload>` of a destination process into `into` as (ns, payload); the
    time is Unix ns, or seconds.nanoseconds (mosquitto_sub's %U)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        stamp, _, payload = line.rstrip(b"\n").partition(b" ")
        secs, dot, nanos = stamp.partition(b".")
        with contextlib.suppress(ValueError):
            into.append((int(secs) * 10**9 + int(nanos) if dot else int(secs), payload))


def system_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / TICKS


# --- the two sides ---------------------------------------------------------------------------


@dataclass
class Side:
    """The processes of one side; CPU is the sum over all of them."""

    name: str
    procs: list[subprocess.Popen[bytes]]
    # Stopped in this order (a pipe's writer first: its reader then sees the end of input).
    stop_order: list[subprocess.Popen[bytes]]
    pid: int = 0  # the relay's, for a profiler

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def system_cpu(self) -> float:
        """stime alone: the kernel's share (syscalls: sends, epoll, fsync)."""
        return sum(system_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for proc in self.stop_order:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.tree = Path(args.tree).resolve()
        self.engine = PrivateEngine("20.10", SYSTEM_DOCKERD, tmp / "e")
        self.mosquitto = Mosquitto(tmp / "mosquitto")
        self.tansu = Tansu(tmp / "tansu")
        self.dest = Destinations(self.mosquitto, self.tansu)
        self.docker = docker_cli_path()
        self.mosquitto_pub = shutil.which("mosquitto_pub")
        self.serial = 0
        self.results: list[dict[str, Any]] = []

    def log(self, path: str) -> Any:
        return (self.tmp / path).open("ab")

    # sides

    def relay_sink(self, sink: str) -> dict[str, Any]:
        config: dict[str, Any]
        if sink == "mqtt":
            config = {"type": "mqtt", "host": "127.0.0.1", "port": self.mosquitto.port}
        elif sink == "kafka":
            config = {
                "type": "kafka",
                "bootstrap_servers": [self.tansu.bootstrap],
                "topic": KAFKA_TOPICS["relay"],
                "enable_idempotence": False,  # tansu lacks InitProducerId (DESIGN.md 5)
            }
        else:
            config = {"type": "webhook", "url": self.dest.url("/relay")}
        config["name"] = sink
        for option in self.args.sink_option:
            target, _, value = option.partition("=")
            name, _, key = target.partition(".")
            if name == sink:
                config[key] = json.loads(value)
        return config

    def start_relay(self, sinks: list[str], profile_to: Path | None = None) -> Side:
        self.serial += 1
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            DOCKER_HOST=self.engine.docker_host,
            RELAY_SINKS=json.dumps([self.relay_sink(s) for s in sinks]),
            RELAY_STATE_DIR=str(self.tmp / f"state-{self.serial}"),
            RELAY_HTTP__HOST="127.0.0.1",
            RELAY_HTTP__PORT=str(port),
        )
        env.update(item.split("=", 1) for item in self.args.relay_env)
        if profile_to is None:
            cmd = [sys.executable, "-m", "relay", "run"]
        else:
            cmd = [sys.executable, "-c", CPROFILE_WRAPPER, str(profile_to), "run"]
        proc = subprocess.Popen(
            cmd, cwd=self.tree, env=env, stdout=subprocess.DEVNULL, stderr=self.log("relay.log")
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited with {proc.returncode}: see {self.tmp}/relay.log")
            return get(port, "/readyz")[0] == 200

        wait_for(ready, 60, message="relay ready")
        return Side("relay", [proc], [proc], pid=proc.pid)

    def plain_forwarder(self, sink: str) -> list[str]:
        if sink == "mqtt":
            assert self.mosquitto_pub is not None, (
                "mosquitto_pub: apt-get install mosquitto-clients"
            )
            port = str(self.mosquitto.port)
            return [
                self.mosquitto_pub,
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-l",
                "-q",
                "1",
                "-t",
                PLAIN_TOPIC,
            ]
        script = REPO / "bench" / "plain" / f"{sink}_forward.py"
        if sink == "kafka":
            return [sys.executable, str(script), self.tansu.bootstrap, KAFKA_TOPICS["plain"]]
        return [sys.executable, str(script), self.dest.url("/plain")]

    def start_plain(self, sinks: list[str]) -> Side:
        procs: list[subprocess.Popen[bytes]] = []
        order: list[subprocess.Popen[bytes]] = []
        for sink in sinks:
            events = subprocess.Popen(
                [self.docker, "events", "--format", "{{json .}}"],
                env=self.engine.env(),
                stdout=subprocess.PIPE,
                stderr=self.log("plain.log"),
            )
            forwarder = subprocess.Popen(
                self.plain_forwarder(sink),
                stdin=events.stdout,
                stdout=self.log("plain.log"),
                stderr=subprocess.STDOUT,
            )
            assert events.stdout is not None
            events.stdout.close()  # the forwarder holds the pipe's read end now
            procs += [events, forwarder]
            order.insert(0, events)
            order.append(forwarder)
        return Side("plain", procs, order)

    # one side, one run

    async def generate(self, rate: float, prefix: str, events: int | None = None) -> float:
        """`events` (--events) volume creations at `rate` from another process; the rate
        achieved."""
        gen = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            GENERATOR,
            str(self.engine.socket_path),
            str(rate),
            str(events or self.args.events),
            prefix,
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        try:
            out, _ = await gen.communicate()
        finally:
            if gen.returncode is None:  # cancelled: the bench is stopping
                gen.kill()
                await gen.wait()
        if gen.returncode != 0:
            raise RuntimeError(f"load generator exited with {gen.returncode}")
        return float(out.decode().strip())

    async def warm_up(self, sinks: list[str], prefix: str) -> None:
        """Return once the side forwards to every sink and has sent WARMUP events: its
        connections made, its topics' metadata known. The docker CLI says nothing when it has
        subscribed, so volumes are created one at a time until the first one arrives."""
        deadline = time.monotonic() + 60
        probe = 0

        def probed(sink: str) -> bool:
            return any(p.startswith(f"{prefix}p") for p in self.dest.trackers[sink].first)

        while True:
            await paced_volume_creates(self.engine.socket_path, 1, 1, f"{prefix}p{probe}")
            probe += 1
            await self.arrived(sinks, f"{prefix}p", 1, 0.1)  # drains, and paces the probes
            if all(probed(s) for s in sinks):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no warm-up event arrived at {', '.join(sinks)}")
        await paced_volume_creates(self.engine.socket_path, 20, WARMUP, prefix)
        if not await self.arrived(sinks, prefix, WARMUP, 60):
            raise RuntimeError(f"warm-up events did not all arrive at {', '.join(sinks)}")

    async def arrived(self, sinks: list[str], prefix: str, n: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            self.dest.drain()
            if all(self.dest.trackers[s].count(prefix) >= n for s in sinks):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)

    async def run_side(
        self, side_name: str, case: str, sinks: list[str], rate: float, run: int
    ) -> dict[str, Any]:
        tag = f"{case[0]}{int(rate)}r{run}{side_name[0]}{self.serial}"
        self.dest.reset()
        if "kafka" in sinks:
            await self.dest.fresh_kafka()
        side = self.start_relay(sinks) if side_name == "relay" else self.start_plain(sinks)
        try:
            await self.warm_up(sinks, f"w{tag}")
            load_before = os.getloadavg()
            cpu0, sys0, t0 = side.cpu(), side.system_cpu(), time.monotonic()
            achieved = await self.generate(rate, f"m{tag}")
            complete = await self.arrived(sinks, f"m{tag}", self.args.events, self.args.deadline)
            cpu1, sys1, t1 = side.cpu(), side.system_cpu(), time.monotonic()
            load_after = os.getloadavg()
        finally:
            side.stop()
        self.dest.drain()
        await asyncio.to_thread(self.engine.cli, "volume", "prune", "-f", timeout=600)
        result: dict[str, Any] = {
            "case": case,
            "rate": rate,
            "run": run,
            "side": side_name,
            "achieved_rate": achieved,
            "events": self.args.events,
            "complete": complete,
            "cpu_s": cpu1 - cpu0,
            "wall_s": t1 - t0,
            "cpu_s_per_1000": 1000 * (cpu1 - cpu0) / self.args.events,
            "core_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "system_share": (sys1 - sys0) / (cpu1 - cpu0) if cpu1 > cpu0 else 0.0,
            "load1": [load_before[0], load_after[0]],
            "sinks": {},
        }
        for sink in sinks:
            tracker = self.dest.trackers[sink]
            names = tracker.first.get(f"m{tag}", {})
            lat = sorted((a - t) / 1e6 for a, t in names.values())
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
            result["sinks"][sink] = {
                "p50_ms": q[49],
                "p99_ms": q[98],
                "max_ms": lat[-1] if lat else float("nan"),
                "loss": self.args.events - len(names),
                "duplicates": tracker.duplicates.get(f"m{tag}", 0),
            }
        self.results.append(result)
        lats = "  ".join(
            f"{s} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} max {v['max_ms']:.1f} "
            f"loss {v['loss']}"
            for s, v in result["sinks"].items()
        )
        print(
            f"  {case:8} {rate:4g}/s run {run + 1} {side_name:5}: {achieved:5.0f}/s achieved, "
            f"CPU {result['cpu_s_per_1000']:.3f} s/1000 ev ({result['core_pct']:.1f} % of a core, "
            f"{100 * result['system_share']:.0f} % system), "
            f"load {load_before[0]:.2f}->{load_after[0]:.2f}; {lats}",
            flush=True,
        )
        return result

    # the profile

    async def profile(self, rate: float) -> None:
        events = self.args.profile_events
        seconds = events / rate
        cprofile = self.args.profiler == "cprofile"
        out = self.tmp / ("relay.pstats" if cprofile else "relay.pyspy.txt")
        self.dest.reset()
        await self.dest.fresh_kafka()
        side = self.start_relay(list(SINKS), profile_to=out if cprofile else None)
        spy: asyncio.subprocess.Process | None = None
        try:
            await self.warm_up(list(SINKS), "wprof")
            if not cprofile:
                spy = await asyncio.create_subprocess_exec(
                    py_spy(),
                    "record",
                    "--pid",
                    str(side.pid),
                    "--rate",
                    str(self.args.spy_rate),
                    "--function",
                    # Only samples holding the GIL: without it, threads parked in a lock
                    # (the spool's executor) count as busy on this machine.
                    "--gil",
                    "--format",
                    "raw",
                    "--duration",
                    str(int(seconds) + 1),
                    "--output",
                    str(out),
                    stdout=self.log("py-spy.log"),
                    stderr=subprocess.STDOUT,
                )
            cpu0, t0 = side.cpu(), time.monotonic()
            await self.generate(rate, "mprof", events)
            await self.arrived(list(SINKS), "mprof", events, self.args.deadline)
            cpu1, t1 = side.cpu(), time.monotonic()
            if spy is not None:
                await asyncio.wait_for(spy.wait(), 120)
        finally:
            side.stop()
        await asyncio.to_thread(self.engine.cli, "volume", "prune", "-f", timeout=600)
        print(
            f"\nprofile: relay with kafka+mqtt+webhook, {events} events at {rate:g}/s, "
            f"CPU {100 * (cpu1 - cpu0) / (t1 - t0):.1f} % of a core under the profiler "
            f"({1e6 * (cpu1 - cpu0) / events:.0f} µs/event); "
            f"{'cProfile' if cprofile else f'py-spy at {self.args.spy_rate} Hz'} -> {out}"
        )
        if self.args.profile_out:
            shutil.copyfile(out, self.args.profile_out)
        if cprofile:
            summarise_cprofile(out, self.args.top)
        else:
            summarise_raw(out, self.args.top, 1e6 * (cpu1 - cpu0) / events)


def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


# Frames every sample of the loop or a thread passes through: they say nothing of where the
# time goes, so the cumulative table leaves them out.
ENTRY_FRAMES = (
    "<frozen runpy>",
    "relay/__main__.py",
    "relay/cli.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "threading.py",
)


# Where a stack's time belongs, first match wins: a sink's send runs inside the outbox's
# frames, so the sinks come first.
COMPONENTS = (
    ("MQTT sink (MqttSink, paho, PUBACK reads)", ("MqttSink", "LoopAdapter", "paho/")),
    ("Kafka sink (KafkaSink, aiokafka)", ("KafkaSink", "aiokafka/")),
    ("webhook sink (WebhookSink, aiohttp client)", ("WebhookSink", "aiohttp/client")),
    (
        "reader + pipeline (frame, normalize, route)",
        ("relay/engine.py", "relay/pipeline.py", "relay/normalize.py", "relay/router.py"),
    ),
    ("spool", ("relay/spool.py",)),
    ("metrics, HTTP port", ("prometheus_client/", "relay/metrics.py", "relay/http.py")),
    ("outbox, retry policy (stamina)", ("relay/outbox.py", "stamina/", "tenacity/")),
)


def component(stack: str) -> str:
    for label, marks in COMPONENTS:
        if any(mark in stack for mark in marks):
            return label
    leaf = stack.rsplit(";", 1)[-1]
    if "asyncio/" in leaf or "selectors.py" in leaf:
        return "event loop (select, scheduling)"
    return "other"


def summarise_raw(path: Path, top: int, cpu_us_per_event: float) -> None:
    """Own and cumulative samples by function from py-spy's collapsed stacks. A sample says
    the GIL was held, not that the CPU ran: on a busy machine a thread holding it may wait
    for a core. So the shares are the figure, and µs/event is a share of the CPU measured."""
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    parts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        part = component(stack)
        parts[part] = parts.get(part, 0) + count
        for frame in set(frames):
            if not any(entry in frame for entry in ENTRY_FRAMES):
                cumulative[frame] = cumulative.get(frame, 0) + count
    print(f"{total} samples holding the GIL; µs/event = share x {cpu_us_per_event:.0f} µs")
    print("\nby component: % of GIL samples, µs per event")
    for part, count in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{100 * count / total:6.1f} %  {count / total * cpu_us_per_event:7.1f}  {part}")
    for title, table in (("own", own), ("cumulative", cumulative)):
        print(f"\ntop {top} by {title} time: % of GIL samples, µs per event, function (file)")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            share = count / total
            print(f"{100 * share:6.1f} %  {share * cpu_us_per_event:7.1f}  {frame}")


def summarise_cprofile(path: Path, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    for key in ("tottime", "cumulative"):
        print(f"\ntop {top} by {key}:")
        stats.sort_stats(key).print_stats(top)


# --- the report ------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


Pairs = list[tuple[dict[str, Any], dict[str, Any]]]  # (relay, plain) of each run


def report(results: list[dict[str, Any]]) -> None:
    keys = sorted({(r["case"], r["rate"]) for r in results}, key=lambda k: (k[0] == "all", k))

    def pairs(case: str, rate: float) -> Pairs:
        by_run: dict[int, dict[str, dict[str, Any]]] = {}
        for r in results:
            if r["case"] == case and r["rate"] == rate:
                by_run.setdefault(r["run"], {})[r["side"]] = r
        return [(v["relay"], v["plain"]) for v in by_run.values() if len(v) == 2]

    print("\nlatency, engine timeNano -> destination (ms), medians over runs; Δ = relay - plain")
    print(
        f"{'case':8} {'rate':>5} {'sink':8} | {'relay p50':>9} {'p99':>6} {'max':>6} {'loss':>5} | "
        f"{'plain p50':>9} {'p99':>6} {'max':>6} {'loss':>5} | {'Δp50':>6} {'Δp99':>6} {'runs':>4}"
    )
    for case, rate in keys:
        ps = pairs(case, rate)
        for sink in ps[0][0]["sinks"] if ps else ():

            def m(side: int, what: str, s: str = sink, ps: Pairs = ps) -> float:
                return med([p[side]["sinks"][s][what] for p in ps])

            def d(what: str, s: str = sink, ps: Pairs = ps) -> float:
                return med([p[0]["sinks"][s][what] - p[1]["sinks"][s][what] for p in ps])

            print(
                f"{case:8} {rate:5g} {sink:8} | {m(0, 'p50_ms'):9.2f} {m(0, 'p99_ms'):6.2f} "
                f"{m(0, 'max_ms'):6.1f} {m(0, 'loss'):5g} | {m(1, 'p50_ms'):9.2f} "
                f"{m(1, 'p99_ms'):6.2f} {m(1, 'max_ms'):6.1f} {m(1, 'loss'):5g} | "
                f"{d('p50_ms'):+6.2f} {d('p99_ms'):+6.2f} {len(ps):4}"
            )
    print("\nCPU-seconds per 1,000 events (% of a core), medians over runs; ratio = relay / plain")
    print(
        f"{'case':8} {'rate':>5} | {'relay':>7} {'(%)':>6} | {'plain':>7} {'(%)':>6} | "
        f"{'ratio':>5} {'runs':>4}"
    )
    for case, rate in keys:
        ps = pairs(case, rate)
        if not ps:
            continue
        print(
            f"{case:8} {rate:5g} | {med([p[0]['cpu_s_per_1000'] for p in ps]):7.3f} "
            f"{med([p[0]['core_pct'] for p in ps]):6.1f} | "
            f"{med([p[1]['cpu_s_per_1000'] for p in ps]):7.3f} "
            f"{med([p[1]['core_pct'] for p in ps]):6.1f} | "
            f"{med([p[0]['cpu_s_per_1000'] / p[1]['cpu_s_per_1000'] for p in ps]):5.2f} "
            f"{len(ps):4}"
        )
    loads = [x for r in results for x in r["load1"]]
    if loads:
        print(
            f"\n1-minute load average over the runs (2 cores): min {min(loads):.2f}, "
            f"median {med(loads):.2f}, max {max(loads):.2f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=5000, help="volume creations per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="100,500", help="events/s, comma-separated")
    parser.add_argument("--sinks", default=",".join(SINKS))
    parser.add_argument("--all-rate", type=float, default=500.0, help="rate of the all-sink case")
    parser.add_argument("--no-all", action="store_true", help="skip the all-sink case")
    parser.add_argument("--profile", action="store_true", help="profile the all-sink relay")
    parser.add_argument("--profile-only", action="store_true", help="only the profile run")
    parser.add_argument("--profiler", choices=["py-spy", "cprofile"], default="py-spy")
    parser.add_argument("--profile-events", type=int, default=10000)
    parser.add_argument("--profile-out", help="keep the profile (raw stacks or pstats) here")
    parser.add_argument("--spy-rate", type=int, default=250, help="py-spy samples/s")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--deadline", type=float, default=10.0, help="s after the last creation")
    parser.add_argument("--tree", default=str(REPO), help="the relay source tree to run")
    parser.add_argument("--out", help="write every run's figures to this JSON file")
    parser.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="RELAY_X=V",
        help="a setting for the relay, e.g. RELAY_SPOOL__DURABLE=false (repeatable; the "
        "figures are then not the defaults')",
    )
    parser.add_argument(
        "--sink-option",
        action="append",
        default=[],
        metavar="SINK.KEY=JSON",
        help="a relay sink setting, e.g. kafka.linger_ms=0 (repeatable; not the defaults then)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and state (in /tmp)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]
    sinks = [s for s in args.sinks.split(",") if s]
    if unknown := set(sinks) - set(SINKS):
        parser.error(f"unknown sinks: {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="vp-", dir="/tmp") as tmp_name:
        tmp = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp") if args.keep else tmp_name)
        bench = Bench(args, tmp)
        print(
            f"relay tree {bench.tree}; docker CLI {bench.docker}; python "
            f"{sys.version.split()[0]}; load average at start "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            flush=True,
        )
        stops: list[Callable[[], None]] = []
        # A bench started in the background ignores SIGINT: SIGTERM stops it, cleaning up.
        this = asyncio.current_task()
        assert this is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
        try:
            for service in (bench.engine, bench.mosquitto, bench.tansu):
                service.start()
                stops.insert(0, service.stop)
            await bench.dest.start()
            if not args.profile_only:
                for rate in rates:
                    for run in range(args.runs):
                        for i, sink in enumerate(sinks):
                            order = ("relay", "plain") if (run + i) % 2 == 0 else ("plain", "relay")
                            for side in order:
                                await bench.run_side(side, sink, [sink], rate, run)
                if not args.no_all:
                    for run in range(args.runs):
                        order = ("relay", "plain") if run % 2 == 0 else ("plain", "relay")
                        for side in order:
                            await bench.run_side(side, "all", list(SINKS), args.all_rate, run)
                report(bench.results)
                if args.out:
                    text = json.dumps(bench.results, indent=1)
                    await asyncio.to_thread(Path(args.out).write_text, text)
            if args.profile or args.profile_only:
                await bench.profile(args.all_rate)
        finally:
            await bench.dest.aclose()
            for stop in stops:
                stop()


if __name__ == "__main__":
    asyncio.run(main())
