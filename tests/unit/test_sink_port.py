"""The sink port's shared lifecycle and its one rule for per-event failures (relay.sink).

Adapters write plain start/send/aclose; these tests check what the base class makes of them.
Each real sink runs the same behaviours against its destination in the contract suite."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from relay.sink import (
    Event,
    PartialDeliveryError,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkError,
    SinkState,
    SinkStoppedError,
)
from tests.contract import sample_events


class Counting(Sink):
    def __init__(self, fail_start: int = 0) -> None:
        super().__init__("counting")
        self.calls: list[str] = []
        self.fail_start = fail_start

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            self.fail_start -= 1
            raise RetryableSinkError("not yet")

    async def send(self, batch: Sequence[Event]) -> None:
        self.calls.append(f"send {len(batch)}")

    async def aclose(self) -> None:
        self.calls.append("aclose")


async def test_new_started_closed_and_closed_is_final() -> None:
    sink = Counting()
    assert sink.state is SinkState.NEW
    with pytest.raises(RetryableSinkError, match="send before start"):
        await sink.send(sample_events(1))
    await sink.start()
    await sink.start()  # started already: nothing to do
    await sink.send(sample_events(2))
    assert sink.state is SinkState.STARTED
    await sink.aclose()
    await sink.aclose()
    assert sink.state is SinkState.CLOSED
    with pytest.raises(PermanentSinkError, match="send after close"):
        await sink.send(sample_events(1))
    with pytest.raises(PermanentSinkError, match="start after close"):
        await sink.start()
    assert sink.calls == ["start", "send 2", "aclose"]


async def test_a_failed_start_leaves_the_sink_new_and_close_still_runs_once() -> None:
    sink = Counting(fail_start=1)
    with pytest.raises(RetryableSinkError):
        await sink.start()
    assert sink.state is SinkState.NEW
    await sink.aclose()  # a half-made connection is released too
    await sink.aclose()
    assert sink.calls == ["start", "aclose"]


async def test_async_with_starts_and_closes_even_when_the_body_raises() -> None:
    sink = Counting()
    with pytest.raises(ValueError, match="body"):
        async with sink as entered:
            assert entered is sink and sink.state is SinkState.STARTED
            raise ValueError("body")
    assert sink.calls == ["start", "aclose"] and sink.state is SinkState.CLOSED


async def test_a_subclass_calling_super_aclose_closes_both_levels_once() -> None:
    class Wrapped(Counting):
        async def aclose(self) -> None:
            self.calls.append("wrapper aclose")
            await super().aclose()

    sink = Wrapped()
    await sink.start()
    await sink.aclose()
    await sink.aclose()
    assert sink.calls == ["start", "wrapper aclose", "aclose"]


def fold(failures: dict[int, SinkError], size: int) -> BaseException | None:
    try:
        Counting().fail(failures, size)
    except SinkError as exc:
        return exc
    return None


def test_fail_is_silent_when_nothing_failed() -> None:
    assert fold({}, 3) is None


def test_one_error_stands_for_a_batch_that_failed_the_same_way() -> None:
    down = [RetryableSinkError(f"down {i}", retry_after=w) for i, w in enumerate([1.0, 7.0, None])]
    raised = fold(dict(enumerate(down)), 3)
    assert raised is down[0]
    # The retry waits as long as the most demanding answer asked.
    assert [e.retry_after for e in down] == [7.0, 7.0, 7.0]

    gone = [SinkStoppedError("410"), SinkStoppedError("410")]
    assert fold(dict(enumerate(gone)), 2) is gone[0]

    alone = PermanentSinkError("too large")
    assert fold({0: alone}, 1) is alone


def test_mixed_or_partial_failures_are_a_partial_delivery() -> None:
    too_large, timeout = PermanentSinkError("too large"), RetryableSinkError("timeout")
    partial = fold({1: too_large, 3: timeout}, 4)
    assert isinstance(partial, PartialDeliveryError)
    assert partial.failures == {1: too_large, 3: timeout}
    assert partial.sink == "counting"

    # Every event failed, but not in the same way: each keeps its own outcome.
    mixed = fold({0: too_large, 1: timeout}, 2)
    assert isinstance(mixed, PartialDeliveryError) and set(mixed.failures) == {0, 1}
