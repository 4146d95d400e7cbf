"""Load for the latency benchmarks: volume creations on a real engine at a paced rate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp


async def paced_volume_creates(socket_path: Path, rate: float, total: int, prefix: str) -> float:
    """Create `total` volumes through the engine's API, the i-th request leaving at
    start + i/rate (not after the previous one: one client cannot reach 500/s serially, so up
    to 32 are in flight). Returns the rate achieved."""
    conn = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=conn) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        slots = asyncio.Semaphore(32)

        async def create(i: int) -> None:
            async with (
                slots,
                http.post(
                    "http://docker/v1.41/volumes/create", json={"Name": f"{prefix}-{i}"}
                ) as resp,
            ):
                resp.raise_for_status()

        tasks = []
        for i in range(total):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(create(i)))
        await asyncio.gather(*tasks)
        return total / (loop.time() - start)
