"""One outbox and one worker per sink, so a slow or dead sink delays no other.

The outbox holds the sink's events in order: a window of at most `outbox.max_events` in memory,
the rest in the spool on disk, read back as the window empties, so memory stays bounded
whatever the backlog. The worker takes batches in order, and retries a batch (the shared
`RetryPolicy`) before it takes the next, so a sink sees its events in engine order; the events
of a batch the destination rejected (RejectedSinkError) are retried one at a time, to find the
one it refuses (`Isolation`). Each event
ends in exactly one of: delivered, dead-lettered (permanent error, retries exhausted, overflow,
sink stopped), or dropped (only with an explicit `drop_*` overflow policy); each end is told to
the spool, which then owes it no more for this sink.

`spool.max_bytes` bounds what one sink holds (memory and disk), `spool.max_total_bytes` what
all of them hold together; beyond, the overflow policy applies, counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from relay.deadletter import DeadLetter, Reason, SinkReason
from relay.errors import (
    PartialDeliveryError,
    PermanentSinkError,
    RejectedSinkError,
    RetryableSinkError,
    SinkError,
    SinkStoppedError,
)
from relay.lifecycle import TaskStatus
from relay.logs import BurstLog, Summary
from relay.metrics import Metrics
from relay.retry import RetryPolicy
from relay.schema import Event
from relay.sink import Sink, SinkState
from relay.spool import Backlog, Spool

log = logging.getLogger("relay.outbox")

Overflow = Literal["dead_letter", "drop_oldest", "drop_newest"]

Loader = Callable[[int, int], Awaitable[list[Event]]]

# While one sink dead-letters for one reason, at most one line per this many seconds; each is a
# loss an operator must hear of soon, so shorter than a client library's repeats get.
DEAD_LETTER_LOG_INTERVAL = 10.0


class Outbox:
    """A sink's events in order: up to `window` in memory, the rest read back from the spool."""

    def __init__(self, window: int, load: Loader) -> None:
        self.window = window
        self._load = load
        self._items: deque[Event] = deque()
        # From this seq on, the sink's events are (also) only in the spool.
        self._disk_from: int | None = None
        self._spills = 0
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def on_disk(self) -> bool:
        return self._disk_from is not None

    def put(self, event: Event) -> None:
        if self._closed.is_set():
            raise RuntimeError("outbox closed")
        if self._disk_from is not None or len(self._items) >= self.window:
            # Behind events that wait on disk, or beyond the window: the spool keeps it (the
            # pipeline gave it to the spool first), in order.
            if self._disk_from is None:
                self._disk_from = event.seq
            self._spills += 1
        else:
            self._items.append(event)
        self._ready.set()

    def backlog_from(self, seq: int) -> None:
        """At start: the sink's events from `seq` on wait in the spool."""
        self._disk_from = seq
        self._ready.set()

    def pop_oldest(self) -> Event | None:
        return self._items.popleft() if self._items else None

    def close(self) -> None:
        """No more puts; the worker delivers what it can, then stops."""
        self._closed.set()
        self._ready.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def get_batch(self, max_events: int, linger: float = 0.0) -> list[Event]:
        """Up to `max_events` in order; waits while empty; [] once closed and drained. With
        `linger`, once there is an event, waits up to that many seconds for a full batch."""
        while not self._items:
            if self._disk_from is not None:
                await self._refill()
                continue
            if self._closed.is_set():
                return []
            self._ready.clear()
            await self._ready.wait()
        if linger > 0 and len(self._items) < max_events and self._disk_from is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + linger
            while (
                len(self._items) < max_events
                and not self._closed.is_set()
                and self._disk_from is None
            ):
                self._ready.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._ready.wait()
                except TimeoutError:
                    break
        items = self._items
        n = min(max_events, len(items))
        return [items.popleft() for _ in range(n)]

    async def _refill(self) -> None:
        assert self._disk_from is not None
        spills = self._spills
        room = max(1, self.window - len(self._items))
        events = await self._load(self._disk_from, room)
        self._items.extend(events)
        if events:
            self._disk_from = events[-1].seq + 1
        if len(events) < room and spills == self._spills:
            # Caught up with the spool, and nothing went to it meanwhile: memory again.
            self._disk_from = None

    def take_all(self) -> list[Event]:
        items = list(self._items)
        self._items.clear()
        return items


@dataclass
class Budget:
    """Bytes every sink holds together, against `spool.max_total_bytes`."""

    max_total: int
    total: int = 0


