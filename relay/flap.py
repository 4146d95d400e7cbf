"""Flap suppression: per sink, repeats of one actor's action within a window are held back and
summarised in one `<type_prefix>.<type>.suppressed` event when the window closes.

A window opens at the first event of a key (type, actor id, action, action detail) routed to a
sink with `flap:`; the first `max_events` of the key pass, the rest are held (counted in
`relay_events_suppressed_total`); `window` seconds after it opened, the window closes and, if
it held any, the sink receives one summary with the count and the first and last times held.
The next event of the key opens a new window. The detail is part of the key so that a summary
says exactly what it stands for (`health_status: unhealthy`, 12 times), never a mix.

Nothing held is only in memory. A held event goes into the spool like any other, owed by a
bit of its own per sink (the spool's sink name `flap:<sink>`), never handed to the sink's
outbox: the outbox reads back only its sink's bit. When a window closes, its summary is added
to the spool for the sink and the held events are cleared of the bit in the same loop step, so
one commit writes both: a crash leaves either the held events or their summary, never neither.
After a SIGKILL, the next start reads what is still held and closes those windows at once (one
summary per key, with the same id as a summary the dead process may already have sent, so
consumers dedupe it); events after the spool's cursor the engine replays and windows count
again. A drain on SIGTERM closes every open window before the sinks' outboxes.

One timer at most: windows of one sink close in the order they opened (all last `window`), so
the earliest of each sink's first windows is the next to close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from relay.metrics import Metrics
from relay.normalize import event_id, format_time
from relay.router import Target
from relay.schema import Event, Suppressed

log = logging.getLogger("relay.flap")

DEFAULT_ACTIONS: Final = frozenset(
    {"start", "die", "kill", "stop", "restart", "oom", "health_status"}
)
# Keys one sink tracks at once. A flood of distinct actors (thousands of containers created in
# a minute) is no flap: beyond this, a new key passes untracked, so memory stays bounded and
# nothing is held that could not be summarised.
MAX_OPEN_WINDOWS: Final = 10_000
# The spool's name for what a sink's windows hold (a bit of its own, like a sink's).
HELD_PREFIX: Final = "flap:"
# The action of a summary; also how its id differs from the held events'.
SUPPRESSED: Final = "suppressed"
_LOAD_BATCH = 1000

Key = tuple[str, str, str, str | None]


class FlapSettings(BaseModel):
    """A sink's flap suppression (off unless given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="Seconds a window lasts, from the first event of an actor's action.",
    )
    max_events: int = Field(
        default=3,
        ge=1,
        description="Events of one actor and action (with its detail) delivered per window; "
        "further ones are held and summarised in one ...suppressed event when it closes.",
    )
    actions: frozenset[str] = Field(
        default=DEFAULT_ACTIONS,
        min_length=1,
        description="Base actions that are windowed; others always pass. Events without an "
        "actor id (prunes) and the relay's own (relay.gap) are never held.",
    )


def held_name(sink: str) -> str:
    """The spool's name for the events `sink`'s windows hold."""
    return HELD_PREFIX + sink


@dataclass(slots=True)
class _Window:
    closes: float
    passed: int = 1
    held: array[int] = field(default_factory=lambda: array("q"))
    first_nano: int = 0
    # The last event held: the summary carries its actor.
    last: Event | None = None

    def hold(self, event: Event) -> None:
        if self.last is None:
            self.first_nano = event.time_nano
        self.held.append(event.seq)
        self.last = event


class _Gate:
    """One sink's windows."""

    def __init__(self, target: Target, name: str, settings: FlapSettings, metrics: Metrics):
        self.target = target
        self.name = name
        self.window = settings.window
        self.limit = settings.max_events
        self.actions = settings.actions
        self.bit = 0  # given when the spool opens
        self.windows: dict[Key, _Window] = {}
        self.full = False
        self._counted = {a: metrics.events_suppressed.labels(name, a) for a in self.actions}
        self._metric = metrics.events_suppressed

    def admit(self, event: Event, now: float) -> tuple[bool, float | None]:
        """Whether `event` passes; and the deadline of a window it opened."""
        data = event.ce.data
        if data.action not in self.actions or not data.actor.id or data.type == "relay":
            return True, None
        key = (data.type, data.actor.id, data.action, data.action_detail)
        window = self.windows.get(key)
        if window is None:
            if len(self.windows) >= MAX_OPEN_WINDOWS:
                if not self.full:
                    self.full = True
                    log.warning(
                        "sink %s: %d flap windows open; further actors pass unwindowed "
                        "until some close",
                        self.name,
                        MAX_OPEN_WINDOWS,
                    )
                return True, None
            closes = now + self.window
            self.windows[key] = _Window(closes)
            return True, closes
        if window.passed < self.limit:
            window.passed += 1
            return True, None
        window.hold(event)
        counter = self._counted.get(data.action)
        if counter is None:
            counter = self._counted[data.action] = self._metric.labels(self.name, data.action)
        counter.inc()
        return False, None

    def next_close(self) -> float | None:
        for window in self.windows.values():
            return window.closes
        return None


