"""The sink contract: one abstract suite that every sink's tests subclass and run against the
real destination (stdout: a real pipe; kafka: tansu; mqtt: mosquitto; webhook: an aiohttp
server).

A subclass provides three things:
- `make_sink(self)` -> a Sink built for the real destination (not started);
- `read_back(self, sink, ids, timeout)` -> the structured CloudEvents (dicts, binary mode
  turned back into structured form) that the destination received with those ids, in arrival
  order; waits until all arrived or the deadline passes;
- `make_unreachable_sink(self)` -> a Sink pointed at an address where nothing listens.
"""

from __future__ import annotations

import abc
import itertools
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relay.errors import RetryableSinkError, SinkError
from relay.normalize import Normalizer
from relay.schema import Engine, Event
from sinks.base import Sink

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_seq = itertools.count(1)


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


def _full_action(ce: Any) -> str:
    d = ce.data
    return f"{d.action}: {d.action_detail}" if d.action_detail else d.action


def structured(event: Event) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(event.json())
    return result


class SinkContract(abc.ABC):
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
    def make_unreachable_sink(self) -> Sink: ...

    async def test_delivers_every_event_in_order(self) -> None:
        sink = self.make_sink()
        events = sample_events(30)
        await sink.start()
        try:
            await sink.send(events[:10])
            await sink.send(events[10:])
            got = await self.read_back(sink, [e.id for e in events], 20.0)
        finally:
            await sink.aclose()
        assert [g["id"] for g in got] == [e.id for e in events]
        assert got == [structured(e) for e in events]

    async def test_prune_events_keep_reclaimed_bytes(self) -> None:
        sink = self.make_sink()
        prunes = [e for e in sample_events(200) if e.ce.data.action == "prune"]
        assert prunes, "the recorded fixtures hold prune events"
        await sink.start()
        try:
            await sink.send(prunes)
            got = await self.read_back(sink, [e.id for e in prunes], 20.0)
        finally:
            await sink.aclose()
        assert [g["data"]["reclaimed_bytes"] for g in got] == [
            e.ce.data.reclaimed_bytes for e in prunes
        ]

    async def test_close_is_idempotent_and_final(self) -> None:
        sink = self.make_sink()
        await sink.start()
        await sink.aclose()
        await sink.aclose()
        with pytest.raises(SinkError):
            await sink.send(sample_events(1))

    async def test_unreachable_destination_is_retryable(self) -> None:
        sink = self.make_unreachable_sink()
        with pytest.raises(RetryableSinkError):
            await sink.start()
            await sink.send(sample_events(1))
        await sink.aclose()