# Times an event is rejected (RejectedSinkError) when sent alone before it is dead-lettered as
# permanent. Twice, each on a new connection (a sink reconnects after a lost one): Mosquitto
# drops the connection for a malformed packet and for its own restart or a session takeover
# alike, without a reason the client sees (measured on 2.0.11), so a broker restarting while a
# good event was alone in flight must not cost that event; a poison event is refused every time,
# and a second try costs it one backoff wait.
REJECTED_ALONE = 2


@dataclass
class Isolation:
    """One batch on its way through a SinkWorker: the events still owed, in order, and which of
    them go one at a time.

    After a send of several events fails with RejectedSinkError (the destination refused, or
    dropped the connection, with them in flight), the pending events up to the last one so
    rejected are sent alone, in order; one rejected `REJECTED_ALONE` times alone is
    dead-lettered. Once they are through, the rest goes as a batch again.
    """

    pending: list[Event]
    alone: int = 0
    """The first `alone` pending events go one at a time."""
    _sent: set[int] = field(default_factory=set)
    _rejected: dict[int, int] = field(default_factory=dict)

    def sending(self, events: list[Event]) -> int:
        """`events` are about to be sent: how many of them were sent before (retries)."""
        again = sum(1 for e in events if e.seq in self._sent)
        self._sent.update(e.seq for e in events)
        return again

    def rejected_alone(self, event: Event) -> int:
        """`event` was rejected when sent alone: how many times now."""
        times = self._rejected.get(event.seq, 0) + 1
        self._rejected[event.seq] = times
        return times

    def settled(self, retry: list[Event], sent: int, suspects: int) -> None:
        """The first `sent` pending events were sent; `retry` (in order) are still owed, and
        `retry[:suspects]` must go one at a time."""
        self.pending = retry + self.pending[sent:]
        if self.alone:
            if not retry:
                self.alone -= 1
        elif suspects:
            self.alone = suspects