class Suppressor:
    """The flap windows of every sink that has `flap:`, owned by the pipeline.

    `deliver(target, event)` hands a summary to one sink (the pipeline's `deliver_to`: a new
    sequence number, in the spool, then the sink); `done(bit, seq)` clears a held event's bit
    in the spool. `clock` is monotonic seconds; `schedule(delay, callback)` arms the one timer
    (None: the caller calls `tick` itself, as the unit tests do with their clock)."""

    def __init__(
        self,
        sinks: Sequence[tuple[Target, str, FlapSettings]],
        *,
        type_prefix: str,
        deliver: Callable[[Target, Event], None],
        done: Callable[[int, int], None],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] = time.time_ns,
        schedule: Callable[[float, Callable[[], None]], asyncio.TimerHandle] | None = None,
    ) -> None:
        self.gates = [_Gate(t, name, s, metrics) for t, name, s in sinks]
        self._by_target = {id(g.target): g for g in self.gates}
        self.type_prefix = type_prefix.rstrip(".")
        self._deliver = deliver
        self._done = done
        self._clock = clock
        self._wall = wall
        self._schedule = schedule
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._next_due = float("inf")
        self._closed = False
        self._to_recover: list[_Gate] = []

    # -- the spool ----------------------------------------------------------------------------

    def held_names(self) -> list[str]:
        return [held_name(g.name) for g in self.gates]

    def opened(self, bits: dict[str, int], backlog: dict[str, int]) -> None:
        """The spool opened: each sink's held bit, and how many events it held from before."""
        for gate in self.gates:
            gate.bit = bits[held_name(gate.name)]
            if backlog.get(held_name(gate.name)):
                self._to_recover.append(gate)

    async def recover(self, load: Callable[[int, int, int], Awaitable[list[Event]]]) -> None:
        """Close the windows a previous run left open (it was killed): one summary per key,
        from the events the spool still holds for it."""
        recovering, self._to_recover = self._to_recover, []
        for gate in recovering:
            windows: dict[Key, _Window] = {}
            after = 0
            while batch := await load(gate.bit, after, _LOAD_BATCH):
                for event in batch:
                    data = event.ce.data
                    key = (data.type, data.actor.id, data.action, data.action_detail)
                    window = windows.get(key)
                    if window is None:
                        window = windows[key] = _Window(0.0)
                    window.hold(event)
                after = batch[-1].seq + 1
            held = sum(len(w.held) for w in windows.values())
            log.warning(
                "sink %s: %d event(s) held by flap windows open when the relay stopped; "
                "summarised in %d ...suppressed event(s)",
                gate.name,
                held,
                len(windows),
            )
            for window in windows.values():
                self._summarise(gate, window)

    # -- the pipeline -------------------------------------------------------------------------

    def tick(self) -> None:
        """Close the windows that are due (before an event is dispatched: their summaries go
        ahead of it)."""
        if self._next_due <= self._clock():
            self._expire(self._clock())

    def split(self, event: Event, targets: list[Target]) -> tuple[list[Target], int]:
        """The targets `event` goes to, and the held bits of the sinks that hold it."""
        gates = self._by_target
        passing: list[Target] | None = None
        held = 0
        now = self._clock()
        for index, target in enumerate(targets):
            gate = gates.get(id(target))
            if gate is None:
                if passing is not None:
                    passing.append(target)
                continue
            admitted, closes = gate.admit(event, now)
            if admitted:
                if passing is not None:
                    passing.append(target)
                if closes is not None and closes < self._next_due:
                    self._next_due = closes
                    self._arm()
            else:
                held |= gate.bit
                if passing is None:
                    passing = targets[:index]
        return (targets if passing is None else passing), held

    def close_all(self) -> None:
        """Stopping (the drain): every open window closes now; no timer after this."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for gate in self.gates:
            windows, gate.windows = gate.windows, {}
            for window in windows.values():
                if window.last is not None:
                    self._summarise(gate, window)

    # -- closing ------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        due = float("inf")
        for gate in self.gates:
            windows = gate.windows
            while windows:
                key = next(iter(windows))
                window = windows[key]
                if window.closes > now:
                    due = min(due, window.closes)
                    break
                del windows[key]
                if window.last is not None:
                    self._summarise(gate, window)
            gate.full = gate.full and len(windows) >= MAX_OPEN_WINDOWS
        self._next_due = due
        self._arm()

    def _arm(self) -> None:
        if self._schedule is None or self._closed or self._next_due == float("inf"):
            return
        if self._armed_at is not None and self._armed_at <= self._next_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = self._next_due
        self._timer = self._schedule(max(0.0, self._next_due - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        if not self._closed:
            self._expire(self._clock())

    def _summarise(self, gate: _Gate, window: _Window) -> None:
        last = window.last
        assert last is not None
        self._deliver(gate.target, self.summary(last, window.first_nano, len(window.held)))
        done, bit = self._done, gate.bit
        for seq in window.held:
            done(bit, seq)

    def summary(self, last: Event, first_nano: int, count: int) -> Event:
        """The `...suppressed` event for `count` held events of `last`'s key, the first of them
        at `first_nano`. Its id depends only on the key and the first held event."""
        ce = last.ce
        data = ce.data
        now = max(self._wall(), data.time_nano)
        at = format_time(now)
        full = data.action if data.action_detail is None else f"{data.action}: {data.action_detail}"
        summarised = msgspec.structs.replace(
            data,
            action=SUPPRESSED,
            action_detail=None,
            time=at,
            time_nano=now,
            reclaimed_bytes=None,
            suppressed=Suppressed(
                action=data.action,
                action_detail=data.action_detail,
                count=count,
                first_time=format_time(first_nano),
                first_time_nano=first_nano,
                last_time=data.time,
                last_time_nano=data.time_nano,
            ),
        )
        return Event(
            msgspec.structs.replace(
                ce,
                id=event_id(
                    data.engine.id, first_nano, data.type, f"{SUPPRESSED}: {full}", data.actor.id
                ),
                type=f"{self.type_prefix}.{data.type}.{SUPPRESSED}",
                time=at,
                data=summarised,
            )
        )


def call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
    """The timer of a running relay (its event loop's)."""
    return asyncio.get_running_loop().call_later(delay, callback)
