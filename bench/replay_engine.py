"""A stand-in engine for benchmarks: serves /info, /version and a /events stream of recorded
real engine messages over a unix socket, as fast as the client reads. Benchmarks only: the
tests use real engines."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def recorded_stream(count: int) -> list[bytes]:
    """`count` recorded messages with increasing timeNano (so every one is a distinct event)."""
    lines = [
        json.loads(line)
        for name in ("engine-20.10.24-events.jsonl", "engine-28.5.2-events.jsonl")
        for line in (FIXTURES / name).read_text().splitlines()
        if line.strip()
    ]
    out = []
    base = 1_800_000_000_000_000_000
    for i, msg in enumerate(itertools.islice(itertools.cycle(lines), count)):
        msg = dict(msg, timeNano=base + i * 1000, time=(base + i * 1000) // 10**9)
        out.append(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
    return out


async def serve(socket_path: str, count: int, rate: float = 0.0) -> None:
    """`rate` events/s (0: as fast as the client reads)."""
    body = recorded_stream(count)

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {"ID": "BENCH:ENGINE", "Name": "bench", "SystemTime": "2027-01-15T08:00:00.000000000Z"}
        )

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"Version": "28.5.2", "ApiVersion": "1.51"})

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        step = 256 if rate <= 0 else max(1, int(rate / 100))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(0, len(body), step):
            await resp.write(b"".join(body[i : i + step]))
            if rate > 0:
                # Pace to `rate`: sleep until this batch's due time.
                await asyncio.sleep(max(0.0, started + (i + step) / rate - loop.time()))
        # Then idle, like an engine with nothing to report.
        await asyncio.Event().wait()
        return resp

    app = web.Application()
    for prefix in ("", "/v1.51", "/v1.41"):
        app.router.add_get(prefix + "/info", info)
        app.router.add_get(prefix + "/version", version)
        app.router.add_get(prefix + "/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, socket_path).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(
        serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    )
