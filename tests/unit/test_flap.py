"""Flap suppression's windows (relay.flap) with an injected clock, and its crash safety against a
real SQLite spool: what a window holds survives a crash as rows, and the next start sums them up.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.flap import FlapSettings, Suppressor, held_name
from relay.metrics import Metrics
from relay.normalize import Normalizer
from relay.router import Target
from relay.schema import Engine, Event
from relay.spool import Spool

ENGINE = Engine(id="ENGINE", name="test", version="20.10.24", api_version="1.41")
NORMALIZER = Normalizer(ENGINE, type_prefix="com.example")
T0 = 1_700_000_000_000_000_000
_seq = itertools.count(1)


def event(action: str, actor: str = "c1", at: int = 0, type_: str = "container") -> Event:
    ce = NORMALIZER.build(type_, action, actor, {"name": f"name-{actor}"}, "local", T0 + at)
    return Event(ce, next(_seq))


@dataclass(eq=False)
class FakeTarget:
    name: str
    bit: int
    got: list[Event] = field(default_factory=list)

    def put(self, event: Event) -> None:
        self.got.append(event)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    """A pipeline's view of the suppressor: `emit` routes an event to every target."""

    suppressor: Suppressor
    targets: list[FakeTarget]
    clock: Clock
    metrics: Metrics
    done: list[tuple[int, int]]
    held: dict[int, int] = field(default_factory=dict)  # seq -> held bits

    def emit(self, ev: Event) -> None:
        self.suppressor.tick()
        passing, held = self.suppressor.split(ev, list(self.targets))
        if held:
            self.held[ev.seq] = held
        for target in passing:
            target.put(ev)

    def suppressed(self, sink: str, action: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "relay_events_suppressed_total", {"sink": sink, "action": action}
        )
        return value or 0.0


def rig(settings: FlapSettings | None = None, **kwargs: object) -> Rig:
    clock = Clock()
    metrics = Metrics()
    flapping = FakeTarget("flapping", 1)
    plain = FakeTarget("plain", 2)
    done: list[tuple[int, int]] = []

    def deliver(target: Target, summary: Event) -> None:
        summary.seq = next(_seq)
        target.put(summary)

    suppressor = Suppressor(
        [(flapping, "flapping", settings or FlapSettings())],
        type_prefix="com.example",
        deliver=deliver,
        done=lambda bit, seq: done.append((bit, seq)),
        metrics=metrics,
        clock=clock,
        wall=lambda: T0 + 10**12,
        **kwargs,  # type: ignore[arg-type]
    )
    suppressor.opened({held_name("flapping"): 4}, {})
    return Rig(suppressor, [flapping, plain], clock, metrics, done)


def kinds(events: list[Event]) -> list[str]:
    return [f"{e.ce.data.action}:{e.ce.data.actor.id}" for e in events]


def test_the_first_events_pass_the_rest_are_held_and_summarised_once_when_the_window_closes() -> (
    None
):
    r = rig(FlapSettings(window=60, max_events=3))
    flapping, plain = r.targets
    dies = [event("die", at=i * 10**9) for i in range(8)]
    for ev in dies:
        r.emit(ev)
        r.clock.now += 1
    assert flapping.got == dies[:3]
    assert plain.got == dies, "a sink without flap: gets every event"
    assert r.held == {ev.seq: 4 for ev in dies[3:]}, "held under the sink's held bit"
    assert r.suppressed("flapping", "die") == 5
    assert r.done == []

    r.clock.now = 1000.0 + 59.9
    r.suppressor.tick()
    assert len(flapping.got) == 3, "not before the window closes"
    r.clock.now = 1000.0 + 60
    r.suppressor.tick()
    summary = flapping.got[3]
    assert len(flapping.got) == 4
    assert summary.ce.type == "com.example.container.suppressed"
    data = summary.ce.data
    assert data.type == "container" and data.action == "suppressed"
    assert data.actor.id == "c1" and data.actor.name == "name-c1"
    assert summary.ce.subject == "name-c1"
    assert data.suppressed is not None
    assert data.suppressed.action == "die" and data.suppressed.action_detail is None
    assert data.suppressed.count == 5
    assert data.suppressed.first_time_nano == dies[3].time_nano
    assert data.suppressed.last_time_nano == dies[7].time_nano
    assert data.suppressed.first_time == dies[3].ce.time
    assert data.suppressed.last_time == dies[7].ce.time
    assert data.time_nano == T0 + 10**12
    assert r.done == [(4, ev.seq) for ev in dies[3:]], "held bits cleared with the summary"
    assert summary.id not in {ev.id for ev in dies}

    # The next event opens a new window: it passes again, and so do the two after it.
    r.clock.now += 1
    again = [event("die", at=(100 + i) * 10**9) for i in range(4)]
    for ev in again:
        r.emit(ev)
    assert flapping.got[4:] == again[:3]
    assert r.suppressed("flapping", "die") == 6


