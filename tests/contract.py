"""The sink contract: one abstract suite that every sink's tests subclass and run against the
real destination (stdout: a real pipe; kafka: tansu; mqtt: mosquitto; webhook: an aiohttp
server; the example plugin: a real file).

A subclass provides:
- `make_sink()` -> a Sink built for the real destination (not started), with the sink's
  default timeouts;
- `read_back(sink, ids, timeout)` -> every event the destination received in this test, in
  structured form (binary mode turned back into it) and in arrival order, once all of `ids`
  are among them; AssertionError when the deadline passes first. Nothing is filtered out, so
  a test can see what must not have arrived and what arrived twice;
- `read_back_sdk(sink, ids, timeout)` -> the same events as the CloudEvents SDK parses their
  wire form (the form a consumer of that destination gets);
- `make_unreachable_sink()` -> a Sink pointed at an address where nothing listens;

and, for each behaviour below that its destination can show, one more hook. A destination that
cannot show one names it in `cannot`, with the reason, and that test is skipped with it:
- "refuse_one_event": `make_undeliverable(event)` -> that event (or one with its id) made so
  that the real destination refuses it while it takes the others, in one send;
- "dead_letter_one_event": the same hook; through the relay's outbox worker only that event is
  dead-lettered (the worker sends a refused batch's events one at a time to find it, so a
  destination that answers a batch as a whole shows this one too);
- "restart": `restart_destination()` stops the destination and starts it again at the same
  address, keeping what it had received;
- "slow": `make_slow_sink(delay)` -> a sink whose every exchange with the destination takes
  `delay` seconds longer each way (harness.DelayProxy in front of it);
- "secrets": `make_secret_sink()` -> a sink configured with credentials, and the secret values
  in them; its start or send must fail for real (wrong credentials, nobody listening).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
from cloudevents.http import CloudEvent

from relay.deadletter import DeadLetter
from relay.errors import (
    PartialDeliveryError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.normalize import Normalizer
from relay.outbox import Budget, SinkWorker
from relay.retry import RetryPolicy
from relay.schema import Engine, Event
from relay.settings import RetrySettings
from relay.sink import Sink, SinkState
from relay.spool import Spool

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_seq = itertools.count(1)

# Latency the slow-destination test adds each way: well above a loopback round trip, well below
# every default timeout of the sinks.
SLOW_DELAY = 0.15
# Deadlines of the waits below: generous, since they only bound a failing test.
READ_TIMEOUT = 30.0
RESTART_DEADLINE = 90.0


def fixture_lines(name: str = "engine-28.5.2-events.jsonl") -> list[bytes]:
    """Recorded real engine messages (copied from shared/fixtures)."""
    return [line for line in (FIXTURES / name).read_bytes().splitlines() if line.strip()]


def sample_events(count: int, engine_id: str | None = None) -> list[Event]:
    """`count` real recorded events, normalized for a fresh engine id (so ids are unique per
    call), in engine order."""
    engine = Engine(
        id=engine_id or f"TEST:{uuid.uuid4().hex[:12]}",
        name="contract",
        version="28.5.2",
        api_version="1.51",
    )
    normalizer = Normalizer(engine)
    lines = fixture_lines()
    out: list[Event] = []
    for line in itertools.islice(itertools.cycle(lines), count):
        ce = normalizer.normalize(line)
        # Recycled lines would repeat ids: shift time so every event is distinct.
        seq = next(_seq)
        ce = normalizer.build(
            ce.data.type,
            _full_action(ce),
            ce.data.actor.id,
            {**ce.data.actor.attributes, **ce.data.actor.labels},
            ce.data.scope,
            ce.data.time_nano + seq,
        )
        out.append(Event(ce, seq))
    return out


def rebuilt(event: Event, attributes: Mapping[str, str]) -> Event:
    """`event` as the normalizer builds it with `attributes` added to the actor's (labels and
    a name included): the same engine message otherwise, hence the same id and seq."""
    data = event.ce.data
    ce = Normalizer(data.engine).build(
        data.type,
        _full_action(event.ce),
        data.actor.id,
        {**data.actor.attributes, **data.actor.labels, **attributes},
        data.scope,
        data.time_nano,
    )
    return Event(ce, event.seq)


def _full_action(ce: Any) -> str:
    d = ce.data
    return f"{d.action}: {d.action_detail}" if d.action_detail else d.action


def structured(event: Event) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(event.json())
    return result


def ids(events: Iterable[Event]) -> list[str]:
    return [e.id for e in events]


def received_ids(got: Iterable[Mapping[str, Any]]) -> list[str]:
    return [str(g["id"]) for g in got]


async def send_until_delivered(
    sink: Sink,
    batch: Sequence[Event],
    deadline: float,
    backoff: float = 0.2,
) -> int:
    """Send `batch` the way the outbox does: retry what failed retryably, in order, until all
    of it is acknowledged; a permanent failure fails the test. Returns the attempts made.

    The short pause between attempts is a retry backoff inside a deadline, not a wait for
    some state (the outbox's policy would wait longer)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    pending = list(batch)
    attempts = 0
    while True:
        attempts += 1
        try:
            await sink.send(pending)
            return attempts
        except PartialDeliveryError as exc:
            permanent = {
                i: e for i, e in exc.failures.items() if not isinstance(e, RetryableSinkError)
            }
            assert not permanent, f"permanent failures while retrying: {permanent}"
            pending = [e for i, e in enumerate(pending) if i in exc.failures]
            error: SinkError = exc
        except RetryableSinkError as exc:
            error = exc
        if loop.time() >= give_up:
            raise AssertionError(
                f"{len(pending)} event(s) still undelivered after {deadline:g}s "
                f"and {attempts} attempts: {error}"
            ) from error
        await asyncio.sleep(backoff)


def _texts_of(error: BaseException) -> list[str]:
    """Everything an operator may see of an error: its message, repr and traceback, with the
    chain of causes."""
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


class SinkContract(abc.ABC):
    # Behaviours (see the module docstring) this destination cannot show, each with the reason;
    # their tests are skipped with it.
    cannot: ClassVar[Mapping[str, str]] = {}

    @abc.abstractmethod
    def make_sink(self) -> Sink: ...

    @abc.abstractmethod
    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - a deadline for polling, not a cancellation scope
    ) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def read_back_sdk(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - a deadline for polling, not a cancellation scope
    ) -> list[CloudEvent]: ...

    @abc.abstractmethod
    def make_unreachable_sink(self) -> Sink: ...

    # -- hooks of the behaviours a destination may lack ------------------------------------

    def make_undeliverable(self, event: Event) -> Event:
        raise NotImplementedError(f"{type(self).__name__}: make_undeliverable, or declare it")

    async def restart_destination(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}: restart_destination, or declare it")

    async def make_slow_sink(self, delay: float) -> Sink:
        raise NotImplementedError(f"{type(self).__name__}: make_slow_sink, or declare it")

    def make_secret_sink(self) -> tuple[Sink, list[str]]:
        raise NotImplementedError(f"{type(self).__name__}: make_secret_sink, or declare it")

    def _requires(self, behaviour: str) -> None:
        reason = self.cannot.get(behaviour)
        if reason is not None:
            pytest.skip(f"{type(self).__name__} cannot show {behaviour!r}: {reason}")

    # -- 1. order ------------------------------------------------------------------------------

    async def test_delivers_every_event_in_order(self) -> None:
        sink = self.make_sink()
        events = sample_events(30)
        await sink.start()
        try:
            await sink.send(events[:10])
            await sink.send(events[10:])
            got = await self.read_back(sink, ids(events), READ_TIMEOUT)
        finally:
            await sink.aclose()
        # Exactly these, once each, in order, with every attribute and the data intact.
        assert received_ids(got) == ids(events)
        assert got == [structured(e) for e in events]

    # -- 2. closed is final --------------------------------------------------------------------

    async def test_closed_is_final(self) -> None:
        sink = self.make_sink()
        before, late = sample_events(3), sample_events(3)
        await sink.start()
        await sink.send(before)
        await sink.aclose()
        assert sink.state is SinkState.CLOSED
        with pytest.raises(PermanentSinkError):
            await sink.send(late)
        with pytest.raises(PermanentSinkError):
            await sink.start()
        await sink.aclose()  # a no-op: nothing raised, nothing reopened
        assert sink.state is SinkState.CLOSED
        with pytest.raises(PermanentSinkError):
            await sink.send(late)
        # Whatever the closed sink was handed never reached the destination: a new sink's
        # event comes right after the ones sent before the close.
        marker = sample_events(1)
        async with self.make_sink() as other:
            await other.send(marker)
            got = await self.read_back(other, ids(before + marker), READ_TIMEOUT)
        assert received_ids(got) == ids(before + marker)

    # -- 3. send before start ------------------------------------------------------------------

    async def test_send_before_start_is_retryable_and_sends_nothing(self) -> None:
        sink = self.make_sink()
        early, later = sample_events(3), sample_events(3)
        with pytest.raises(RetryableSinkError):
            await sink.send(early)
        assert sink.state is SinkState.NEW
        await sink.start()
        try:
            # The outbox's retry of the refused batch, then the next one.
            await sink.send(early)
            await sink.send(later)
            got = await self.read_back(sink, ids(early + later), READ_TIMEOUT)
        finally:
            await sink.aclose()
        # Once each: the attempt before start left nothing behind.
        assert received_ids(got) == ids(early + later)

    # -- 4. one undeliverable event among good ones ------------------------------------------

    async def test_one_undeliverable_event_fails_alone(self, tmp_path: Path) -> None:
        self._requires("refuse_one_event")
        refused_at = 3
        batch = self._batch_with_one_undeliverable(refused_at)
        good = [e for i, e in enumerate(batch) if i != refused_at]
        sink = self.make_sink()
        await sink.start()
        try:
            with pytest.raises(PartialDeliveryError) as info:
                await sink.send(batch)
            got = await self.read_back(sink, ids(good), READ_TIMEOUT)
        finally:
            await sink.aclose()
        assert list(info.value.failures) == [refused_at]
        assert isinstance(info.value.failures[refused_at], PermanentSinkError)
        assert received_ids(got) == ids(good)

    async def test_the_worker_dead_letters_one_undeliverable_event_alone(
        self, tmp_path: Path
    ) -> None:
        # Through the relay's own outbox worker: the refused event, and only it, goes to the
        # dead-letter file; every event of the batch ends exactly once.
        self._requires("dead_letter_one_event")
        refused_at = 3
        batch = self._batch_with_one_undeliverable(refused_at)
        refused = batch[refused_at]
        good = [e for i, e in enumerate(batch) if i != refused_at]
        sink = self.make_sink()
        metrics = Metrics()
        spool = Spool(tmp_path / "spool.db", metrics)
        recovered = spool.open([sink.name])
        dead_letter = DeadLetter(tmp_path / "dead-letter.jsonl", spool, metrics)
        worker = SinkWorker(
            sink,
            1000,
            "dead_letter",
            10**9,
            Budget(10**9),
            spool,
            RetryPolicy(RetrySettings()),
            dead_letter,
            metrics,
        )
        worker.recover(spool.bits[sink.name], recovered.backlog[sink.name])
        for event in batch:
            spool.add(event, worker.bit)
            worker.put(event)
        worker.outbox.close()
        try:
            async with asyncio.timeout(RESTART_DEADLINE):
                await worker.run(TaskStatus(asyncio.get_running_loop().create_future()))
            got = await self.read_back(sink, ids(good), READ_TIMEOUT)
        finally:
            await sink.aclose()
            dead_letter.close()
            spool.close()
        records = [msgspec.json.decode(line) for line in dead_letter.path.read_bytes().splitlines()]
        assert [(r["event"]["id"], r["reason"], r["sink"]) for r in records] == [
            (refused.id, "permanent", sink.name)
        ]
        # Every event of the batch ended: the spool owes none of them any more.
        assert worker.held_events == 0 and not spool.held(worker.bit, 0)
        this_run = set(ids(good))
        assert [i for i in received_ids(got) if i in this_run] == ids(good)

    def _batch_with_one_undeliverable(self, index: int) -> list[Event]:
        batch = sample_events(7)
        bad = self.make_undeliverable(batch[index])
        assert bad.id == batch[index].id, "the hook keeps the event's identity"
        batch[index] = bad
        return batch

    # -- 5. destination restart mid-stream ------------------------------------------------------

    async def test_destination_restart_mid_stream(self) -> None:
        self._requires("restart")
        sink = self.make_sink()
        first, second = sample_events(10), sample_events(10)
        await sink.start()
        try:
            await sink.send(first)
            await self.read_back(sink, ids(first), READ_TIMEOUT)
            await self.restart_destination()
            await send_until_delivered(sink, second, RESTART_DEADLINE)
            got = await self.read_back(sink, ids(first + second), READ_TIMEOUT)
        finally:
            await sink.aclose()
        sent = {e.id: structured(e) for e in first + second}
        # At least once: a re-sent duplicate may arrive, always as the same event.
        assert set(received_ids(got)) == set(sent)
        assert all(g == sent[g["id"]] for g in got)
        assert list(dict.fromkeys(received_ids(got))) == ids(first + second)

    # -- 6. a slow destination -----------------------------------------------------------------

    async def test_slow_destination_with_default_timeouts(self) -> None:
        self._requires("slow")
        sink = await self.make_slow_sink(SLOW_DELAY)
        events = sample_events(30)
        await sink.start()
        try:
            # One attempt, no retry: a slow destination is no failure.
            await sink.send(events)
            got = await self.read_back(sink, ids(events), READ_TIMEOUT)
        finally:
            await sink.aclose()
        assert received_ids(got) == ids(events)
        assert got == [structured(e) for e in events]

    # -- 7. secrets stay out of logs and errors ------------------------------------------------

    async def test_secrets_appear_in_no_log_error_or_repr(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        self._requires("secrets")
        caplog.set_level(logging.DEBUG)
        sink, secrets = self.make_secret_sink()
        assert secrets and all(secrets), "the hook names the secrets it configured"
        errors: list[SinkError] = []

        async def attempt(step: Callable[[], Awaitable[None]]) -> None:
            try:
                await step()
            except SinkError as exc:
                errors.append(exc)

        events = sample_events(3)
        await attempt(lambda: sink.send(events))  # before start
        lifecycle_errors = len(errors)
        await attempt(sink.start)
        if sink.state is SinkState.STARTED:
            await attempt(lambda: sink.send(events))
        real_failures = len(errors) - lifecycle_errors
        shown = [repr(sink), str(sink)]
        await sink.aclose()
        await attempt(lambda: sink.send(events))  # after close
        assert lifecycle_errors == 1 and real_failures >= 1, errors
        for error in errors:
            shown += _texts_of(error)
        for record in caplog.records:
            shown.append(record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                shown += _texts_of(record.exc_info[1])
        shown.append(caplog.text)
        for secret in secrets:
            leaks = [text for text in shown if secret in text]
            assert not leaks, f"a secret shows in: {leaks[0][:500]}"

    # -- 8. the CloudEvents SDK reads what arrived ---------------------------------------------

    async def test_the_cloudevents_sdk_parses_what_arrived(self) -> None:
        sink = self.make_sink()
        events = sample_events(20)
        await sink.start()
        try:
            await sink.send(events)
            parsed = await self.read_back_sdk(sink, ids(events), READ_TIMEOUT)
        finally:
            await sink.aclose()
        assert [p["id"] for p in parsed] == ids(events)
        for event, p in zip(events, parsed, strict=True):
            ce = event.ce
            assert p["specversion"] == "1.0"
            assert (p["id"], p["source"], p["type"]) == (ce.id, ce.source, ce.type)
            assert p.get("subject") == ce.subject
            assert p["time"] == ce.time
            assert p.get("dataschema") == ce.dataschema
            # Not datacontenttype: the SDK's Kafka structured reader (1.x) puts the record's
            # content-type there, the envelope's media type, not the event's attribute.
            assert p.data == structured(event)["data"]

    # -- 9. unreachable destination ------------------------------------------------------------

    async def test_unreachable_destination_is_retryable(self) -> None:
        sink = self.make_unreachable_sink()
        with pytest.raises(RetryableSinkError):
            await sink.start()
            await sink.send(sample_events(1))
        await sink.aclose()

    # -- 10. prune events ----------------------------------------------------------------------

    async def test_prune_events_keep_reclaimed_bytes(self) -> None:
        sink = self.make_sink()
        prunes = [e for e in sample_events(200) if e.ce.data.action == "prune"]
        assert prunes, "the recorded fixtures hold prune events"
        await sink.start()
        try:
            await sink.send(prunes)
            got = await self.read_back(sink, ids(prunes), READ_TIMEOUT)
        finally:
            await sink.aclose()
        assert [g["data"]["reclaimed_bytes"] for g in got] == [
            e.ce.data.reclaimed_bytes for e in prunes
        ]

    # -- 11. close is idempotent, started or not -----------------------------------------------

    async def test_close_is_idempotent_and_final(self) -> None:
        started = self.make_sink()
        await started.start()
        await started.aclose()
        await started.aclose()
        never_started = self.make_sink()
        await never_started.aclose()
        await never_started.aclose()
        for sink in (started, never_started):
            assert sink.state is SinkState.CLOSED
            with pytest.raises(PermanentSinkError):
                await sink.start()
            with pytest.raises(PermanentSinkError):
                await sink.send(sample_events(1))
