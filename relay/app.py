"""The relay: its components wired together, run under one TaskGroup, torn down from `finally`.

reader -> queue -> pipeline (normalize, dedupe, route) -> outbox[sink] -> worker -> sink
                                      checkpoint <- acks / dead-letters

Startup: the HTTP port first (so /healthz answers while the sinks connect), then the sink
workers, each ready once its sink has started (waited for at most `startup_timeout`), then the
checkpoint writer, the pipeline, and the reader last. Shutdown on SIGTERM: stop reading,
dispatch what was read, drain the outboxes within `drain_timeout`, stop the rest. Whatever
ended the run (a stop, or a component that failed), the teardown closes every sink in reverse
order, writes the checkpoint and closes the dead-letter file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

from relay.checkpoint import CheckpointStore, CheckpointWriter
from relay.deadletter import DeadLetter
from relay.engine import EngineReader, QueueItem
from relay.http import HttpServer
from relay.lifecycle import ComponentError, Running, Supervisor
from relay.metrics import Metrics
from relay.outbox import SinkWorker
from relay.pipeline import Pipeline
from relay.retry import RetryPolicy, quiet_stamina
from relay.router import RouteFilter, RouteTable
from relay.settings import Settings
from relay.sink import Sink

log = logging.getLogger("relay.app")

# A sink that cannot close (a broker that never answers a goodbye) must not hold the exit.
_CLOSE_TIMEOUT = 5.0


class Relay:
    def __init__(
        self,
        settings: Settings,
        sinks: Sequence[tuple[Sink, RouteFilter]],
        *,
        metrics: Metrics | None = None,
    ) -> None:
        """`sinks` come from the composition root (`relay.plugins.build_sinks`), or a test."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.dead_letter = DeadLetter(settings.dead_letter_file)
        self.policy = RetryPolicy(settings.retry)
        # Unbounded as a queue: the reader bounds the lines it puts (engine.queue_max) itself.
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        self.workers = [
            SinkWorker(
                sink,
                settings.outbox.max_events,
                settings.outbox.overflow,
                self.policy,
                self.dead_letter,
                self.metrics,
                # Bound late: the pipeline (which owns the tracker) is built below.
                lambda seq: self.pipeline.tracker.done(seq),
            )
            for sink, _ in sinks
        ]
        store = CheckpointStore(settings.state_dir)
        self.pipeline = Pipeline(
            self.queue,
            RouteTable([(w, f) for w, (_, f) in zip(self.workers, sinks, strict=True)]),
            store,
            self.dead_letter,
            self.metrics,
            settings.schema_,
        )
        self.checkpoint = CheckpointWriter(
            self.pipeline.tracker, store, settings.checkpoint_interval
        )
        self.reader = EngineReader(
            settings.engine,
            self.queue,
            self.pipeline.resume_point,
            self.policy,
            self.metrics,
            node_name=settings.node_name,
        )
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        self.http: HttpServer | None = None
        if settings.http.enabled:
            self.http = HttpServer(
                settings.http.host, settings.http.port, self.metrics, self.readiness
            )

    def readiness(self) -> tuple[bool, str]:
        problems: list[str] = []
        if not self.reader.connected:
            problems.append(
                f"engine {self.reader.address} not connected"
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
        """Until `stop` is set; raises (an ExceptionGroup of ComponentError) when a component
        failed, after the teardown."""
        quiet_stamina()
        names = ", ".join(f"{w.name}({type(w.sink).__name__})" for w in self.workers)
        log.info("starting: engine %s, sinks: %s", self.reader.address, names)
        async with contextlib.AsyncExitStack() as teardown:
            # Unwound last to first: sinks closed in reverse order, then the checkpoint written,
            # then the dead-letter file closed; after every task of the group has finished.
            teardown.callback(self._close_dead_letter)
            teardown.callback(self._write_checkpoint)
            for worker in self.workers:
                teardown.push_async_callback(self._close_sink, worker)
            async with asyncio.TaskGroup() as tg:
                group = Supervisor(tg)
                services: list[Running] = []
                if self.http is not None:
                    services.append(await group.start("http", self.http.run))
                workers = [group.spawn(f"sink:{w.name}", w.run) for w in self.workers]
                await group.wait_ready(workers, self.settings.startup_timeout, stop)
                for w in self.workers:
                    if not w.started:
                        log.warning(
                            "sink %s not ready yet (%s); reading anyway, its outbox holds "
                            "events until it is",
                            w.name,
                            w.last_error,
                        )
                services.append(group.spawn("checkpoint", self.checkpoint.run))
                pipeline = group.spawn("pipeline", self.pipeline.run)
                reader = group.spawn("reader", self.reader.run)
                await stop.wait()
                await self._drain(reader, pipeline, workers)
                for service in reversed(services):
                    await service.stop()
        log.info(
            "stopped; checkpoint at timeNano %s",
            self.pipeline.tracker.position.time_nano or "none",
        )

    async def _drain(self, reader: Running, pipeline: Running, workers: list[Running]) -> None:
        timeout = self.settings.drain_timeout
        log.info("stopping: no more reading; draining for at most %.1fs", timeout)
        await reader.stop()
        await pipeline.stop()
        self.pipeline.drain_nowait()
        for w in self.workers:
            w.outbox.close()
        if not workers:
            return
        _, late = await asyncio.wait([w.task for w in workers], timeout=timeout or None)
        for running in workers:
            if running.task in late:
                log.warning(
                    "drain deadline passed: %s left events undelivered (they are "
                    "replayed after a restart if within the engine's window)",
                    running.name,
                )
                await running.stop()

    async def _close_sink(self, worker: SinkWorker) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await worker.sink.aclose()
        except Exception as exc:
            log.error("closing sink %s failed: %r", worker.name, exc)

    def _write_checkpoint(self) -> None:
        try:
            self.checkpoint.flush()
        except OSError as exc:
            log.error("cannot write the final checkpoint %s: %s", self.checkpoint.store.path, exc)

    def _close_dead_letter(self) -> None:
        try:
            self.dead_letter.close()
        except OSError as exc:
            log.error("closing the dead-letter file %s failed: %s", self.dead_letter.path, exc)


def failed_components(error: BaseException) -> list[ComponentError]:
    """The component failures in what `Relay.run` raised (nested groups flattened)."""
    if isinstance(error, BaseExceptionGroup):
        return [c for e in error.exceptions for c in failed_components(e)]
    return [error] if isinstance(error, ComponentError) else []


async def serve(settings: Settings, sinks: Sequence[tuple[Sink, RouteFilter]]) -> int:
    """Run until SIGTERM or SIGINT: exit code 0; 1 when a component failed (one log line each,
    with the traceback only at log.level DEBUG)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(settings, sinks)
    try:
        await relay.run(stop)
    except Exception as exc:
        failures = failed_components(exc) or [ComponentError("relay", exc)]
        debug = log.isEnabledFor(logging.DEBUG)
        for failure in failures:
            log.error(
                "%s; every sink was closed and the checkpoint written; exiting",
                failure,
                exc_info=failure.error if debug else None,
            )
        return 1
    return 0