class SinkWorker:
    """Moves events from one outbox into one sink."""

    def __init__(
        self,
        sink: Sink,
        window: int,
        overflow: Overflow,
        max_bytes: int,
        budget: Budget,
        spool: Spool,
        policy: RetryPolicy,
        dead_letter: DeadLetter,
        metrics: Metrics,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.overflow = overflow
        self.max_bytes = max_bytes
        self.budget = budget
        self.spool = spool
        self.policy = policy
        self.dead_letter = dead_letter
        self.metrics = metrics
        self.bit = 0  # the spool's bit for this sink, given when the spool opens
        self.outbox = Outbox(window, lambda after, limit: spool.load(self.bit, after, limit))
        self.held_events = 0
        self.held_bytes = 0
        self._oldest: int | None = None  # timeNano of the oldest event held, when known
        self._in_flight: list[Event] = []
        self.stopped_reason: str | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._delivered = metrics.events_delivered.labels(self.name)
        self._latency = metrics.delivery_latency.labels(self.name)
        # Read at scrape time: a gauge set per event cost more than the put itself.
        metrics.outbox_depth.labels(self.name).set_function(lambda: len(self.outbox))
        self._up = metrics.sink_up.labels(self.name)
        metrics.sink_stopped.labels(self.name).set(0)
        self._up.set(0)
        # Every series of this sink exists from the start, at 0: an alert on increase() sees
        # the first dead letter, not only the second.
        self._retried = metrics.events_retried.labels(self.name)
        self._dropped = metrics.events_dropped.labels(self.name)
        for reason in get_args(SinkReason):
            metrics.events_dead_lettered.labels(self.name, reason)
        metrics.spool_events.labels(self.name).set_function(lambda: self.held_events)
        metrics.spool_bytes.labels(self.name).set_function(lambda: self.held_bytes)
        metrics.spool_max_bytes.labels(self.name).set(max_bytes)
        metrics.delivery_lag.labels(self.name).set_function(self._lag)

    def recover(self, bit: int, backlog: Backlog) -> None:
        """The spool opened: this sink's bit, and what it still owed from before."""
        self.bit = bit
        if backlog.events and backlog.first_seq is not None:
            self.held_events += backlog.events
            self.held_bytes += backlog.bytes
            self.budget.total += backlog.bytes
            self.outbox.backlog_from(backlog.first_seq)
            log.info(
                "sink %s: %d event(s) (%d bytes) held from before, delivered first",
                self.name,
                backlog.events,
                backlog.bytes,
            )

    def _lag(self) -> float:
        heads = [e.time_nano for e in self._in_flight[:1]]
        if len(self.outbox):
            heads.append(self.outbox._items[0].time_nano)
        elif self._oldest is not None and self.held_events:
            heads.append(self._oldest)
        if not heads or not self.held_events:
            return 0.0
        return max(0.0, (time.time_ns() - min(heads)) / 1e9)

    # -- producer side -------------------------------------------------------------------

    def put(self, event: Event) -> None:
        if self.stopped_reason is not None:
            self._dead_letter([event], "sink_stopped", self.stopped_reason, held=False)
            return
        size = len(event.json())
        if not self._room_for(size):
            if self.overflow == "dead_letter":
                self._dead_letter([event], "overflow", "spool full", held=False)
                return
            if self.overflow == "drop_newest" or not self._drop_oldest(size):
                self._dropped.inc()
                self.spool.done(self.bit, event.seq)
                return
        self.held_events += 1
        self.held_bytes += size
        self.budget.total += size
        if self._oldest is None:
            self._oldest = event.time_nano
        self.outbox.put(event)

    def _room_for(self, size: int) -> bool:
        return (
            self.held_bytes + size <= self.max_bytes
            and self.budget.total + size <= self.budget.max_total
        )

    def _drop_oldest(self, size: int) -> bool:
        """Make room by dropping the oldest events in memory; False when that cannot."""
        while not self._room_for(size):
            victim = self.outbox.pop_oldest()
            if victim is None:
                return False
            self._dropped.inc()
            self._finished([victim])
        return True

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
            if self.stopped_reason is not None:
                self._dead_letter(batch, "sink_stopped", self.stopped_reason)
                continue
            self._in_flight = batch
            try:
                await self._deliver(batch)
            finally:
                self._in_flight = []

    async def _start(self) -> bool:
        """Start the sink, retrying forever while its outbox holds the events. False when the
        relay stopped meanwhile with nothing for this sink to deliver."""
        async with asyncio.TaskGroup() as tg:
            starting = tg.create_task(self._start_with_retries(), name=f"start:{self.name}")
            closed = tg.create_task(self.outbox.wait_closed())
            await asyncio.wait([starting, closed], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not starting.done() and not self.outbox and not self.outbox.on_disk:
                # Stopping while still connecting, with nothing to deliver: done.
                starting.cancel()
                return False
        return True

    async def _start_with_retries(self) -> None:
        try:
            await self.policy.start(self._start_once)
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
        self._recovered()

    async def _deliver(self, batch: list[Event]) -> None:
        delivery = Isolation(batch)

        async def attempt() -> None:
            while delivery.pending:
                await self._attempt(delivery)

        try:
            await self.policy.deliver(attempt)
        except SinkStoppedError as exc:
            # This batch first, then what queued behind it: the file keeps engine order.
            self._dead_letter(delivery.pending, "sink_stopped", exc)
            self._stop(str(exc))
            return
        except SinkError as exc:
            # Logged by the dead-letter log, once per burst ("dead-lettered (retries_exhausted)").
            self._dead_letter(delivery.pending, "retries_exhausted", exc)
            return
        self._recovered()

    async def _attempt(self, delivery: Isolation) -> None:
        """One send: the pending events, or only the first of them while isolating. Settles
        each event it can (delivered, dead-lettered) and raises the error to retry the rest
        with (after the policy's backoff), keeping them in `delivery.pending`, in order."""
        sending = delivery.pending[:1] if delivery.alone else delivery.pending
        resent = delivery.sending(sending)
        if resent:
            self._retried.inc(resent)
        failures = await self._send(sending)
        ok: list[Event] = []
        retry: list[Event] = []
        retry_error: RetryableSinkError | None = None
        stopped: SinkStoppedError | None = None
        suspects = 0  # retry[:suspects] reaches the last event rejected in a batch
        # Dead letters in batch order; a run of events with one error is written as one.
        dead: list[tuple[list[Event], Reason, SinkError]] = []

        def dead_letter(event: Event, reason: Reason, error: SinkError) -> None:
            if dead and dead[-1][1] == reason and dead[-1][2] is error:
                dead[-1][0].append(event)
            else:
                dead.append(([event], reason, error))

        for index, event in enumerate(sending):
            err = failures.get(index)
            if err is None:
                ok.append(event)
            elif isinstance(err, SinkStoppedError):
                dead_letter(event, "sink_stopped", err)
                stopped = stopped or err
            elif isinstance(err, RejectedSinkError) and len(sending) == 1:
                times = delivery.rejected_alone(event)
                if times >= REJECTED_ALONE:
                    # Refused whenever it is sent, by itself: this event is the cause.
                    refused = PermanentSinkError(
                        f"rejected by the destination when sent alone ({times} times, each on "
                        f"a new attempt): {err.message}",
                        sink=self.name,
                    )
                    refused.__cause__ = err
                    dead_letter(event, "permanent", refused)
                else:
                    retry.append(event)
                    retry_error = retry_error or err
            elif isinstance(err, RetryableSinkError):
                retry.append(event)
                retry_error = retry_error or err
                if isinstance(err, RejectedSinkError):
                    suspects = len(retry)
            else:
                dead_letter(event, "permanent", err)
        self._acked(ok)
        for events, reason, error in dead:
            self._dead_letter(events, reason, error)
        delivery.settled(retry, len(sending), suspects)
        if suspects:
            log.info(
                "sink %s: the destination rejected or dropped %d event(s) in flight; sending "
                "them one at a time, in order, to find one it refuses",
                self.name,
                suspects,
            )
        if stopped is not None:
            raise stopped
        if retry_error is not None:
            self._failing(retry_error)
            raise retry_error

    async def _send(self, events: list[Event]) -> dict[int, SinkError]:
        """One call of the sink: the error of each event that failed, by index in `events` ({}
        when the destination acknowledged all of them)."""
        try:
            if self.sink.state is SinkState.NEW:
                await self._start_once()
            await self.sink.send(events)
        except PartialDeliveryError as exc:
            return dict(exc.failures)
        except SinkError as exc:
            return dict.fromkeys(range(len(events)), exc)
        except Exception as exc:
            # A client library error the sink did not translate: assume transient, keep the
            # events, and say so once per burst.
            error = RetryableSinkError(f"unexpected error: {exc!r}", sink=self.name)
            error.__cause__ = exc
            return dict.fromkeys(range(len(events)), error)
        return {}

    # -- outcomes ------------------------------------------------------------------------

    def _acked(self, events: list[Event]) -> None:
        if not events:
            return
        now_ns = time.time_ns()
        self._delivered.inc(len(events))
        for event in events:
            self._latency.observe(max(0, now_ns - event.time_nano) / 1e9)
        self._finished(events)

    def _dead_letter(
        self,
        events: list[Event],
        reason: Reason,
        error: BaseException | str,
        *,
        held: bool = True,
    ) -> None:
        """`held`: the events were counted as this sink's (not refused at the door)."""
        if not events:
            return
        counter = self.metrics.events_dead_lettered.labels(self.name, reason)
        for event in events:
            self.dead_letter.write_event(event, sink=self.name, reason=reason, error=error)
            counter.inc()
        self._dead_letter_log(events, reason, error)
        if held:
            self._finished(events)
        else:
            for event in events:
                self.spool.done(self.bit, event.seq)

    @functools.cached_property
    def _dead_letter_log(self) -> DeadLetterLog:
        return DeadLetterLog(self.name)

    def _finished(self, events: list[Event]) -> None:
        """This sink is done with `events` (held ones): the spool owes them no more for it."""
        spool, bit = self.spool, self.bit
        size = 0
        for event in events:
            spool.done(bit, event.seq)
            size += len(event.json())
        self.held_events -= len(events)
        self.held_bytes -= size
        self.budget.total -= size
        if not self.held_events:
            self._oldest = None
        elif len(self.outbox):
            self._oldest = self.outbox._items[0].time_nano

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
            # What waits on disk is dead-lettered as the worker reads it back.


class DeadLetterLog:
    """One sink's dead letters in the log, once per burst per reason: the first at once (its
    event id and the error), then at most one line per `DEAD_LETTER_LOG_INTERVAL` with the count
    since, however many thousands a full spool refuses."""

    def __init__(
        self, sink: str, *, clock: Callable[[], float] = time.monotonic, timer: bool = True
    ) -> None:
        self.sink = sink
        self.bursts: BurstLog[Reason] = BurstLog(
            DEAD_LETTER_LOG_INTERVAL, self._summary, clock=clock, timer=timer
        )

    def __call__(self, events: list[Event], reason: Reason, error: BaseException | str) -> None:
        text = str(error)
        if not self.bursts.hit(reason, len(events), text):
            return
        extra = {"sink": self.sink, "reason": reason, "event_id": events[0].id}
        if len(events) == 1:
            log.error(
                "sink %s: event %s dead-lettered (%s): %s",
                self.sink,
                events[0].id,
                reason,
                text,
                extra=extra,
            )
        else:
            log.error(
                "sink %s: %d events dead-lettered (%s), the first %s: %s",
                self.sink,
                len(events),
                reason,
                events[0].id,
                text,
                extra={**extra, "count": len(events)},
            )

    def _summary(self, summary: Summary[Reason]) -> None:
        log.error(
            "sink %s: %d more event(s) dead-lettered (%s: %s) in the last %.0fs",
            self.sink,
            summary.count,
            summary.key,
            summary.last,
            summary.seconds,
            extra={"sink": self.sink, "reason": summary.key, "count": summary.count},
        )