def test_keys_are_actor_action_and_detail() -> None:
    r = rig(FlapSettings(max_events=1))
    flapping, _ = r.targets
    stream = [
        event("start", "a"),
        event("start", "b"),
        event("die", "a"),
        event("health_status: healthy", "a"),
        event("health_status: unhealthy", "a"),
        event("start", "a"),  # held
        event("health_status: unhealthy", "a"),  # held
        event("health_status: unhealthy", "a"),  # held
        event("start", "b"),  # held
    ]
    for ev in stream:
        r.emit(ev)
    assert flapping.got == stream[:5]
    r.suppressor.close_all()
    summaries = [(e.ce.data.actor.id, e.ce.data.suppressed) for e in flapping.got[5:]]
    # In the order the windows opened; the windows that held nothing say nothing.
    assert [(actor, s.action, s.action_detail, s.count) for actor, s in summaries if s] == [
        ("a", "start", None, 1),
        ("b", "start", None, 1),
        ("a", "health_status", "unhealthy", 2),
    ]
    assert len(summaries) == 3


def test_other_actions_prunes_and_the_relays_own_events_always_pass() -> None:
    r = rig(FlapSettings(max_events=1, actions=frozenset({"die", "prune", "gap", "create"})))
    flapping, _ = r.targets
    stream = [
        *(event("exec_start: sh", "a") for _ in range(3)),  # not a windowed action
        *(event("prune", "", type_="volume") for _ in range(3)),  # no actor
        *(event("gap", "ENGINE", type_="relay") for _ in range(3)),  # the relay's own
    ]
    for ev in stream:
        r.emit(ev)
    assert flapping.got == stream
    assert r.held == {}


def test_close_all_summarises_open_windows_that_held_something_and_stops_the_timer() -> None:
    armed: list[tuple[float, Callable[[], None]]] = []

    class Handle:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    handles: list[Handle] = []

    def schedule(delay: float, callback: Callable[[], None]) -> Handle:
        armed.append((delay, callback))
        handles.append(Handle())
        return handles[-1]

    r = rig(FlapSettings(window=30, max_events=2), schedule=schedule)
    flapping, _ = r.targets
    for ev in [event("die", "a"), event("die", "a"), event("die", "a"), event("die", "b")]:
        r.emit(ev)
        r.clock.now += 1
    assert [delay for delay, _ in armed] == [30], "one timer, for the first window to close"
    r.suppressor.close_all()
    assert handles[0].cancelled
    assert [(e.ce.data.actor.id, e.ce.data.suppressed.count) for e in flapping.got[3:]] == [
        ("a", 1)
    ]
    # A timer that fires after the drain delivers nothing more.
    armed[0][1]()
    assert len(flapping.got) == 4


