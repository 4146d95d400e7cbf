"""The relay's delivery path for the sink benchmarks: a sink's worker with its spool (the writer
committing as in the relay) and dead-letter records, built the way the relay builds them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from relay.deadletter import DeadLetter
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.outbox import Budget, SinkWorker
from relay.retry import RetryPolicy
from relay.schema import Event
from relay.settings import OutboxSettings, RetrySettings
from relay.sink import Sink
from relay.spool import Spool


@asynccontextmanager
async def delivery_path(sink: Sink, workdir: Path) -> AsyncIterator[SinkWorker]:
    """A started worker for `sink` (default window and retry policy), its spool's writer
    running; both stopped on exit."""
    metrics = Metrics()
    spool = Spool(workdir / f"spool-{id(sink)}.db", metrics)
    recovered = spool.open([sink.name])
    dead_letter = DeadLetter(workdir / f"dl-{id(sink)}.jsonl", spool, metrics)
    worker = SinkWorker(
        sink,
        OutboxSettings().max_events,
        "dead_letter",
        10**12,
        Budget(10**12),
        spool,
        RetryPolicy(RetrySettings()),
        dead_letter,
        metrics,
    )
    worker.recover(spool.bits[sink.name], recovered.backlog[sink.name])
    loop = asyncio.get_running_loop()
    writer = asyncio.create_task(spool.run(TaskStatus(loop.create_future())))
    running = asyncio.create_task(worker.run(TaskStatus(loop.create_future())))
    try:
        yield worker
    finally:
        worker.outbox.close()
        await running
        writer.cancel()
        await asyncio.wait([writer])
        spool.commit_now()
        spool.close()
        dead_letter.close()


def feed(worker: SinkWorker, events: list[Event]) -> None:
    """What the pipeline does with each event routed to this sink."""
    for event in events:
        worker.spool.add(event, worker.bit)
        worker.put(event)


async def delivered(worker: SinkWorker, count: int) -> None:
    """Until `count` events reached the destination (acknowledged)."""
    done = asyncio.Event()
    counter = worker.metrics.events_delivered.labels(worker.name)
    acked = worker._acked

    def counting(events: list[Event]) -> None:
        acked(events)
        if counter._value.get() >= count:
            done.set()

    worker._acked = counting  # type: ignore[method-assign]
    if counter._value.get() < count:
        await done.wait()
