"""Reader + normalize + encode throughput, and the relay's RSS after 100,000 events.

    .venv/bin/python -m bench.bench_pipeline [--events 100000] [--runs 5]

1. floor: a hand-rolled loop over the same recorded events (orjson decode, split the action,
   build the CloudEvent dict, orjson encode), one core;
2. relay: the relay's own framing (LineFramer) + Normalizer + Event.json() on the same bytes,
   one core; the figure is its ratio to the floor, measured in the same run;
3. process: `docker-event-relay run` (stdout sink to /dev/null) reading the recorded events
   from a stand-in engine over a unix socket: events/s end to end with the engine sending as
   fast as the relay reads, and RSS after them; then RSS with the engine paced at
   --paced-rate events/s (still above what a real engine emits).
Medians of --runs runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from bench.replay_engine import recorded_stream
from relay.engine import LineFramer
from relay.normalize import Normalizer
from relay.schema import Engine, Event

REPO = Path(__file__).resolve().parents[1]


def floor(lines: list[bytes]) -> float:
    started = time.perf_counter()
    out = 0
    for line in lines:
        m = orjson.loads(line)
        action, _, detail = m["Action"].partition(": ")
        actor = m["Actor"]
        tn = m["timeNano"]
        ce = {
            "specversion": "1.0",
            "id": hashlib.blake2b(
                f"E{tn}{m['Type']}{m['Action']}{actor['ID']}".encode(), digest_size=16
            ).hexdigest(),
            "source": "urn:docker:engine:E",
            "type": f"x.{m['Type']}.{action}",
            "time": tn,
            "datacontenttype": "application/json",
            "data": {
                "type": m["Type"],
                "action": action,
                "action_detail": detail or None,
                "time_nano": tn,
                "actor": actor,
                "scope": m.get("scope"),
            },
        }
        out += len(orjson.dumps(ce))
    return len(lines) / (time.perf_counter() - started)


def relay_path(stream: bytes, count: int) -> float:
    normalizer = Normalizer(Engine(id="E", name="bench", version="28.5.2", api_version="1.51"))
    framer = LineFramer()
    started = time.perf_counter()
    n = 0
    for i in range(0, len(stream), 65536):
        for line in framer.feed(stream[i : i + 65536]):
            n += len(Event(normalizer.normalize(line)).json())
    return count / (time.perf_counter() - started)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def process_run(count: int, port: int, rate: float = 0.0) -> tuple[float, float, float, float]:
    """(events/s end to end, RSS MB once connected, RSS MB after `count` events, events/s
    from the first delivery on); the stand-in engine sends at `rate` events/s (0: as fast as
    the relay reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/engine.sock"
        engine = subprocess.Popen(
            [sys.executable, "-m", "bench.replay_engine", sock, str(count), str(rate)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert engine.stdout is not None and engine.stdout.readline().strip() == b"ready"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_ENGINE__HOST=f"unix://{sock}",
            RELAY_STATE_DIR=f"{tmp}/state",
            RELAY_HTTP__PORT=str(port),
            RELAY_HTTP__HOST="127.0.0.1",
        )
        started = time.perf_counter()
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rss_start = 0.0
        first: tuple[float, float] | None = None
        try:
            while True:
                try:
                    delivered = metric(port, "relay_events_delivered_total")
                except OSError:
                    delivered = 0
                if not rss_start and delivered:
                    rss_start = rss_kb(relay.pid) / 1024
                if first is None and delivered:
                    first = (time.perf_counter(), delivered)
                if delivered >= count:
                    break
                if time.perf_counter() - started > 300:
                    raise SystemExit("relay did not deliver in 300 s")
                time.sleep(0.02)
            ended = time.perf_counter()
            elapsed = ended - started
            assert first is not None
            steady = (count - first[1]) / max(ended - first[0], 1e-9)
            rss_after = rss_kb(relay.pid) / 1024
        finally:
            relay.terminate()
            relay.wait(30)
            engine.terminate()
            engine.wait(10)
    return count / elapsed, rss_start, rss_after, steady


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=19478)
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=5000.0,
        help="events/s of the paced run (a fast real engine emits ~1,400)",
    )
    args = parser.parse_args()
    lines_nl = recorded_stream(args.events)
    lines = [line.rstrip(b"\n") for line in lines_nl]
    stream = b"".join(lines_nl)
    floors, relays, procs, steadies, rsss, paced_start, paced_rss = [], [], [], [], [], [], []
    for _ in range(args.runs):
        floors.append(floor(lines))
        relays.append(relay_path(stream, args.events))
        rate, _, rss, steady = process_run(args.events, args.port)
        procs.append(rate)
        steadies.append(steady)
        rsss.append(rss)
        _, start, after, _ = process_run(args.events, args.port, args.paced_rate)
        paced_start.append(start)
        paced_rss.append(after)
    med = statistics.median
    print(f"events per run: {args.events}, runs: {args.runs} (medians; min-max)")
    print(
        f"floor  (orjson hand-rolled)        : {med(floors):>10,.0f} events/s "
        f"({min(floors):,.0f}-{max(floors):,.0f})"
    )
    print(
        f"relay  (framing+normalize+encode)  : {med(relays):>10,.0f} events/s "
        f"({min(relays):,.0f}-{max(relays):,.0f})"
    )
    ratios = [r / f for r, f in zip(relays, floors, strict=True)]
    print(
        f"ratio relay/floor                  : {med(relays) / med(floors):.2f} "
        f"(median of per-run ratios: {med(ratios):.2f})"
    )
    print(
        f"process end to end (stdout sink)   : {med(procs):>10,.0f} events/s "
        f"({min(procs):,.0f}-{max(procs):,.0f}), includes start-up"
    )
    print(
        f"process from the first delivery on  : {med(steadies):>10,.0f} events/s "
        f"({min(steadies):,.0f}-{max(steadies):,.0f}), start-up excluded"
    )
    print(
        f"process RSS after {args.events:,} flooded events: {med(rsss):.1f} MB "
        f"({min(rsss):.1f}-{max(rsss):.1f}); the backlog of a reader faster than the sink"
    )
    print(
        f"process RSS at {args.paced_rate:,.0f} events/s: {med(paced_start):.1f} MB at the first"
        f" event, {med(paced_rss):.1f} MB after {args.events:,} "
        f"({min(paced_rss):.1f}-{max(paced_rss):.1f})"
    )


if __name__ == "__main__":
    main()
