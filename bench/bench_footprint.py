"""CPU and memory of the relay process: idle, and at a paced event rate, with all three sinks.

    cd /work/main && .venv/bin/python bench/bench_footprint.py [--runs 3] [--idle 30]
        [--load 20] [--rate 500]

Everything is real and local: a private Docker Engine (20.10), tansu (Kafka protocol),
Mosquitto, and an aiohttp webhook receiver in its own process. The relay runs as an operator
runs it (`python -m relay run`, configured by env); its CPU time comes from
/proc/<pid>/stat (utime + stime) over the window, its memory from /proc/<pid>/status (VmRSS
at the end of the window, VmHWM the peak). Load: another process creates and removes volumes
at a paced rate (one create + one destroy event per volume). Baseline in the same run: the
same relay with only the stdout sink (no client library imported). Medians over --runs runs,
a fresh relay process each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import Mosquitto, PrivateEngine, Tansu, free_port, wait_for  # noqa: E402
from tests.harness.engine import SYSTEM_DOCKERD  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

RECEIVER = """
import sys
from aiohttp import web
async def handle(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post("/hook", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

# Paced: every tick, create then remove a slice of volumes; 2 events per volume.
GENERATOR = """
import asyncio, sys, time, aiodocker
host, rate, seconds, tag = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
TICK = 0.05
async def main():
    async with aiodocker.Docker(url=host) as docker:
        per_tick = rate * TICK / 2
        start = time.monotonic()
        done = 0.0
        i = 0
        while time.monotonic() - start < seconds:
            done += per_tick
            names = [f"fp-{tag}-{j}" for j in range(i, int(done))]
            i = int(done)
            vols = await asyncio.gather(*(docker.volumes.create({"Name": n}) for n in names))
            await asyncio.gather(*(v.delete() for v in vols))
            next_tick = start + (int((time.monotonic() - start) / TICK) + 1) * TICK
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        print(2 * i)
asyncio.run(main())
"""

# The import floor: a Python that imports what the relay with all three sinks loads (the core,
# the adapters and their client libraries) and does nothing. Idle RSS is compared with it.
IMPORT_FLOOR = """
import sys
import relay.app, relay.cli, relay.plugins
import sinks.kafka, sinks.mqtt, sinks.webhook, sinks.stdout
import aiokafka, aiohttp, aiodocker, paho.mqtt.client
print("ready", flush=True)
sys.stdin.read()
"""


def import_floor_mb() -> float:
    proc = subprocess.Popen(
        [sys.executable, "-c", IMPORT_FLOOR],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return memory_mb(proc.pid)[0]
    finally:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def memory_mb(pid: int) -> tuple[float, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(get(port, "/metrics")[1]):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


class RelayProcess:
    def __init__(self, engine: PrivateEngine, sinks: list[dict[str, Any]], state: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            DOCKER_HOST=engine.docker_host,
            RELAY_SINKS=json.dumps(sinks),
            RELAY_STATE_DIR=str(state),
            RELAY_HTTP__HOST="127.0.0.1",
            RELAY_HTTP__PORT=str(self.port),
            RELAY_LOG__LEVEL="WARNING",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(
            lambda: (
                (self.proc.poll() is None and get(self.port, "/readyz")[0] == 200)
                or self.proc.poll() is not None
            ),
            60,
            message="relay ready",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def window(pid: int, seconds: float) -> tuple[float, float, float]:
    """CPU % of one core over `seconds`, RSS at the end and peak RSS (MB)."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    c1, t1 = cpu_seconds(pid), time.monotonic()
    rss, hwm = memory_mb(pid)
    return 100 * (c1 - c0) / (t1 - t0), rss, hwm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=30.0, help="idle window (s)")
    parser.add_argument("--load", type=float, default=20.0, help="load window (s)")
    parser.add_argument("--rate", type=float, default=500.0, help="events/s under load")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fp-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        engine = PrivateEngine("20.10", SYSTEM_DOCKERD, tmp / "e")
        tansu = Tansu(tmp / "tansu")
        mosquitto = Mosquitto(tmp / "mosquitto")
        receiver_port = free_port()
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(receiver_port)])
        try:
            engine.start()
            tansu.start()
            mosquitto.start()
            wait_for(lambda: get(receiver_port, "/")[0] != 0, 30, message="receiver up")
            all_three = [
                {
                    "type": "kafka",
                    "name": "kafka",
                    "bootstrap_servers": [tansu.bootstrap],
                    "enable_idempotence": False,
                },  # tansu lacks InitProducerId (DESIGN.md 5)
                {"type": "mqtt", "name": "mqtt", "host": "127.0.0.1", "port": mosquitto.port},
                {
                    "type": "webhook",
                    "name": "webhook",
                    "mode": "batch",
                    "url": f"http://127.0.0.1:{receiver_port}/hook",
                },
            ]
            results: dict[str, list[tuple[float, float, float]]] = {
                "idle, stdout only (baseline)": [],
                "idle, kafka+mqtt+webhook": [],
                f"{args.rate:g} events/s, kafka+mqtt+webhook": [],
            }
            rates: list[float] = []
            floors: list[float] = []
            for run in range(args.runs):
                floors.append(import_floor_mb())
                devnull_sink = [{"type": "stdout", "name": "stdout"}]
                relay = RelayProcess(engine, devnull_sink, tmp / f"s{run}a")
                time.sleep(3)  # settle after start-up before the window opens
                results["idle, stdout only (baseline)"].append(window(relay.proc.pid, args.idle))
                relay.stop()

                relay = RelayProcess(engine, all_three, tmp / f"s{run}b")
                time.sleep(3)
                results["idle, kafka+mqtt+webhook"].append(window(relay.proc.pid, args.idle))
                read0 = metric(relay.port, "relay_events_read_total")
                gen = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        GENERATOR,
                        engine.docker_host,
                        str(args.rate),
                        str(args.load + 2),
                        f"{run}",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(1)  # the generator's own start-up
                results[f"{args.rate:g} events/s, kafka+mqtt+webhook"].append(
                    window(relay.proc.pid, args.load)
                )
                read1 = metric(relay.port, "relay_events_read_total")
                gen.wait(120)
                rates.append((read1 - read0) / args.load)
                sent = float(gen.stdout.read().strip() or 0)  # type: ignore[union-attr]
                for sink in ("kafka", "mqtt", "webhook"):
                    wait_for(
                        lambda s=sink, port=relay.port, n=sent: (
                            metric(port, "relay_events_delivered_total", sink=s) >= n
                        ),
                        120,
                        message=f"{sink} delivered all",
                    )
                relay.stop()
                print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        finally:
            receiver.terminate()
            receiver.wait()
            mosquitto.stop()
            tansu.stop()
            engine.stop()

    print(
        f"relay footprint, medians of {args.runs} runs (idle window {args.idle:g} s, "
        f"load window {args.load:g} s); python {sys.version.split()[0]}"
    )
    print(f"{'case':<42} {'CPU % of a core':>16} {'RSS MB':>8} {'peak RSS MB':>12}")
    for case, values in results.items():
        cpu = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        hwm = statistics.median(v[2] for v in values)
        print(f"{case:<42} {cpu:>16.2f} {rss:>8.1f} {hwm:>12.1f}")
    floor_mb = statistics.median(floors)
    idle_mb = statistics.median(v[1] for v in results["idle, kafka+mqtt+webhook"])
    print(
        f"import floor (core, adapters, client libraries imported; nothing running): "
        f"{floor_mb:.1f} MB; idle kafka+mqtt+webhook is {idle_mb - floor_mb:+.1f} MB above it"
    )
    print(f"measured event rate read under load: median {statistics.median(rates):.0f} events/s")


if __name__ == "__main__":
    main()
