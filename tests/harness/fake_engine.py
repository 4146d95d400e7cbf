"""A fake Docker Engine, for input no real engine can produce: an aiohttp server on a unix socket.

It answers what the relay asks of an engine (through aiodocker): `GET /version` (unversioned,
for the API version negotiation), `/vX.Y/info` (ID, Name, SystemTime), `/vX.Y/version`,
`/_ping`, and `GET /vX.Y/events`, whose stream stays open (like the real one: no heartbeat)
and carries only what the test writes into it, byte for byte: `await engine.write(b"...")`
goes out as one chunk of the chunked body, so a test decides where reads may split lines.
Everything else is 404, and every request is recorded.

Real engines for everything a real engine can do: see tests/harness/engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .wait import async_wait_for

# Unix socket paths are limited to 107 bytes.
_MAX_UNIX_PATH = 107


@dataclass
class Stream:
    """One `GET /events` the relay opened."""

    query: dict[str, str]
    response: web.StreamResponse
    done: asyncio.Future[None]
    bytes_sent: int = 0


@dataclass
class FakeEngine:
    socket_path: Path
    engine_id: str = "FAKE:ENGINE:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000"
    name: str = "fake-engine"
    version: str = "20.10.24"
    api_version: str = "1.41"
    requests: list[tuple[str, str]] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        if len(str(self.socket_path).encode()) > _MAX_UNIX_PATH:
            raise ValueError(f"{self.socket_path} is too long for a unix socket")

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.middlewares.append(self._record)
        for prefix in ("", "/{api:v[0-9.]+}"):
            app.router.add_get(f"{prefix}/_ping", self._ping)
            app.router.add_get(f"{prefix}/version", self._version)
        app.router.add_get("/{api:v[0-9.]+}/info", self._info)
        app.router.add_get("/{api:v[0-9.]+}/events", self._events)
        # Short shutdown: streams are ended first (stop), nothing else is slow.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()
        return self

    async def stop(self) -> None:
        for stream in self.streams:
            if not stream.done.done():
                stream.done.set_result(None)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def __aenter__(self) -> FakeEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what the test does ----------------------------------------------------------------------

    async def wait_streams(self, count: int = 1, timeout: float = 30) -> Stream:  # noqa: ASYNC109
        """The `count`-th event stream, once the relay opened it."""
        await async_wait_for(
            lambda: len(self.streams) >= count,
            timeout,
            message=f"the relay opening event stream #{count}",
        )
        return self.streams[count - 1]

    async def write(self, data: bytes) -> None:
        """Out on the newest event stream as one chunk; returns once the socket took it."""
        if not self.streams:
            raise AssertionError("no event stream is open")
        stream = self.streams[-1]
        await stream.response.write(data)
        stream.bytes_sent += len(data)

    async def write_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            await self.write(chunk)

    # -- the engine's API ------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        response: web.StreamResponse = await handler(request)
        return response

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="OK", headers={"Api-Version": self.api_version})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "Version": self.version,
                "ApiVersion": self.api_version,
                "MinAPIVersion": "1.12",
                "Os": "linux",
                "Arch": "amd64",
            }
        )

    async def _info(self, request: web.Request) -> web.Response:
        now = time.time_ns()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9))
        return web.json_response(
            {
                "ID": self.engine_id,
                "Name": self.name,
                "ServerVersion": self.version,
                "SystemTime": f"{stamp}.{now % 10**9:09d}Z",
            }
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        # As the engine sends it: JSON lines in a chunked body that never ends by itself.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        stream = Stream(dict(request.query), response, asyncio.get_running_loop().create_future())
        self.streams.append(stream)
        await stream.done
        return response
