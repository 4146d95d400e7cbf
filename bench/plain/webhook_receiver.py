"""The bench's webhook destination, in its own process: answers 204 to every POST and prints
`<arrival time_ns> <body>` per request on stdout (bodies are one-line JSON: the relay's v1 data
in binary mode, the docker CLI's line from the plain forwarder).

    python bench/plain/webhook_receiver.py PORT

Prints `ready` once listening. Its own process, so that the Kafka consumer sharing the bench's
event loop does not slow the answers the relay and the plain forwarder wait for.
"""

from __future__ import annotations

import sys
import time

from aiohttp import web

out = sys.stdout.buffer


async def handle(request: web.Request) -> web.Response:
    body = await request.read()
    out.write(b"%d %s\n" % (time.time_ns(), body.replace(b"\n", b" ")))
    out.flush()
    return web.Response(status=204)


async def ready(_app: web.Application) -> None:
    out.write(b"ready\n")
    out.flush()


if __name__ == "__main__":
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    app.on_startup.append(ready)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
