"""Lines on stdin to a webhook, one POST per line: the plain tool the relay's webhook sink is
measured against.

    docker events --format '{{json .}}' | python bench/plain/webhook_forward.py URL

One aiohttp session, one request at a time (the webhook sink's default concurrency of 1, one
request per event as in its default binary mode), each line the body as it came. Exits at the
end of stdin.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp


async def forward(url: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    headers = {"Content-Type": "application/json"}
    failed = 0
    async with aiohttp.ClientSession() as http:
        while line := await reader.readline():
            try:
                async with http.post(url, data=line.rstrip(b"\n"), headers=headers) as resp:
                    await resp.read()
                    failed += resp.status >= 300
            except aiohttp.ClientError:
                failed += 1
    if failed:
        print(f"webhook_forward: {failed} requests failed", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(forward(sys.argv[1]))
