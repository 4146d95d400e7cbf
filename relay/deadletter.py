"""Dead-letter destination: a JSON-lines file, one record per undeliverable event, with the
error attached. Writing here counts as "handled" for the checkpoint: the event is kept on disk."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import IO, Literal

import msgspec

from relay.schema import Event

log = logging.getLogger("relay.deadletter")

SinkReason = Literal["permanent", "retries_exhausted", "overflow", "sink_stopped"]
Reason = SinkReason | Literal["malformed"]


class _Record(msgspec.Struct, omit_defaults=True):
    time: float
    reason: str
    error: str
    error_type: str
    sink: str | None = None
    event: msgspec.Raw | None = None
    raw: str | None = None


class DeadLetter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._encoder = msgspec.json.Encoder()
        self.count = 0

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Kept open for the process' life: one write and flush per dead letter.
            self._file = open(self.path, "ab")
        return self._file

    def write_event(
        self, event: Event, *, sink: str, reason: Reason, error: BaseException | str
    ) -> None:
        self._write(
            _Record(
                time=time.time(),
                sink=sink,
                reason=reason,
                error=str(error),
                error_type=type(error).__name__ if isinstance(error, BaseException) else "",
                event=msgspec.Raw(event.json()),
            )
        )

    def write_raw(self, raw: bytes, *, reason: Reason, error: BaseException | str) -> None:
        self._write(
            _Record(
                time=time.time(),
                reason=reason,
                error=str(error),
                error_type=type(error).__name__ if isinstance(error, BaseException) else "",
                raw=raw.decode("utf-8", "replace"),
            )
        )

    def _write(self, record: _Record) -> None:
        f = self._open()
        f.write(self._encoder.encode(record) + b"\n")
        f.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._file = None
