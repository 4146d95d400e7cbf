"""`type: jsonl-file`: each event appended to a file as one structured CloudEvents JSON line.
A worked example of a third-party sink (registered in pyproject.toml); it imports `relay.sink`.

A batch goes in with one write; a write or fsync that fails cuts the file back to where the
batch began, so no half line is left and the retried batch is not there twice. Every OS error
is retryable: a full disk, an I/O error, a read-only remount, a missing directory or a wrong
permission can be fixed by an operator, and the relay holds the events meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field
from relay.sink import (
    Event,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkConfigBase,
    SinkContext,
)

__all__ = ["JsonLinesFileSink", "JsonLinesFileSinkConfig"]


class JsonLinesFileSinkConfig(SinkConfigBase):
    type: Literal["jsonl-file"] = "jsonl-file"
    path: Path = Field(
        description="File the events are appended to, one JSON object per line. Its directory "
        "must exist; the file is created with mode 0600."
    )
    fsync: bool = Field(
        default=True,
        description="fsync after each batch, so a delivered batch survives a power loss. Off: "
        "faster, but a host crash can lose the last batches the relay counted as delivered.",
    )

    def build(self, context: SinkContext) -> Sink:
        return JsonLinesFileSink(
            self.sink_name, self.path, fsync=self.fsync, max_batch=self.max_batch
        )


class JsonLinesFileSink(Sink):
    def __init__(self, name: str, path: Path, *, fsync: bool = True, max_batch: int = 100) -> None:
        super().__init__(name, max_batch)
        self.path = path
        self.fsync = fsync
        self._fd: int | None = None
        # Where the file ended before a batch whose failed write could not be cut off at once.
        self._torn_at: int | None = None
        # Held by the thread that writes or closes: cancelling a send (at shutdown) does not
        # stop its thread, and the close must not pull the file from under it.
        self._lock = threading.Lock()

    async def start(self) -> None:
        # No await in here: the open cannot interleave with a close.
        if not self.path.parent.is_dir():
            raise RetryableSinkError(
                f"cannot open {self.path}: directory {self.path.parent} does not exist",
                sink=self.name,
            )
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise RetryableSinkError(
                f"cannot open {self.path}: {exc.strerror}", sink=self.name
            ) from exc

    async def send(self, batch: Sequence[Event]) -> None:
        payload = b"".join([event.json() + b"\n" for event in batch])
        try:
            # A disk (or a network file system) can stall; the event loop must not stall with it.
            await asyncio.to_thread(self._append, payload)
        except OSError as exc:
            raise RetryableSinkError(
                f"cannot append to {self.path}: {exc.strerror or exc}", sink=self.name
            ) from exc

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)

    def _append(self, payload: bytes) -> None:
        with self._lock:
            fd = self._fd
            if fd is None:
                # Closed while this send waited for its thread.
                raise PermanentSinkError(f"{self.path}: the sink is closed", sink=self.name)
            self._cut_torn_batch(fd)
            size = os.fstat(fd).st_size
            try:
                # os.write, not a buffered file: after a failed write a buffered file keeps the
                # unwritten rest and writes it later, after the cut below.
                view = memoryview(payload)
                while view:
                    # Short only on a full disk (then the next call raises) or a signal.
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                self._torn_at = size
                # If the cut fails too (EIO, EROFS), the next send makes it before writing.
                with contextlib.suppress(OSError):
                    self._cut_torn_batch(fd)
                raise

    def _cut_torn_batch(self, fd: int) -> None:
        if self._torn_at is not None:
            os.ftruncate(fd, self._torn_at)
            self._torn_at = None

    def _close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            with contextlib.suppress(OSError):
                self._cut_torn_batch(fd)
            os.close(fd)
