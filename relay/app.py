"""Wiring: sinks and their workers first, then the reader; SIGTERM drains and closes in reverse.

reader -> queue -> dispatcher (normalize, dedupe, route) -> outbox[sink] -> worker -> sink
                                               checkpoint <- acks / dead-letters
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from relay.checkpoint import CheckpointStore, CheckpointTracker, flush, flush_forever
from relay.deadletter import DeadLetter
from relay.engine import Dispatcher, EngineReader, QueueItem, engine_address
from relay.errors import RelayError
from relay.http import HttpServer
from relay.metrics import Metrics
from relay.outbox import SinkWorker
from relay.retry import RetryPolicy
from relay.router import RouteFilter
from relay.schema import Event
from relay.settings import Settings
from sinks.base import Sink, SinkConfigBase, SinkContext
from sinks.stdout import StdoutSinkConfig

log = logging.getLogger("relay.app")

# A sink that cannot close (a broker that never answers a goodbye) must not hold the exit.
_CLOSE_TIMEOUT = 5.0


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        sinks: Sequence[tuple[Sink, RouteFilter]] | None = None,
    ) -> None:
        """`sinks` replaces the configured ones (tests and benchmarks pass their own)."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.dead_letter = DeadLetter(settings.dead_letter_file)
        self.store = CheckpointStore(settings.state_dir)
        self.tracker = CheckpointTracker()
        self.policy = RetryPolicy(settings.retry)
        # Unbounded as a queue: the reader bounds the lines it puts (engine.queue_max) itself.
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        if sinks is None:
            context = SinkContext(relay_id=settings.node_name or SinkContext().relay_id)
            configs: Sequence[SinkConfigBase] = settings.sinks or [StdoutSinkConfig()]
            sinks = [(c.build(context), c.filter) for c in configs]
        self.workers: list[SinkWorker] = []
        self._routes: list[tuple[SinkWorker, RouteFilter | None]] = []
        for sink, route_filter in sinks:
            worker = SinkWorker(
                sink,
                settings.outbox.max_events,
                settings.outbox.overflow,
                self.policy,
                self.dead_letter,
                self.metrics,
                self.tracker.done,
            )
            self.workers.append(worker)
            self._routes.append((worker, None if route_filter.is_catch_all else route_filter))
        self.dispatcher = Dispatcher(
            self.queue, self.route, self.tracker, self.dead_letter, self.metrics
        )
        self.reader = EngineReader(
            settings,
            self.queue,
            self.dispatcher.resume_position(self.store),
            self.metrics,
        )
        self.http: HttpServer | None = None
        if settings.http.enabled:
            self.http = HttpServer(
                settings.http.host, settings.http.port, self.metrics, self.readiness
            )
        self.started = asyncio.Event()

    def route(self, event: Event) -> list[SinkWorker]:
        return [w for w, f in self._routes if f is None or f.matches(event)]

    def readiness(self) -> tuple[bool, str]:
        problems: list[str] = []
        if not self.reader.connected:
            problems.append(
                f"engine {engine_address(self.settings)} not connected"
                + (f": {self.reader.last_error}" if self.reader.last_error else "")
            )
        for w in self.workers:
            if w.stopped_reason is not None:
                problems.append(f"sink {w.name} stopped: {w.stopped_reason}")
            elif not w.started:
                problems.append(f"sink {w.name} not started: {w.last_error or 'starting'}")
            elif w.failing_since is not None:
                problems.append(f"sink {w.name} failing: {w.last_error}")
        if problems:
            return False, "not ready: " + "; ".join(problems)
        return True, "ready"

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        names = ", ".join(f"{w.name}({type(w.sink).__name__})" for w in self.workers)
        log.info("starting: engine %s, sinks: %s", engine_address(s), names)
        if self.http is not None:
            # First, so /healthz answers while the sinks connect.
            await self.http.start()
        async with asyncio.TaskGroup() as tg:
            worker_tasks = [tg.create_task(w.run(), name=f"sink:{w.name}") for w in self.workers]
            # Sinks first: give them a bounded time to connect; one that cannot keeps trying
            # in its worker while its outbox holds the events. A stop meanwhile ends the wait.
            all_started: asyncio.Future[Any] = asyncio.ensure_future(
                asyncio.gather(*(w.started_event.wait() for w in self.workers))
            )
            stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                [all_started, stopping],
                timeout=s.startup_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            all_started.cancel()
            stopping.cancel()
            for w in self.workers:
                if not w.started:
                    log.warning(
                        "sink %s not ready yet (%s); reading anyway, its outbox holds "
                        "events until it is",
                        w.name,
                        w.last_error,
                    )
            flusher = tg.create_task(
                flush_forever(self.tracker, self.store, s.checkpoint_interval), name="checkpoint"
            )
            dispatcher = tg.create_task(self.dispatcher.run(), name="dispatcher")
            reader = tg.create_task(self.reader.run(), name="reader")
            self.started.set()

            await stop.wait()
            log.info("stopping: no more reading; draining for at most %.1fs", s.drain_timeout)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            self.dispatcher.drain_nowait()
            for w in self.workers:
                w.outbox.close()
            _, late = await asyncio.wait(worker_tasks, timeout=s.drain_timeout or None)
            for task in late:
                log.warning(
                    "drain deadline passed: %s left events undelivered (they are "
                    "replayed after a restart if within the engine's window)",
                    task.get_name(),
                )
                task.cancel()
            for w in reversed(self.workers):
                try:
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await w.sink.aclose()
                except Exception:
                    log.exception("closing sink %s failed", w.name)
            flusher.cancel()
        if self.http is not None:
            await self.http.aclose()
        flush(self.tracker, self.store)
        self.dead_letter.close()
        log.info("stopped; checkpoint at timeNano %s", self.tracker.position.time_nano or "none")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; exit code 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(settings)
    try:
        await relay.run(stop)
    except RelayError as exc:
        log.error("%s", exc)
        return 1
    return 0
