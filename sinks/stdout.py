"""`type: stdout`: one structured CloudEvents JSON object per line on standard output."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import stat
import sys
from collections.abc import Sequence
from typing import BinaryIO, Literal

from pydantic import Field

from relay.sink import (
    Event,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkConfigBase,
    SinkContext,
)


class StdoutSinkConfig(SinkConfigBase):
    type: Literal["stdout"] = "stdout"
    max_batch: int = Field(default=500, ge=1, description="Events written per write call.")

    def build(self, context: SinkContext) -> Sink:
        return StdoutSink(self.sink_name, self.max_batch)


class StdoutSink(Sink):
    def __init__(self, name: str, max_batch: int, stream: BinaryIO | None = None) -> None:
        super().__init__(name, max_batch)
        self._stream = stream or sys.stdout.buffer
        self._regular_file = False

    async def start(self) -> None:
        try:
            self._regular_file = stat.S_ISREG(os.fstat(self._stream.fileno()).st_mode)
        except (OSError, ValueError, io.UnsupportedOperation):
            self._regular_file = False

    async def send(self, batch: Sequence[Event]) -> None:
        stream = self._stream
        payload = b"".join([event.json() + b"\n" for event in batch])
        try:
            if self._regular_file:
                _write(stream, payload)
            else:
                # A pipe whose reader is slow must not stall the event loop (and with it the
                # engine reader); a regular file does not block for long, and a thread hop per
                # batch would cost more than the write.
                await asyncio.to_thread(_write, stream, payload)
        except BrokenPipeError as exc:
            raise PermanentSinkError(f"stdout closed: {exc}", sink=self.name) from exc
        except OSError as exc:
            raise RetryableSinkError(f"stdout write failed: {exc}", sink=self.name) from exc

    async def aclose(self) -> None:
        # The stream is the process's stdout (or the caller's): flushed, never closed here.
        with contextlib.suppress(OSError, ValueError):
            await asyncio.to_thread(self._stream.flush)


def _write(stream: BinaryIO, payload: bytes) -> None:
    stream.write(payload)
    stream.flush()
