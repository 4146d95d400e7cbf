"""The stdout sink against a real pipe, through the shared contract suite."""

from __future__ import annotations

import os
import threading
from typing import IO, Any

import msgspec
import pytest

from relay.errors import PermanentSinkError
from sinks.base import Sink
from sinks.stdout import StdoutSink
from tests.contract import SinkContract, sample_events
from tests.harness import wait_for


class PipeReader:
    """The reading end of a real OS pipe, drained by a thread (as a log collector would)."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.writer: IO[bytes] = os.fdopen(write_fd, "wb")
        self._reader = os.fdopen(read_fd, "rb")
        self.lines: list[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for line in self._reader:
            self.lines.append(line)

    def close_reader(self) -> None:
        self._reader.close()


class TestStdoutSinkContract(SinkContract):
    @pytest.fixture(autouse=True)
    def _pipe(self) -> None:
        self.pipe = PipeReader()

    def make_sink(self) -> Sink:
        return StdoutSink("stdout", 500, stream=self.pipe.writer)

    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - a deadline for polling, not a cancellation scope
    ) -> list[dict[str, Any]]:
        wanted = set(ids)

        def got() -> list[dict[str, Any]] | None:
            docs = [msgspec.json.decode(line) for line in list(self.pipe.lines)]
            docs = [d for d in docs if d["id"] in wanted]
            return docs if len(docs) >= len(wanted) else None

        result: list[dict[str, Any]] = wait_for(got, timeout=timeout, message="lines on the pipe")
        return result

    def make_unreachable_sink(self) -> Sink:
        raise NotImplementedError("stdout is always there; see the override below")

    async def test_unreachable_destination_is_retryable(self) -> None:
        # stdout has no address; its failure is the reader going away, which is final: the
        # outbox dead-letters instead of retrying into a pipe that nobody reads.
        r, w = os.pipe()
        os.close(r)
        sink = StdoutSink("stdout", 10, stream=os.fdopen(w, "wb"))
        await sink.start()
        with pytest.raises(PermanentSinkError, match="stdout closed"):
            await sink.send(sample_events(3))
