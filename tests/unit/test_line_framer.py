"""The reader's framing (lines whatever the reads, a bound on a line, linear work and bounded
memory) and its queue's bound, counted in lines."""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc

import pytest

from relay.engine import (
    DEFAULT_MAX_LINE_BYTES,
    OVERSIZED_HEAD_BYTES,
    Connected,
    EngineReader,
    LineFramer,
    OversizedLine,
    QueueItem,
)
from relay.metrics import Metrics
from relay.retry import RetryPolicy
from relay.schema import Engine
from relay.settings import EngineSettings, RetrySettings
from tests.contract import fixture_lines

LIMIT = 4096

Item = list[bytes] | OversizedLine


def frame(reads: list[bytes], limit: int = LIMIT) -> list[Item]:
    """Queue items as the reader puts them, merged: consecutive lines in one list."""
    framer = LineFramer(limit)
    out: list[Item] = []
    for chunk in reads:
        lines = framer.feed(chunk)
        assert framer.retained <= limit, "more than the limit held between reads"
        items = framer.items(lines) if framer.oversized else ([lines] if lines else [])
        for item in items:
            if isinstance(item, list) and out and isinstance(out[-1], list):
                out[-1] = out[-1] + item
            else:
                out.append(item)
    return out


def cut(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def test_default_limit_is_the_setting() -> None:
    assert DEFAULT_MAX_LINE_BYTES == EngineSettings().max_line_bytes == 1024 * 1024
    assert LineFramer().limit == DEFAULT_MAX_LINE_BYTES


def test_every_split_point_of_every_line_of_the_recorded_stream() -> None:
    lines = fixture_lines("engine-28.5.2-events.jsonl")[:6]
    stream = b"".join(line + b"\n" for line in lines)
    for at in range(len(stream) + 1):
        assert frame([stream[:at], stream[at:]]) == [lines], f"split at {at}"


def test_every_pair_of_split_points_around_a_line_of_exactly_the_limit() -> None:
    # Reads that cut the line at any two places, one read of nothing but a newline included.
    lines = [b"a", b"b" * 40, b"c" * 7, b""]
    limit = 40
    stream = b"".join(line + b"\n" for line in lines)
    for i, j in itertools.combinations(range(len(stream) + 1), 2):
        reads = [stream[:i], stream[i:j], stream[j:]]
        assert frame(reads, limit) == [lines], f"splits at {i}, {j}"


@pytest.mark.parametrize("read_size", [1, 7, 100, LIMIT - 1, LIMIT, LIMIT + 1, 3 * LIMIT])
def test_a_line_of_exactly_the_limit_passes_and_one_byte_more_does_not(read_size: int) -> None:
    exact = b"{" + b"x" * (LIMIT - 2) + b"}"
    over = b"[" + b"y" * (LIMIT - 1) + b"]"
    assert len(exact) == LIMIT and len(over) == LIMIT + 1
    stream = b"before\n" + exact + b"\n" + over + b"\nafter\n"
    assert frame(cut(stream, read_size)) == [
        [b"before", exact],
        OversizedLine(over[:OVERSIZED_HEAD_BYTES], LIMIT + 1, LIMIT),
        [b"after"],
    ]


def test_oversized_lines_in_one_read_stay_in_place_among_good_lines() -> None:
    big = b"z" * (LIMIT * 3)
    chunk = b"one\n" + big + b"\ntwo\nthree\n" + big + b"\n" + big + b"\nfour\nfive"
    framer = LineFramer(LIMIT)
    lines = framer.feed(chunk)
    record = OversizedLine(big[:OVERSIZED_HEAD_BYTES], len(big), LIMIT)
    assert lines == [b"one", b"two", b"three", b"four"]
    assert framer.items(lines) == [
        [b"one"],
        record,
        [b"two", b"three"],
        record,
        record,
        [b"four"],
    ]
    # The next read finishes the line begun, and knows nothing of the records before.
    assert framer.feed(b"!\n") == [b"five!"]
    assert framer.oversized == []


def test_an_oversized_line_at_the_start_of_a_read_after_one_begun() -> None:
    framer = LineFramer(LIMIT)
    assert framer.feed(b"a" * 100) == []
    lines = framer.feed(b"b" * LIMIT + b"\nok\n")
    assert lines == [b"ok"]
    assert framer.items(lines) == [
        OversizedLine(b"a" * 100 + b"b" * (OVERSIZED_HEAD_BYTES - 100), LIMIT + 100, LIMIT),
        [b"ok"],
    ]


@pytest.mark.parametrize("read_size", [1, 13, 1000, LIMIT, 10 * LIMIT])
def test_an_oversized_line_spread_over_reads_among_the_recorded_stream(read_size: int) -> None:
    lines = fixture_lines("engine-20.10.24-events.jsonl")
    big = b'{"Type":"network","Actor":{"Attributes":{"name":"' + b"n" * (5 * LIMIT) + b'"}}}'
    stream = b"".join(line + b"\n" for line in lines[:30])
    stream += big + b"\n"
    stream += b"".join(line + b"\n" for line in lines[30:])
    assert frame(cut(stream, read_size)) == [
        lines[:30],
        OversizedLine(big[:OVERSIZED_HEAD_BYTES], len(big), LIMIT),
        lines[30:],
    ]


def test_a_line_cut_by_the_end_of_the_stream_is_not_a_line() -> None:
    # The engine replays what it was sending when the stream broke; a new stream frames anew.
    framer = LineFramer(LIMIT)
    assert framer.feed(b'{"Type":"vol') == []
    assert framer.retained == len(b'{"Type":"vol')


def test_no_newline_for_100_mb_holds_at_most_the_limit() -> None:
    """Linear: each read is scanned once and copied at most once while it fits the limit;
    beyond the limit it is only counted. Memory: the limit, not the line."""
    chunk = b"x" * 65536
    framer = LineFramer()
    limit = framer.limit
    tracemalloc.start()
    try:
        for _ in range(100 * 1024 * 1024 // len(chunk)):
            assert framer.feed(chunk) == []
            assert framer.retained <= limit
        _, peak = tracemalloc.get_traced_memory()
        lines = framer.feed(b"y\nnext\n")
    finally:
        tracemalloc.stop()
    # The line begun grows to the limit (a bytearray over-allocates by an eighth) before it
    # is dropped; a read or two in flight beside it.
    assert peak < limit * 1.25 + 4 * len(chunk), peak
    assert lines == [b"next"]
    assert framer.items(lines) == [
        OversizedLine(b"x" * OVERSIZED_HEAD_BYTES, 100 * 1024 * 1024 + 1, limit),
        [b"next"],
    ]
    assert framer.retained == 0


def test_a_trickle_of_one_byte_reads_holds_bytes_not_objects() -> None:
    limit = 64 * 1024
    framer = LineFramer(limit)
    byte = b"x"
    tracemalloc.start()
    try:
        for _ in range(limit - 1):
            framer.feed(byte)
        # One piece held, not one object per read (an object per read would be ~2 MiB here).
        held, _ = tracemalloc.get_traced_memory()
        for _ in range(limit):
            framer.feed(byte)
            assert framer.retained <= limit
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < limit * 1.25, held
    assert peak < limit * 1.25, peak
    lines = framer.feed(b"\n")
    assert framer.items(lines) == [OversizedLine(b"x" * OVERSIZED_HEAD_BYTES, 2 * limit - 1, limit)]


# -- the reader's queue: engine.queue_max bounds lines -----------------------------------------


def reader(queue: asyncio.Queue[QueueItem], metrics: Metrics) -> EngineReader:
    return EngineReader(
        EngineSettings(queue_max=1000),
        queue,
        lambda engine_id: None,
        RetryPolicy(RetrySettings()),
        metrics,
    )


def test_queue_max_counts_lines_not_reads() -> None:
    queue: asyncio.Queue[QueueItem] = asyncio.Queue()
    metrics = Metrics()
    r = reader(queue, metrics)
    marker = Connected(Engine(id="E", name="e", version="1", api_version="1.41"))
    r._put(marker)
    batches = [[f"{n}-{i}".encode() for i in range(300)] for n in range(4)]
    for batch in batches:
        r._put(batch)
    dropped = metrics.registry.get_sample_value("relay_reader_lines_dropped_total")
    # 1000 lines queued: three reads whole, the fourth up to the bound, its 200 newest dropped.
    assert dropped == 200
    assert [queue.get_nowait() for _ in range(queue.qsize())] == [
        marker,
        *batches[:3],
        batches[3][:100],
    ]
    # Taken by the pipeline: room again. A marker always goes in; an oversized line is a line.
    record = OversizedLine(b"{", 2 * 1024 * 1024, 1024 * 1024)
    r._put([b"y"] * 999)
    r._put(marker)
    r._put(record)
    r._put(record)
    r._put([b"late"])
    assert metrics.registry.get_sample_value("relay_reader_lines_dropped_total") == 202
    assert queue.get_nowait() == [b"y"] * 999
    assert queue.get_nowait() == marker
    assert queue.get_nowait() == record
    assert queue.empty()
    r._put([b"x"] * 1000)
    assert queue.get_nowait() == [b"x"] * 1000
