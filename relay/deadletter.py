"""Dead letters: events that cannot be delivered, one record each, with the error attached.

A record is kept in the spool (table `dead_letters`), committed in the same transaction that
tells the spool the sink is done with the event: a dead letter is as durable as the events
themselves, and never lost between the two. `docker-event-relay dead-letter list|replay|purge`
works on those records. Each is also appended, as one JSON line, to an export file
(`dead_letter_path`, default `STATE_DIR/dead-letter.jsonl`) for grep: every line is written
whole or not at all (a failed write is cut back), and lines that could not be written (a full
disk, a read-only path) are written later, in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from relay.metrics import Metrics
from relay.schema import Event
from relay.spool import private_dir

if TYPE_CHECKING:
    from relay.spool import Spool

log = logging.getLogger("relay.deadletter")

SinkReason = Literal["permanent", "retries_exhausted", "overflow", "sink_stopped"]
Reason = SinkReason | Literal["malformed"]


class Record(msgspec.Struct, omit_defaults=True):
    time: float
    reason: str
    error: str
    error_type: str
    sink: str | None = None
    event: msgspec.Raw | None = None
    raw: str | None = None


_encoder = msgspec.json.Encoder()


class DeadLetter:
    def __init__(self, path: Path, spool: Spool, metrics: Metrics) -> None:
        self.path = path
        self.spool = spool
        self.metrics = metrics
        self.count = 0
        self.disk_error: str | None = None
        self._fd: int | None = None
        self._unwritten: list[bytes] = []

    def write_event(
        self, event: Event, *, sink: str, reason: Reason, error: BaseException | str
    ) -> None:
        self._write(
            Record(
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
            Record(
                time=time.time(),
                reason=reason,
                error=str(error),
                error_type=type(error).__name__ if isinstance(error, BaseException) else "",
                raw=raw.decode("utf-8", "replace"),
            )
        )

    def _write(self, record: Record) -> None:
        line = _encoder.encode(record)
        self.spool.add_dead_letter(record.time, record.sink, record.reason, line)
        self.count += 1
        self._unwritten.append(line + b"\n")
        self.flush_export()

    def flush_export(self) -> None:
        """Append the lines not written yet, in order; on failure keep them for later."""
        while self._unwritten:
            try:
                self._append(self._unwritten[0])
            except OSError as exc:
                self._export_failed(exc)
                return
            self._unwritten.pop(0)
        if self.disk_error is not None:
            log.warning("dead-letter file %s: writing again", self.path)
            self.disk_error = None

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            private_dir(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                # The records hold whole events (labels, commands): private, also when the
                # file was made by someone else or under an older relay.
                os.fchmod(fd, 0o600)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        fd = self._fd
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            # Never a half line in the file: cut it back to where this line began.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise

    def _export_failed(self, exc: OSError) -> None:
        self.metrics.disk_errors.labels("dead_letter").inc()
        text = f"{type(exc).__name__}: {exc.strerror or exc}"
        if self.disk_error is None:
            log.error(
                "dead-letter file %s: cannot write (%s); the records are in the spool, and the "
                "lines are written when it works again",
                self.path,
                text,
            )
        self.disk_error = text

    def close(self) -> None:
        self.flush_export()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# -- `docker-event-relay dead-letter list|replay|purge`: the records in the spool ---------------


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; every given condition must hold."""

    sink: str | None = None
    reason: str | None = None
    since: float | None = None
    until: float | None = None
    replayed: bool = False
    """Include records already replayed (list and purge; replay never replays twice)."""

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        args: list[object] = []
        for column, value in (("sink", self.sink), ("reason", self.reason)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("time >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("time < ?")
            args.append(self.until)
        if not self.replayed:
            clauses.append("replayed IS NULL")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


@dataclass(frozen=True)
class Letter:
    id: int
    time: float
    sink: str | None
    reason: str
    replayed: float | None
    record: dict[str, Any]

    @property
    def event(self) -> dict[str, Any] | None:
        event = self.record.get("event")
        return event if isinstance(event, dict) else None


def _open(spool: Path) -> sqlite3.Connection:
    if not spool.exists():
        raise FileNotFoundError(f"no spool at {spool} (is state_dir right?)")
    # A running relay writes the same file: wait for its commit rather than fail.
    return sqlite3.connect(spool, timeout=30, isolation_level=None)


def select(spool: Path, selection: Selection) -> list[Letter]:
    where, args = selection.where()
    with contextlib.closing(_open(spool)) as db:
        rows = db.execute(
            f"SELECT id, time, sink, reason, replayed, record FROM dead_letters{where} ORDER BY id",
            args,
        ).fetchall()
    return [
        Letter(int(i), float(t), s, str(r), rp, msgspec.json.decode(rec))
        for i, t, s, r, rp, rec in rows
    ]


def replay(spool: Path, selection: Selection, *, dry_run: bool = False) -> list[Letter]:
    """Queue the selected dead letters of events (not malformed lines) for their sink again,
    once: each is marked replayed in the same transaction. A running relay picks them up
    within a second; a stopped one at its next start. Returns what was (or would be) queued."""
    chosen = [
        letter
        for letter in select(spool, replace(selection, replayed=False))
        if letter.sink is not None and letter.event is not None
    ]
    if dry_run or not chosen:
        return chosen
    now = time.time()
    with contextlib.closing(_open(spool)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            for letter in chosen:
                taken = db.execute(
                    "UPDATE dead_letters SET replayed = ? WHERE id = ? AND replayed IS NULL",
                    (now, letter.id),
                ).rowcount
                if taken:
                    db.execute(
                        "INSERT INTO requeue (dead_letter, sink, body) VALUES (?, ?, ?)",
                        (letter.id, letter.sink, msgspec.json.encode(letter.event)),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return chosen


def purge(spool: Path, selection: Selection, *, dry_run: bool = False) -> list[Letter]:
    """Delete the selected dead letters from the spool (the export file is left as it is)."""
    chosen = select(spool, selection)
    if dry_run or not chosen:
        return chosen
    with contextlib.closing(_open(spool)) as db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM dead_letters WHERE id = ?", [(c.id,) for c in chosen])
        db.execute("COMMIT")
    return chosen
