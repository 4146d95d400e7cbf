"""Kafka sink benchmark against tansu (a real Kafka-protocol broker), started here.

1. Throughput: recorded engine events through the relay's delivery path (outbox + SinkWorker +
   KafkaSink) against a plain aiokafka producer loop sending the same records (same topic,
   key, value, headers; the same batch size, awaiting every future) in the same run. The
   ratio relay/plain is the figure; medians over --runs.
2. Latency: a private engine (tests/harness) emits ~--rate volume creations/s through its API;
   the real relay reads, normalizes and sends them; a consumer records its receipt time.
   Latency = receipt - the engine's timeNano (p50/p99).

    .venv/bin/python bench/bench_kafka.py [--events 20000] [--runs 5] [--rate 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from bench.load import paced_volume_creates  # noqa: E402
from bench.worker import delivered, delivery_path, feed  # noqa: E402
from relay.sink import SinkContext  # noqa: E402
from sinks.kafka import KafkaSink, KafkaSinkConfig  # noqa: E402
from tests.contract import sample_events  # noqa: E402
from tests.harness import PrivateEngine, Tansu, known_engines  # noqa: E402


def sink_config(bootstrap: str, topic: str, **extra: object) -> KafkaSinkConfig:
    return KafkaSinkConfig(
        bootstrap_servers=bootstrap,
        topic=topic,
        enable_idempotence=False,  # tansu cannot (DESIGN.md section 5)
        **extra,  # type: ignore[arg-type]
    )


async def relay_path(bootstrap: str, events: list, batch: int, workdir: Path) -> float:
    sink = KafkaSink(
        sink_config(bootstrap, f"bench-r-{uuid.uuid4().hex[:8]}", max_batch=batch),
        SinkContext("bench"),
    )
    await sink.start()
    # Warm the topic's metadata so both paths start alike.
    await sink.send(events[:1])
    async with delivery_path(sink, workdir) as worker:
        t0 = time.perf_counter()
        feed(worker, events)
        await delivered(worker, len(events))
        elapsed = time.perf_counter() - t0
    await sink.aclose()
    return len(events) / elapsed


async def plain_path(bootstrap: str, events: list, batch: int) -> float:
    topic = f"bench-p-{uuid.uuid4().hex[:8]}"
    encoder = KafkaSink(sink_config(bootstrap, topic), SinkContext("bench"))
    records = [(*encoder.encode(e), e.time_nano // 1_000_000) for e in events]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", linger_ms=5
    )
    await producer.start()
    t_, k_, v_, h_, ts_ = records[0]
    await (await producer.send(t_, v_, key=k_, headers=h_, timestamp_ms=ts_))
    t0 = time.perf_counter()
    for start in range(0, len(records), batch):
        futures = [
            await producer.send(t, v, key=k, headers=h, timestamp_ms=ts)
            for t, k, v, h, ts in records[start : start + batch]
        ]
        await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    await producer.stop()
    return len(events) / elapsed


async def throughput(bootstrap: str, n: int, runs: int, batch: int, workdir: Path) -> dict:
    relay_rates, plain_rates, ratios = [], [], []
    for _ in range(runs):
        events = sample_events(n)
        # Alternate which goes first so neither always gets the warmer broker.
        if len(relay_rates) % 2:
            p = await plain_path(bootstrap, events, batch)
            r = await relay_path(bootstrap, events, batch, workdir)
        else:
            r = await relay_path(bootstrap, events, batch, workdir)
            p = await plain_path(bootstrap, events, batch)
        relay_rates.append(r)
        plain_rates.append(p)
        ratios.append(r / p)
        print(f"  run: relay {r:,.0f} ev/s, plain aiokafka {p:,.0f} ev/s, ratio {r / p:.2f}")
    return {
        "relay_eps_median": statistics.median(relay_rates),
        "plain_eps_median": statistics.median(plain_rates),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }


async def latency(bootstrap: str, rate: int, seconds: float, workdir: Path) -> dict:

    from tests.relay_harness import relay_settings, running_relay

    spec = known_engines()[0]
    engine = PrivateEngine(spec.name, spec.dockerd_path, Path(tempfile.mkdtemp(dir="/tmp")))
    engine.start()
    topic = f"bench-lat-{uuid.uuid4().hex[:8]}"
    received: list[tuple[int, int]] = []
    try:
        settings = relay_settings(
            engine.docker_host,
            workdir / "state",
            sinks=[
                {
                    "type": "kafka",
                    "bootstrap_servers": bootstrap,
                    "topic": topic,
                    "enable_idempotence": False,
                    "filter": {"types": ["volume"]},
                }
            ],
        )
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            metadata_max_age_ms=500,
            fetch_max_wait_ms=10,
        )
        await consumer.start()
        stop = asyncio.Event()

        async def consume() -> None:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=50)
                now = time.time_ns()
                for messages in batches.values():
                    for m in messages:
                        received.append((now, json.loads(m.value)["time_nano"]))

        async with running_relay(settings):
            reader = asyncio.create_task(consume())
            sent = int(rate * seconds)
            actual_rate = await paced_volume_creates(engine.socket_path, rate, sent, "lat")
            deadline = time.monotonic() + 30
            while len(received) < sent and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a consumer's progress
                await asyncio.sleep(0.05)
            stop.set()
            await reader
        await consumer.stop()
    finally:
        engine.stop()
    lat_ms = sorted((r - t) / 1e6 for r, t in received)
    q = statistics.quantiles(lat_ms, n=100)
    return {
        "engine": spec.name,
        "sent": sent,
        "received": len(received),
        "rate": actual_rate,
        "p50_ms": q[49],
        "p99_ms": q[98],
        "max_ms": lat_ms[-1],
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    broker = Tansu(workdir / "tansu")
    broker.start()
    try:
        print(f"throughput: {args.events} recorded events x {args.runs} runs, batch {args.batch}")
        t = await throughput(broker.bootstrap, args.events, args.runs, args.batch, workdir)
        print(
            f"THROUGHPUT relay {t['relay_eps_median']:,.0f} ev/s | plain aiokafka "
            f"{t['plain_eps_median']:,.0f} ev/s | ratio median {t['ratio_median']:.2f} "
            f"(runs: {', '.join(f'{r:.2f}' for r in t['ratios'])})"
        )
        if not args.skip_latency:
            lat = await latency(broker.bootstrap, args.rate, args.seconds, workdir)
            print(
                f"LATENCY engine {lat['engine']}: {lat['sent']} events at {lat['rate']:.0f}/s, "
                f"received {lat['received']}: p50 {lat['p50_ms']:.1f} ms, "
                f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms"
            )
    finally:
        broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
