"""The relay: its components wired together, run under one TaskGroup, torn down from `finally`.

reader -> queue -> pipeline (normalize, dedupe, route) -> outbox[sink] -> worker -> sink
                          |                                     | done
                          +--> spool (SQLite: events owed, cursor) <--+

Startup: the spool is opened (what the sinks still owed, where the engine's stream was left),
then the HTTP port (so /healthz answers while the sinks connect), the sink workers, each ready
once its sink has started (waited for at most `startup_timeout`), the spool's writer, the
pipeline, and the reader last. Shutdown on SIGTERM: stop reading, dispatch what was read,
deliver within `drain_timeout`, stop the rest. Whatever ended the run (a stop, or a component
that failed), the teardown closes every sink in reverse order, commits the spool (what was not
delivered stays there for the next start) and closes the dead-letter file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
from collections.abc import Sequence

from relay.deadletter import DeadLetter
from relay.engine import EngineReader, QueueItem, engine_now
from relay.errors import ConfigError
from relay.flap import Suppressor, call_later
from relay.http import HttpServer
from relay.lifecycle import ComponentError, Running, Supervisor
from relay.metrics import Metrics
from relay.outbox import Budget, SinkWorker
from relay.pipeline import Pipeline
from relay.reconcile import PENDING_FILE, QueryObjects, Reconciler, ReconcileTarget
from relay.retry import RetryPolicy, quiet_stamina
from relay.router import RouteFilter, RouteTable
from relay.schema import Event
from relay.settings import Settings
from relay.sink import Sink
from relay.spool import Spool

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
        self.metrics.count_context(settings.metrics.context, settings.metrics.context_max_values)
        self.policy = RetryPolicy(settings.retry)
        # Unbounded as a queue: the reader bounds the lines it puts (engine.queue_max) itself.
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        sp = settings.spool
        self.spool = Spool(
            settings.state_dir / ("spool.db" if sp.durable else ":memory:"),
            self.metrics,
            fsync=sp.fsync,
            commit_interval=sp.commit_interval,
            commit_max_events=sp.commit_max_events,
        )
        self.dead_letter = DeadLetter(settings.dead_letter_file, self.spool, self.metrics)
        self.spool.on_tick.append(self.dead_letter.flush_export)
        self.spool.replay_into(self._replay)
        budget = Budget(sp.max_total_bytes)
        self.workers = [
            SinkWorker(
                sink,
                settings.outbox.max_events,
                sp.overflow,
                sp.max_bytes,
                budget,
                self.spool,
                self.policy,
                self.dead_letter,
                self.metrics,
            )
            for sink, _ in sinks
        ]
        self.pipeline = Pipeline(
            self.queue,
            RouteTable([(w, f) for w, (_, f) in zip(self.workers, sinks, strict=True)]),
            self.spool,
            self.dead_letter,
            self.metrics,
            # The normalizer keeps of exec commands what the most permissive sink receives;
            # the others' redaction narrows it (relay.redact).
            settings.schema_.model_copy(update={"exec_command": settings.kept_exec_command()}),
        )
        reconciling = [
            ReconcileTarget(w.name, w, None if f.is_catch_all else f, s.reconcile)
            for w, (s, f) in zip(self.workers, sinks, strict=True)
            if s.reconcile.enabled
        ]
        if reconciling:
            self.pipeline.reconciler = Reconciler(
                reconciling,
                QueryObjects(settings.engine.host, settings.engine.connect_timeout, engine_now),
                self.metrics,
                settings.state_dir / PENDING_FILE if sp.durable else None,
            )
        flapping = [(w, w.name, w.sink.flap) for w in self.workers if w.sink.flap is not None]
        self.flap: Suppressor | None = None
        if flapping:
            self.flap = self.pipeline.flap = Suppressor(
                flapping,
                type_prefix=settings.schema_.type_prefix,
                deliver=self.pipeline.deliver_to,
                done=self.spool.done,
                metrics=self.metrics,
                schedule=call_later,
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

    def _replay(self, sink: str, body: bytes) -> bool:
        """A dead letter replayed (`docker-event-relay dead-letter replay`) for `sink`."""
        for worker in self.workers:
            if worker.name == sink:
                self.pipeline.deliver_to(worker, Event.from_json(body, 0))
                return True
        return False

    def readiness(self) -> tuple[bool, str]:
        problems: list[str] = []
        if self.spool.disk_error is not None:
            problems.append(f"spool {self.spool.path} cannot be written: {self.spool.disk_error}")
        if self.dead_letter.disk_error is not None:
            problems.append(
                f"dead-letter file {self.dead_letter.path} cannot be written: "
                f"{self.dead_letter.disk_error}"
            )
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
        self._open_spool()
        async with contextlib.AsyncExitStack() as teardown:
            # Unwound last to first: sinks closed in reverse order, then the spool committed
            # and closed, then the dead-letter file; after every task of the group finished.
            teardown.callback(self._close_dead_letter)
            teardown.callback(self._close_spool)
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
                services.append(group.spawn("spool", self.spool.run))
                pipeline = group.spawn("pipeline", self.pipeline.run)
                reader = group.spawn("reader", self.reader.run)
                await stop.wait()
                await self._drain(reader, pipeline, workers)
                for service in reversed(services):
                    await service.stop()
        held = sum(w.held_events for w in self.workers)
        log.info(
            "stopped at timeNano %s; %d event(s) held in the spool for the next start",
            self.pipeline.cursor.time_nano or "none",
            held,
        )

    def _open_spool(self) -> None:
        names = [w.name for w in self.workers]
        held = self.flap.held_names() if self.flap is not None else []
        clash = sorted(set(names) & set(held))
        if clash:
            # The spool keeps what a sink's flap windows hold under that name.
            raise ConfigError("sinks", f"a sink may not be called {clash[0]!r} (flap suppression)")
        try:
            recovered = self.spool.open(names + held)
        except (sqlite3.Error, OSError) as exc:
            self.spool.close()
            raise ConfigError(
                "state_dir", f"cannot open the spool {self.spool.path}: {exc}"
            ) from exc
        for worker in self.workers:
            worker.recover(self.spool.bits[worker.name], recovered.backlog[worker.name])
        self.pipeline.recover(recovered)
        if self.flap is not None:
            self.flap.opened(
                self.spool.bits, {name: b.events for name, b in recovered.backlog.items()}
            )
        if self.pipeline.reconciler is not None:
            self.pipeline.reconciler.recover()

    async def _drain(self, reader: Running, pipeline: Running, workers: list[Running]) -> None:
        timeout = self.settings.drain_timeout
        log.info("stopping: no more reading; draining for at most %.1fs", timeout)
        self.spool.stop_replays()
        await reader.stop()
        await pipeline.stop()
        self.pipeline.drain_nowait()
        if self.flap is not None:
            # Open windows' summaries, delivered within the drain like any event.
            self.flap.close_all()
        for w in self.workers:
            w.outbox.close()
        if not workers:
            return
        _, late = await asyncio.wait([w.task for w in workers], timeout=timeout or None)
        for running in workers:
            if running.task in late:
                log.warning(
                    "drain deadline passed: %s stops with events undelivered (they stay in "
                    "the spool and are delivered after the restart)",
                    running.name,
                )
                await running.stop()

    async def _close_sink(self, worker: SinkWorker) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await worker.sink.aclose()
        except Exception as exc:
            log.error("closing sink %s failed: %r", worker.name, exc)

    def _close_spool(self) -> None:
        if not self.spool.commit_now():
            log.error(
                "the final commit of the spool %s failed (%s): what it did not hold yet is "
                "replayed by the engine after a restart, as far as its replay reaches",
                self.spool.path,
                self.spool.disk_error,
            )
        self.spool.close()

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
    """Run until SIGTERM, SIGINT or SIGHUP: exit code 0; 2 when the state directory cannot hold
    the spool; 1 when a component failed (one log line each, with the traceback only at
    log.level DEBUG)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal (or a supervisor's hangup) drains like a stop, rather than
    # killing the relay in the middle of a delivery.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(settings, sinks)
    try:
        await relay.run(stop)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except Exception as exc:
        failures = failed_components(exc) or [ComponentError("relay", exc)]
        debug = log.isEnabledFor(logging.DEBUG)
        for failure in failures:
            log.error(
                "%s; every sink was closed and the spool committed; exiting",
                failure,
                exc_info=failure.error if debug else None,
            )
        return 1
    return 0
