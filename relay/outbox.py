"""One bounded outbox and one worker per sink, so a slow or dead sink delays no other.

The worker takes batches in order, and retries a batch (the shared `RetryPolicy`) before it
takes the next, so a sink sees its events in engine order. Each event ends in exactly one of:
delivered, dead-lettered (permanent error, retries exhausted, overflow, sink stopped), or
dropped (only with an explicit `drop_*` overflow policy). Every end counts for the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, get_args

from relay.deadletter import DeadLetter, Reason, SinkReason
from relay.errors import (
    PartialDeliveryError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    SinkStoppedError,
)
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.retry import RetryPolicy
from relay.schema import Event
from relay.sink import Sink, SinkState

log = logging.getLogger("relay.outbox")

Overflow = Literal["dead_letter", "drop_oldest", "drop_newest"]


class Outbox:
    """A bounded FIFO that never blocks the producer: when full, the overflow policy decides."""

    def __init__(
        self,
        max_events: int,
        overflow: Overflow,
        on_evict: Callable[[Event, Overflow], None],
    ) -> None:
        self.max_events = max_events
        self.overflow = overflow
        self._on_evict = on_evict
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Event) -> None:
        if self._closed.is_set():
            raise RuntimeError("outbox closed")
        if len(self._items) >= self.max_events:
            if self.overflow == "drop_oldest":
                self._on_evict(self._items.popleft(), self.overflow)
            else:
                self._on_evict(event, self.overflow)
                return
        self._items.append(event)
        self._ready.set()

    def close(self) -> None:
        """No more puts; the worker drains what is left, then stops."""
        self._closed.set()
        self._ready.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def get_batch(self, max_events: int, linger: float = 0.0) -> list[Event]:
        """Up to `max_events` in order; waits while empty; [] once closed and drained. With
        `linger`, once there is an event, waits up to that many seconds for a full batch."""
        while not self._items:
            if self._closed.is_set():
                return []
            self._ready.clear()
            await self._ready.wait()
        if linger > 0 and len(self._items) < max_events:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + linger
            while len(self._items) < max_events and not self._closed.is_set():
                self._ready.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._ready.wait()
                except TimeoutError:
                    break
        items = self._items
        n = min(max_events, len(items))
        return [items.popleft() for _ in range(n)]

    def take_all(self) -> list[Event]:
        items = list(self._items)
        self._items.clear()
        return items


class SinkWorker:
    """Moves events from one outbox into one sink."""

    def __init__(
        self,
        sink: Sink,
        outbox_max: int,
        overflow: Overflow,
        policy: RetryPolicy,
        dead_letter: DeadLetter,
        metrics: Metrics,
        on_done: Callable[[int], None],
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.policy = policy
        self.dead_letter = dead_letter
        self.metrics = metrics
        self._on_done = on_done
        self.outbox = Outbox(outbox_max, overflow, self._evicted)
        self.stopped_reason: str | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._delivered = metrics.events_delivered.labels(self.name)
        self._latency = metrics.delivery_latency.labels(self.name)
        self._depth = metrics.outbox_depth.labels(self.name)
        self._up = metrics.sink_up.labels(self.name)
        metrics.sink_stopped.labels(self.name).set(0)
        self._up.set(0)
        # Every series of this sink exists from the start, at 0: an alert on increase() sees
        # the first dead letter, not only the second.
        self._retried = metrics.events_retried.labels(self.name)
        metrics.events_dropped.labels(self.name)
        for gauge in (
            metrics.spool_events,
            metrics.spool_bytes,
            metrics.spool_max_bytes,
            metrics.delivery_lag,
        ):
            gauge.labels(self.name).set(0)
        for reason in get_args(SinkReason):
            metrics.events_dead_lettered.labels(self.name, reason)

    # -- producer side -------------------------------------------------------------------

    def put(self, event: Event) -> None:
        if self.stopped_reason is not None:
            self._dead_letter([event], "sink_stopped", self.stopped_reason)
            return
        self.outbox.put(event)
        self._depth.set(len(self.outbox))

    def _evicted(self, event: Event, overflow: Overflow) -> None:
        if overflow == "dead_letter":
            self._dead_letter([event], "overflow", "outbox full")
        else:
            self.metrics.events_dropped.labels(self.name).inc()
            self._on_done(event.seq)

    # -- worker side ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and self.stopped_reason is None and self.failing_since is None

    @property
    def started(self) -> bool:
        return self.sink.state is SinkState.STARTED

    async def run(self, task_status: TaskStatus) -> None:
        """The worker component: start the sink (ready once it is), then deliver batches until
        the outbox is closed and drained. The sink is closed by the relay, not here."""
        if not await self._start():
            return
        task_status.started()
        while True:
            batch = await self.outbox.get_batch(self.sink.max_batch, self.sink.linger)
            if not batch:
                return
            self._depth.set(len(self.outbox))
            await self._deliver(batch)

    async def _start(self) -> bool:
        """Start the sink, retrying forever while its outbox holds the events. False when the
        relay stopped meanwhile with nothing for this sink to deliver."""
        async with asyncio.TaskGroup() as tg:
            starting = tg.create_task(self._start_with_retries(), name=f"start:{self.name}")
            closed = tg.create_task(self.outbox.wait_closed())
            await asyncio.wait([starting, closed], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not starting.done() and not self.outbox:
                # Stopping while still connecting, with nothing to deliver: done.
                starting.cancel()
                return False
        return True

    async def _start_with_retries(self) -> None:
        try:
            async for attempt in self.policy.start():
                with attempt:
                    await self._start_once()
        except PermanentSinkError as exc:
            # A sink that can never start is stopped, not the relay: its events go to the
            # dead-letter file, the other sinks go on, /readyz says why.
            self._stop(f"cannot start: {exc}")

    async def _start_once(self) -> None:
        try:
            await self.sink.start()
        except SinkError as exc:
            self._failing(exc)
            raise
        except Exception as exc:
            self._failing(exc)
            raise RetryableSinkError(f"start failed: {exc!r}", sink=self.name) from exc

    async def _deliver(self, batch: list[Event]) -> None:
        pending = batch
        try:
            async for attempt in self.policy.delivery():
                with attempt:
                    if attempt.num > 1:
                        self._retried.inc(len(pending))
                    pending = await self._attempt(pending)
        except SinkStoppedError as exc:
            # This batch first, then what queued behind it: the file keeps engine order.
            self._dead_letter(pending, "sink_stopped", exc)
            self._stop(str(exc))
            return
        except PermanentSinkError as exc:
            self._dead_letter(pending, "permanent", exc)
            return
        except SinkError as exc:
            log.error(
                "sink %s: giving up on %d event(s) after retries, dead-lettered: %s",
                self.name,
                len(pending),
                exc,
            )
            self._dead_letter(pending, "retries_exhausted", exc)
            return
        self._recovered()

    async def _attempt(self, pending: list[Event]) -> list[Event]:
        """One try. Returns [] when all are handled; raises with the still-pending ones kept in
        `pending` (mutated in place) when some must be retried."""
        try:
            if self.sink.state is SinkState.NEW:
                await self._start_once()
            await self.sink.send(pending)
        except PartialDeliveryError as exc:
            retry: list[Event] = []
            retry_error: RetryableSinkError | None = None
            stopped: SinkStoppedError | None = None
            ok: list[Event] = []
            for index, event in enumerate(pending):
                err = exc.failures.get(index)
                if err is None:
                    ok.append(event)
                elif isinstance(err, SinkStoppedError):
                    self._dead_letter([event], "sink_stopped", err)
                    stopped = stopped or err
                elif isinstance(err, RetryableSinkError):
                    retry.append(event)
                    retry_error = retry_error or err
                else:
                    self._dead_letter([event], "permanent", err)
            self._acked(ok)
            pending[:] = retry
            if stopped is not None:
                raise stopped from exc
            if retry_error is not None:
                self._failing(retry_error)
                raise retry_error from exc
            return []
        except SinkError as exc:
            if isinstance(exc, RetryableSinkError):
                self._failing(exc)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A client library error the sink did not translate: assume transient, keep the
            # events, and say so once per burst.
            self._failing(exc)
            raise RetryableSinkError(f"unexpected error: {exc!r}", sink=self.name) from exc
        self._acked(pending)
        return []

    # -- outcomes ------------------------------------------------------------------------

    def _acked(self, events: list[Event]) -> None:
        if not events:
            return
        now_ns = time.time_ns()
        self._delivered.inc(len(events))
        for event in events:
            self._latency.observe(max(0, now_ns - event.time_nano) / 1e9)
            self._on_done(event.seq)

    def _dead_letter(self, events: list[Event], reason: Reason, error: BaseException | str) -> None:
        if not events:
            return
        counter = self.metrics.events_dead_lettered.labels(self.name, reason)
        for event in events:
            self.dead_letter.write_event(event, sink=self.name, reason=reason, error=error)
            counter.inc()
            self._on_done(event.seq)

    def _failing(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        self._up.set(0)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("sink %s: delivery failing, retrying with backoff: %s", self.name, exc)
        else:
            log.debug("sink %s: still failing: %s", self.name, exc)

    def _recovered(self) -> None:
        self._up.set(1)
        if self.failing_since is not None:
            log.warning(
                "sink %s: delivering again after %.1fs of failures",
                self.name,
                time.monotonic() - self.failing_since,
            )
            self.failing_since = None
            self.last_error = None

    def _stop(self, reason: str) -> None:
        if self.stopped_reason is None:
            self.stopped_reason = reason
            self._up.set(0)
            self.metrics.sink_stopped.labels(self.name).set(1)
            log.error(
                "sink %s: STOPPED by the destination (%s); its events now go to the dead-letter "
                "file",
                self.name,
                reason,
            )
            self._dead_letter(self.outbox.take_all(), "sink_stopped", reason)
            self._depth.set(0)
