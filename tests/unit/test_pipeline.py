"""Routing, checkpoint bookkeeping, outbox overflow and the retry/dead-letter outcomes.

The sinks here are scripted stand-ins: these tests check the pure logic of the outbox and the
retry policy. Real destinations are proven in tests/integration. Backoff waits are turned off
with stamina's testing mode (the `no_waits` fixture), except where a wait is what is tested.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
import stamina

from relay.cursor import Position
from relay.deadletter import DeadLetter
from relay.errors import (
    PartialDeliveryError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    SinkStoppedError,
)
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.outbox import Budget, SinkWorker
from relay.retry import RetryPolicy
from relay.router import RouteFilter
from relay.schema import Event
from relay.settings import RetrySettings
from relay.sink import Sink
from relay.spool import Spool
from tests.contract import sample_events

DEFAULTS = RetrySettings()


@pytest.fixture
def no_waits() -> Iterator[None]:
    """Retries without backoff waits, at most 10 attempts (fewer where `retry.attempts` says)."""
    stamina.set_testing(True, attempts=10, cap=True)
    yield
    stamina.set_testing(False)


class ScriptedSink(Sink):
    """Answers each send with the next scripted outcome (None = success)."""

    def __init__(self, script: Sequence[Exception | str | None] = ()) -> None:
        super().__init__("scripted", max_batch=10)
        self.script = list(script)
        self.calls: list[list[str]] = []
        self.delivered: list[str] = []

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Event]) -> None:
        self.calls.append([e.id for e in batch])
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, PartialDeliveryError):
            self.delivered += [e.id for i, e in enumerate(batch) if i not in outcome.failures]
            raise outcome
        if isinstance(outcome, Exception):
            raise outcome
        self.delivered += [e.id for e in batch]

    async def aclose(self) -> None:
        pass


_spools: list[Spool] = []


@pytest.fixture(autouse=True)
def _close_spools() -> Iterator[None]:
    yield
    while _spools:
        _spools.pop().close()


def make_worker(
    sink: Sink,
    tmp_path: Path,
    *,
    window: int = 1000,
    overflow: str = "dead_letter",
    max_bytes: int = 10**9,
    retry: RetrySettings = DEFAULTS,
) -> tuple[SinkWorker, Spool, DeadLetter, Metrics]:
    metrics = Metrics()
    spool = Spool(tmp_path / "spool.db", metrics)
    _spools.append(spool)
    recovered = spool.open([sink.name])
    dl = DeadLetter(tmp_path / "dl.jsonl", spool, metrics)
    worker = SinkWorker(
        sink,
        window,
        overflow,  # type: ignore[arg-type]
        max_bytes,
        Budget(10**10),
        spool,
        RetryPolicy(retry),
        dl,
        metrics,
    )
    worker.recover(spool.bits[sink.name], recovered.backlog[sink.name])
    return worker, spool, dl, metrics


def feed(worker: SinkWorker, spool: Spool, events: list[Event]) -> None:
    for e in events:
        spool.add(e, worker.bit)
        worker.put(e)


def owes_nothing(worker: SinkWorker, spool: Spool) -> bool:
    return worker.held_events == 0 and not spool.held(worker.bit, 0)


async def drain(worker: SinkWorker) -> None:
    worker.outbox.close()
    status = TaskStatus(asyncio.get_running_loop().create_future())
    await asyncio.wait_for(worker.run(status), 10)


def dead_letters(path: Path) -> list[dict]:  # type: ignore[type-arg]
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return v or 0.0


# -- routing ---------------------------------------------------------------------------------


def test_route_filter_conditions() -> None:
    events = sample_events(78)
    by = lambda f: {(e.ce.data.type, e.ce.data.action) for e in events if f.matches(e)}  # noqa: E731
    assert by(RouteFilter(types=frozenset({"volume"}))) == {
        ("volume", a) for a in ("create", "mount", "unmount", "destroy", "prune")
    }
    assert by(RouteFilter(actions=frozenset({"prune"}))) == {
        (t, "prune") for t in ("container", "network", "volume", "image", "builder")
    }
    no_exec = by(
        RouteFilter(
            types=frozenset({"container"}),
            exclude_actions=frozenset({"exec_create", "exec_start", "exec_die"}),
        )
    )
    assert ("container", "start") in no_exec and ("container", "exec_start") not in no_exec
    labelled = [e for e in events if RouteFilter(labels={"app": "web"}).matches(e)]
    assert labelled and all(e.ce.data.actor.labels["app"] == "web" for e in labelled)
    assert not [e for e in events if RouteFilter(labels={"app": "db"}).matches(e)]
    assert {
        e.ce.data.type for e in events if RouteFilter(labels={"com.example.owner": "*"}).matches(e)
    } == {"container", "image"}
    big = RouteFilter(actions=frozenset({"prune"}), min_reclaimed_bytes=1_000_000)
    assert [(e.ce.data.type, e.ce.data.reclaimed_bytes) for e in events if big.matches(e)] == [
        ("image", 1982256)
    ]
    assert RouteFilter().is_catch_all and not big.is_catch_all


# -- the cursor -----------------------------------------------------------------------------


def test_position_dedupes_by_id_within_a_bounded_window() -> None:
    p = Position(keep=3)
    p.advance(5, "a")
    p.advance(7, "b")
    p.advance(6, "c")  # the engine's stream is only roughly time-ordered
    assert p.time_nano == 7
    assert p.seen("a") and p.seen("b") and p.seen("c") and not p.seen("d")
    p.advance(8, "d")
    assert not p.seen("a") and p.ids == ["b", "c", "d"]  # bounded: the oldest id goes
    p.rewind(4)
    assert p.time_nano == 4 and p.ids == ["b", "c", "d"]


# -- outbox outcomes -------------------------------------------------------------------------


async def test_retryable_failures_are_retried_in_order_then_delivered(
    tmp_path: Path, no_waits: None
) -> None:
    sink = ScriptedSink([RetryableSinkError("down"), RetryableSinkError("down"), None])
    worker, spool, _, metrics = make_worker(sink, tmp_path)
    events = sample_events(25)
    feed(worker, spool, events)
    await drain(worker)
    assert sink.delivered == [e.id for e in events]
    assert sink.calls[0] == sink.calls[1] == sink.calls[2]  # the same batch, three times
    assert value(metrics, "relay_events_delivered_total", sink="scripted") == 25
    assert value(metrics, "relay_events_retried_total", sink="scripted") == 20
    assert owes_nothing(worker, spool)
    assert worker.failing_since is None


async def test_permanent_failure_dead_letters_the_batch_with_the_error(
    tmp_path: Path, no_waits: None
) -> None:
    sink = ScriptedSink([PermanentSinkError("422 unprocessable", sink="scripted")])
    worker, spool, dl, metrics = make_worker(sink, tmp_path)
    events = sample_events(12)
    feed(worker, spool, events)
    await drain(worker)
    records = dead_letters(dl.path)
    assert [r["event"]["id"] for r in records] == [e.id for e in events[:10]]
    assert {r["reason"] for r in records} == {"permanent"}
    assert records[0]["error"] == "[scripted] 422 unprocessable"
    assert records[0]["error_type"] == "PermanentSinkError"
    assert sink.delivered == [e.id for e in events[10:]]
    assert len(sink.calls) == 2  # never retried
    assert (
        value(metrics, "relay_events_dead_lettered_total", sink="scripted", reason="permanent")
        == 10
    )
    assert owes_nothing(worker, spool)


async def test_partial_delivery_acks_some_retries_some_dead_letters_some(
    tmp_path: Path, no_waits: None
) -> None:
    events = sample_events(4)
    partial = PartialDeliveryError(
        {1: PermanentSinkError("too large"), 3: RetryableSinkError("timeout")}
    )
    sink = ScriptedSink([partial, None])
    worker, spool, dl, _ = make_worker(sink, tmp_path)
    feed(worker, spool, events)
    await drain(worker)
    assert sink.calls == [[e.id for e in events], [events[3].id]]
    assert sink.delivered == [events[0].id, events[2].id, events[3].id]
    assert [r["event"]["id"] for r in dead_letters(dl.path)] == [events[1].id]
    assert owes_nothing(worker, spool)


async def test_exhausted_retries_dead_letter(tmp_path: Path, no_waits: None) -> None:
    sink = ScriptedSink([RetryableSinkError("down")] * 10)
    worker, spool, dl, _ = make_worker(sink, tmp_path, retry=RetrySettings(attempts=3))
    events = sample_events(2)
    feed(worker, spool, events)
    await drain(worker)
    assert len(sink.calls) == 3
    assert [r["reason"] for r in dead_letters(dl.path)] == ["retries_exhausted"] * 2


async def test_stopped_sink_dead_letters_everything_after(tmp_path: Path, no_waits: None) -> None:
    sink = ScriptedSink([SinkStoppedError("410 Gone")])
    worker, spool, dl, metrics = make_worker(sink, tmp_path)
    events = sample_events(15)
    feed(worker, spool, events)
    await drain(worker)
    later = sample_events(2)
    feed(worker, spool, later)
    assert worker.stopped_reason == "410 Gone"
    assert len(sink.calls) == 1
    assert [r["event"]["id"] for r in dead_letters(dl.path)] == [e.id for e in events + later]
    assert value(metrics, "relay_sink_stopped", sink="scripted") == 1
    assert owes_nothing(worker, spool)


async def test_a_sink_that_can_never_start_is_stopped_alone(tmp_path: Path, no_waits: None) -> None:
    class Refusing(ScriptedSink):
        async def start(self) -> None:
            raise PermanentSinkError("bad credentials, for good")

    sink = Refusing()
    worker, spool, dl, metrics = make_worker(sink, tmp_path)
    events = sample_events(3)
    feed(worker, spool, events)
    await drain(worker)
    assert worker.stopped_reason is not None and "for good" in worker.stopped_reason
    assert [r["event"]["id"] for r in dead_letters(dl.path)] == [e.id for e in events]
    assert {r["reason"] for r in dead_letters(dl.path)} == {"sink_stopped"}
    assert sink.calls == [] and owes_nothing(worker, spool)
    assert value(metrics, "relay_sink_stopped", sink="scripted") == 1


async def test_unexpected_exceptions_are_treated_as_retryable(
    tmp_path: Path, no_waits: None
) -> None:
    sink = ScriptedSink([KeyError("bug in a client library"), None])
    worker, spool, _, _ = make_worker(sink, tmp_path)
    events = sample_events(3)
    feed(worker, spool, events)
    await drain(worker)
    assert sink.delivered == [e.id for e in events]


@pytest.mark.parametrize("overflow", ["dead_letter", "drop_oldest", "drop_newest"])
def test_overflow_policies(tmp_path: Path, overflow: str) -> None:
    sink = ScriptedSink()
    events = sample_events(5)
    room = sum(len(e.json()) for e in events[:3])
    worker, spool, dl, metrics = make_worker(sink, tmp_path, max_bytes=room, overflow=overflow)
    feed(worker, spool, events)
    kept = [e.id for e in worker.outbox.take_all()]
    ids = [e.id for e in events]
    if overflow == "dead_letter":
        assert kept == ids[:3]
        assert [r["event"]["id"] for r in dead_letters(dl.path)] == ids[3:]
    elif overflow == "drop_oldest":
        # The oldest go until the newest fits: what is kept is the newest run that fits.
        assert kept == ids[len(ids) - len(kept) :] and ids[-1] in kept
        assert sum(len(e.json()) for e in events if e.id in kept) <= room
        assert value(metrics, "relay_events_dropped_total", sink="scripted") == 5 - len(kept)
    else:
        assert kept == ids[:3]
        assert value(metrics, "relay_events_dropped_total", sink="scripted") == 2
    # What went over is finished for the spool too: only what was kept is still owed.
    assert worker.held_events == len(kept)
    assert [e.id for e in spool.held(worker.bit, 0)] == kept


# -- the retry policy ------------------------------------------------------------------------


async def test_retry_after_replaces_the_backoff_and_is_capped() -> None:
    policy = RetryPolicy(RetrySettings(wait_initial=10, wait_max=10, retry_after_max=0.3))
    seen: list[float] = []
    started = time.monotonic()
    errors = [RetryableSinkError("429", retry_after=0.2), RetryableSinkError("429", retry_after=99)]

    async def attempt() -> None:
        seen.append(time.monotonic() - started)
        if errors:
            raise errors.pop(0)

    await policy.deliver(attempt)
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert len(seen) == 3
    assert 0.19 <= gaps[0] < 5.0  # Retry-After 0.2 s, not the 10 s backoff
    assert 0.29 <= gaps[1] < 5.0  # 99 s capped at retry_after_max


async def test_the_first_attempt_outside_stamina_counts_as_its_first() -> None:
    # The first attempt runs before stamina's retry context (which costs ~55 µs a batch); the
    # bound, the backoff schedule and the error raised at the end are stamina's all the same.
    policy = RetryPolicy(RetrySettings(attempts=3, wait_initial=0.05, wait_max=10, wait_jitter=0))
    seen: list[float] = []

    async def attempt() -> None:
        seen.append(time.monotonic())
        raise RetryableSinkError(f"attempt {len(seen)}")

    with pytest.raises(RetryableSinkError, match="attempt 3"):
        await policy.deliver(attempt)
    assert len(seen) == 3
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert 0.05 <= gaps[0] < 0.1 + 5.0
    assert 0.1 <= gaps[1]  # doubled: the second wait of stamina's schedule, not its first
    assert gaps[1] > gaps[0]


async def test_permanent_and_foreign_errors_are_never_retried(no_waits: None) -> None:
    policy = RetryPolicy(DEFAULTS)
    for exc in (PermanentSinkError("no"), ValueError("no")):
        calls = 0

        async def attempt(exc: Exception = exc) -> None:
            nonlocal calls
            calls += 1
            raise exc

        with pytest.raises(type(exc)):
            await policy.deliver(attempt)
        assert calls == 1
    assert issubclass(SinkStoppedError, SinkError)


async def test_the_first_retry_waits_for_retry_after_too(tmp_path: Path) -> None:
    stamps: list[float] = []

    class Stamping(ScriptedSink):
        async def send(self, batch: Sequence[Event]) -> None:
            stamps.append(time.monotonic())
            await super().send(batch)

    sink = Stamping([RetryableSinkError("429", retry_after=0.3), None])
    # A backoff of 10 s: a retry after 0.3 s can only be the Retry-After.
    worker, spool, _, _ = make_worker(
        sink, tmp_path, retry=RetrySettings(wait_initial=10, wait_max=10, retry_after_max=5)
    )
    feed(worker, spool, sample_events(1))
    await drain(worker)
    assert len(stamps) == 2
    assert 0.3 <= stamps[1] - stamps[0] < 5.0


async def test_linger_waits_for_a_full_batch_but_not_longer() -> None:
    from relay.outbox import Outbox

    async def nothing_on_disk(after: int, limit: int) -> list[Event]:
        return []

    box = Outbox(100, nothing_on_disk)
    events = sample_events(7)
    box.put(events[0])

    async def trickle() -> None:
        for e in events[1:5]:
            await asyncio.sleep(0.01)
            box.put(e)

    feeder = asyncio.create_task(trickle())
    batch = await box.get_batch(5, linger=5.0)
    await feeder
    assert [e.id for e in batch] == [e.id for e in events[:5]]  # full before the deadline

    box.put(events[5])
    started = time.monotonic()
    batch = await box.get_batch(5, linger=0.2)
    assert [e.id for e in batch] == [events[5].id]  # not full: sent at the deadline
    assert 0.19 <= time.monotonic() - started < 2.0

    box.put(events[6])
    box.close()
    started = time.monotonic()
    assert [e.id for e in await box.get_batch(5, linger=5.0)] == [events[6].id]
    assert time.monotonic() - started < 1.0  # closing ends the wait