def test_the_timer_closes_windows_in_order_and_rearms_for_the_next() -> None:
    armed: list[tuple[float, Callable[[], None]]] = []

    class Handle:
        def cancel(self) -> None:
            pass

    def schedule(delay: float, callback: Callable[[], None]) -> Handle:
        armed.append((delay, callback))
        return Handle()

    r = rig(FlapSettings(window=10, max_events=1), schedule=schedule)
    flapping, _ = r.targets
    r.emit(event("die", "a"))
    r.emit(event("die", "a"))  # held
    r.clock.now += 4
    r.emit(event("die", "b"))
    r.emit(event("die", "b"))  # held
    assert [d for d, _ in armed] == [10]
    r.clock.now += 6
    armed[-1][1]()
    assert [e.ce.data.actor.id for e in flapping.got[2:]] == ["a"]
    assert [d for d, _ in armed] == [10, 4], "re-armed for b's window"
    r.clock.now += 4
    armed[-1][1]()
    assert [e.ce.data.actor.id for e in flapping.got[2:]] == ["a", "b"]
    assert len(armed) == 2, "nothing open: no timer"


_spools: list[Spool] = []


@pytest.fixture(autouse=True)
def _close_spools() -> Iterator[None]:
    yield
    while _spools:
        _spools.pop().close()


def spool_at(path: Path) -> tuple[Spool, dict[str, int]]:
    spool = Spool(path / "spool.db", Metrics())
    _spools.append(spool)
    recovered = spool.open(["sink", held_name("sink")])
    spool.next_seq = recovered.next_seq  # type: ignore[attr-defined]
    return spool, {name: b.events for name, b in recovered.backlog.items()}


def spool_rig(spool: Spool, clock: Clock) -> tuple[Suppressor, FakeTarget]:
    target = FakeTarget("sink", spool.bits["sink"])
    seqs = itertools.count(spool.next_seq)  # type: ignore[attr-defined]

    def deliver(t: Target, summary: Event) -> None:
        # As Pipeline.deliver_to: a new sequence number, in the spool, then the sink.
        summary.seq = next(seqs)
        spool.add(summary, t.bit)
        t.put(summary)

    suppressor = Suppressor(
        [(target, "sink", FlapSettings(window=60, max_events=2))],
        type_prefix="com.example",
        deliver=deliver,
        done=spool.done,
        metrics=Metrics(),
        clock=clock,
    )
    return suppressor, target


async def test_what_a_window_holds_survives_a_crash_and_is_summarised_at_the_next_start(
    tmp_path: Path,
) -> None:
    clock = Clock()
    spool, backlog = spool_at(tmp_path)
    suppressor, target = spool_rig(spool, clock)
    suppressor.opened(spool.bits, backlog)
    await suppressor.recover(spool.load)
    assert target.got == []
    dies = [event("oom", at=i) for i in range(7)]
    for seq, ev in enumerate(dies, start=1):
        ev.seq = seq
        passing, held = suppressor.split(ev, [target])
        owed = held
        for t in passing:
            owed |= t.bit
            t.put(ev)
        spool.add(ev, owed)
        # The sink delivers what it got at once.
        for t in passing:
            spool.done(t.bit, ev.seq)
    assert target.got == dies[:2]
    assert await spool.commit()
    # What a summary at the drain would have been (not delivered: the process is killed).
    expected = suppressor.summary(dies[-1], dies[2].time_nano, 5)
    # SIGKILL: no drain, no final commit; the next start opens the same file.
    spool.close()
    _spools.remove(spool)

    spool, backlog = spool_at(tmp_path)
    assert backlog == {"sink": 0, held_name("sink"): 5}
    suppressor, target = spool_rig(spool, clock)
    suppressor.opened(spool.bits, backlog)
    await suppressor.recover(spool.load)
    [summary] = target.got
    assert summary.id == expected.id, "the same id as the summary the killed run would send"
    assert summary.ce.data.suppressed == expected.ce.data.suppressed
    assert summary.ce.data.suppressed is not None
    assert summary.ce.data.suppressed.count == 5
    assert await spool.commit()
    spool.close()
    _spools.remove(spool)

    # Summarised once: the held rows went in the commit that wrote the summary.
    spool, backlog = spool_at(tmp_path)
    assert backlog == {"sink": 1, held_name("sink"): 0}
    [owed] = await spool.load(spool.bits["sink"], 0, 10)
    assert owed.id == summary.id
