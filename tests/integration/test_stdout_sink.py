"""The stdout sink against a real pipe, through the shared contract suite."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, ClassVar, cast

import msgspec
import pytest
from cloudevents.http import CloudEvent, from_json

from relay.errors import PermanentSinkError
from relay.sink import Sink
from sinks.stdout import StdoutSink
from tests.contract import SinkContract, sample_events
from tests.harness import async_wait_for

# The smallest pipe buffer Linux allows: a slow reader then holds the writer back within a few
# events, as a slow log collector holds back a container's stdout.
_SMALL_PIPE = 4096


class PipeReader:
    """The reading end of a real OS pipe, drained by a thread (as a log collector would).

    With `delay`, the reader takes at most `chunk` bytes at a time and pauses that long before
    each read, in a pipe with the smallest buffer: a slow consumer the writer must wait for."""

    def __init__(self, delay: float = 0.0, chunk: int = 65536) -> None:
        read_fd, write_fd = os.pipe()
        if delay:
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _SMALL_PIPE)
        self.writer = cast(BinaryIO, os.fdopen(write_fd, "wb"))
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self.delay = delay
        self.chunk = chunk
        self.lines: list[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        pending = b""
        while True:
            if self.delay:
                time.sleep(self.delay)  # the slowness under test, not a synchronisation
            data = self._reader.read(self.chunk)
            if not data:
                return
            *complete, pending = (pending + data).split(b"\n")
            self.lines.extend(line + b"\n" for line in complete)

    def close(self) -> None:
        self.writer.close()
        self._thread.join(10)
        self._reader.close()


class TestStdoutSinkContract(SinkContract):
    cannot: ClassVar[Mapping[str, str]] = {
        "refuse_one_event": "a pipe takes a write whole or fails it whole; no reader refuses "
        "one line of it",
        "dead_letter_one_event": "as refuse_one_event",
        "restart": "a pipe has no server to restart: a new reader is a new pipe, and the sink "
        "never reopens the stream it was given",
        "secrets": "the stdout sink has no credentials",
    }

    @pytest.fixture(autouse=True)
    def _pipe(self) -> Iterator[None]:
        self.pipe = PipeReader()
        self.pipes = [self.pipe]
        yield
        for pipe in self.pipes:
            pipe.close()

    def make_sink(self) -> Sink:
        return StdoutSink("stdout", 500, stream=self.pipe.writer)

    async def _lines(self, ids: list[str], timeout: float) -> list[bytes]:  # noqa: ASYNC109
        wanted = set(ids)

        def arrived() -> list[bytes] | None:
            lines = list(self.pipe.lines)
            seen = {msgspec.json.decode(line)["id"] for line in lines}
            return lines if wanted <= seen else None

        result = await async_wait_for(arrived, timeout, message=f"{len(wanted)} lines")
        assert result is not None
        return result

    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - a deadline for polling, not a cancellation scope
    ) -> list[dict[str, Any]]:
        return [msgspec.json.decode(line) for line in await self._lines(ids, timeout)]

    async def read_back_sdk(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's
    ) -> list[CloudEvent]:
        return [from_json(line) for line in await self._lines(ids, timeout)]

    def make_unreachable_sink(self) -> Sink:
        raise NotImplementedError("stdout is always there; see the override below")

    async def make_slow_sink(self, delay: float) -> Sink:
        # 1 KiB every `delay` seconds: 30 events take seconds to drain, so the sink's write
        # waits on the reader most of that time.
        self.pipe = PipeReader(delay=delay, chunk=1024)
        self.pipes.append(self.pipe)
        return self.make_sink()

    async def test_unreachable_destination_is_retryable(self) -> None:
        # stdout has no address; its failure is the reader going away, which is final: the
        # outbox dead-letters instead of retrying into a pipe that nobody reads.
        r, w = os.pipe()
        os.close(r)
        sink = StdoutSink("stdout", 10, stream=os.fdopen(w, "wb"))
        await sink.start()
        with pytest.raises(PermanentSinkError, match="stdout closed"):
            await sink.send(sample_events(3))
