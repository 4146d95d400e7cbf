"""Webhook sink throughput into a local aiohttp receiver, against a plain aiohttp client loop
posting the same bodies with the same headers in the same run.

    cd /work/main && .venv/bin/python bench/bench_webhook.py [--events N] [--runs R]

Single (binary mode, one request per event, concurrency 1 and 4) and batch mode (max_batch
100). The baseline posts pre-built bodies and headers (encoding done before the clock starts),
so the ratio shows what the sink's own work costs: header building, signing, classification.
Figures are medians over R runs; the receiver runs in the same process and event loop, so
absolute numbers are a floor, the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.sink import SinkContext
from sinks.webhook import (
    BATCH_CONTENT_TYPE,
    WebhookSinkConfig,
    binary_headers,
    sign,
)
from tests.contract import sample_events

SECRET = "bench-secret"


async def start_receiver() -> tuple[web.AppRunner, int, list[int]]:
    seen = [0]

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen[0] += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, seen


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def run_case(
    url: str, n: int, mode: str, concurrency: int, signed: bool
) -> tuple[float, float]:
    """(sink events/s, baseline events/s) for one run."""
    events = sample_events(n)
    max_batch = 100
    values: dict[str, object] = {
        "url": url,
        "mode": mode,
        "concurrency": concurrency,
        "max_batch": max_batch,
    }
    if signed:
        values["secret"] = SECRET
    sink = WebhookSinkConfig.model_validate(values).build(SinkContext("bench"))
    await sink.start()
    batches = [events[i : i + max_batch] for i in range(0, n, max_batch)]

    async def through_sink() -> None:
        for batch in batches:
            await sink.send(batch)

    # Encode once for both sides (Event caches its encodings), outside the clock.
    for e in events:
        e.json()
        e.data_json()
    t_sink = await timed(through_sink)
    await sink.aclose()

    if mode == "batch":
        bodies = [b"[" + b",".join(e.json() for e in b) + b"]" for b in batches]
        headers = [{"Content-Type": BATCH_CONTENT_TYPE} for _ in batches]
    else:
        bodies = [e.data_json() for e in events]
        headers = [binary_headers(e) for e in events]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def post(i: int) -> None:
            h = headers[i]
            if signed:
                h = {**h, "X-Relay-Signature": sign(SECRET.encode(), bodies[i], int(time.time()))}
            async with client.post(url, data=bodies[i], headers=h) as resp:
                await resp.read()
                assert resp.status == 204

        async def baseline() -> None:
            if concurrency == 1:
                for i in range(len(bodies)):
                    await post(i)
                return
            # Same shape as the sink: a batch at a time, `concurrency` requests in flight.
            limit = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with limit:
                    await post(i)

            for start in range(0, len(bodies), max_batch):
                await asyncio.gather(
                    *(one(i) for i in range(start, min(start + max_batch, len(bodies))))
                )

        t_base = await timed(baseline)
    return n / t_sink, n / t_base


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runner, port, _ = await start_receiver()
    url = f"http://127.0.0.1:{port}/hook"
    cases = [
        ("binary, concurrency 1", "binary", 1, False, args.events),
        ("binary, concurrency 4", "binary", 4, False, args.events),
        ("binary, concurrency 1, signed", "binary", 1, True, args.events),
        ("batch of 100", "batch", 1, False, args.events * 10),
        ("batch of 100, signed", "batch", 1, True, args.events * 10),
    ]
    print(
        f"{'case':32} {'sink ev/s':>10} {'plain ev/s':>11} {'ratio':>6}   (median of {args.runs})"
    )
    try:
        for label, mode, conc, signed, n in cases:
            await run_case(url, min(n, 500), mode, conc, signed)  # warm-up
            results = [await run_case(url, n, mode, conc, signed) for _ in range(args.runs)]
            sink_rate = statistics.median(r[0] for r in results)
            base_rate = statistics.median(r[1] for r in results)
            ratio = statistics.median(r[0] / r[1] for r in results)
            print(f"{label:32} {sink_rate:10.0f} {base_rate:11.0f} {ratio:6.2f}")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
