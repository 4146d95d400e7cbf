"""The relay's own HTTP port: /metrics (Prometheus), /healthz (alive), /readyz (useful)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.errors import RelayError
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics

log = logging.getLogger("relay.http")


class HttpServer:
    def __init__(
        self, host: str, port: int, metrics: Metrics, readiness: Callable[[], tuple[bool, str]]
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.readiness = readiness
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def run(self, task_status: TaskStatus) -> None:
        """The HTTP component: ready once the port is bound; serves until cancelled."""
        await self.start()
        try:
            task_status.started()
            await asyncio.Event().wait()
        finally:
            await self.aclose()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise RelayError(
                f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(set RELAY_HTTP__PORT, or RELAY_HTTP__ENABLED=false)"
            ) from exc
        self.bound_port = self._runner.addresses[0][1]
        log.info("serving /metrics, /healthz, /readyz on %s:%s", self.host, self.bound_port)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reason = self.readiness()
        return web.Response(status=200 if ready else 503, text=reason + "\n")
