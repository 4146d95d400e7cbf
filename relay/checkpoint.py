"""The checkpoint: the engine position such that every event read before it has been handled
(delivered, or dead-lettered) by every sink that wanted it. After a restart it is `since`.

Events get a sequence number in engine order. The tracker keeps, per in-flight event, how many
sinks still owe an answer; the checkpoint advances over the contiguous finished prefix.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import msgspec

from relay.lifecycle import TaskStatus

log = logging.getLogger("relay.checkpoint")


class Position:
    """Where the relay is in the engine's stream: the newest `time_nano` handled, and the ids
    of the last `keep` events handled.

    The engine publishes each event to each subscriber from its own goroutine, so a stream is
    only roughly in `timeNano` order (inversions of a few ms under load, measured). Resuming
    therefore asks for `since = time_nano - margin` and drops replayed events by id, never
    by time: an id set covers out-of-order arrivals and events sharing one timeNano alike.
    `keep` only has to exceed the engine's replay ring (256 events).
    """

    __slots__ = ("_ids", "_order", "time_nano")

    def __init__(self, time_nano: int = 0, ids: Iterable[str] = (), keep: int = 1024) -> None:
        self.time_nano = time_nano
        self._order: deque[str] = deque(ids, maxlen=keep)
        self._ids = set(self._order)

    def seen(self, event_id: str) -> bool:
        return event_id in self._ids

    def advance(self, time_nano: int, event_id: str) -> None:
        order = self._order
        if len(order) == order.maxlen:
            self._ids.discard(order[0])
        order.append(event_id)
        self._ids.add(event_id)
        if time_nano > self.time_nano:
            self.time_nano = time_nano

    @property
    def ids(self) -> list[str]:
        return list(self._order)

    def copy(self) -> Position:
        return Position(self.time_nano, self._order, self._order.maxlen or 1024)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Position)
            and other.time_nano == self.time_nano
            and other.ids == self.ids
        )

    def __repr__(self) -> str:
        return f"Position(time_nano={self.time_nano}, ids={len(self._order)})"


class _Stored(msgspec.Struct):
    engine_id: str
    time_nano: int
    ids: list[str]
    version: int = 1


class CheckpointStore:
    """`STATE_DIR/checkpoint.json`, replaced atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "checkpoint.json"

    def load(self, engine_id: str) -> Position | None:
        try:
            stored = msgspec.json.decode(self.path.read_bytes(), type=_Stored)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if stored.engine_id != engine_id:
            log.warning(
                "checkpoint %s belongs to engine %s, not %s: starting from now",
                self.path,
                stored.engine_id,
                engine_id,
            )
            return None
        return Position(stored.time_nano, stored.ids)

    def save(self, engine_id: str, position: Position) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = msgspec.json.encode(
            _Stored(engine_id=engine_id, time_nano=position.time_nano, ids=position.ids)
        )
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class CheckpointTracker:
    """In-flight bookkeeping. Single-threaded (event loop); every call is O(1) amortized."""

    def __init__(self) -> None:
        self.position = Position()
        self.engine_id = ""
        self._pending: deque[list[object]] = deque()  # [seq, remaining, time_nano, id]
        self._by_seq: dict[int, list[object]] = {}
        self.dirty = False

    def reset(self, engine_id: str, position: Position | None) -> None:
        """A (re)connection to an engine: position as loaded from the store, if any."""
        if engine_id != self.engine_id:
            self.engine_id = engine_id
            self.position = position.copy() if position else Position()

    def track(self, seq: int, time_nano: int, event_id: str, fanout: int) -> None:
        entry: list[object] = [seq, fanout, time_nano, event_id]
        self._pending.append(entry)
        if fanout:
            self._by_seq[seq] = entry
        else:
            self._advance()

    def done(self, seq: int) -> None:
        entry = self._by_seq.get(seq)
        if entry is None:
            return
        remaining = entry[1] - 1  # type: ignore[operator]
        entry[1] = remaining
        if remaining <= 0:
            del self._by_seq[seq]
            if self._pending and self._pending[0] is entry:
                self._advance()

    def _advance(self) -> None:
        pending = self._pending
        while pending and pending[0][1] <= 0:  # type: ignore[operator]
            _, _, time_nano, event_id = pending.popleft()
            self.position.advance(time_nano, event_id)  # type: ignore[arg-type]
            self.dirty = True

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class CheckpointWriter:
    """The checkpoint component: writes the tracker's position whenever it moved, at most every
    `interval` seconds (a timer, so a busy relay writes a few times a second, not once per
    event). The final write, at shutdown or after a crash, is `flush()`."""

    def __init__(self, tracker: CheckpointTracker, store: CheckpointStore, interval: float):
        self.tracker = tracker
        self.store = store
        self.interval = interval

    async def run(self, task_status: TaskStatus) -> None:
        task_status.started()
        tracker = self.tracker
        while True:
            await asyncio.sleep(self.interval)
            if tracker.dirty and tracker.engine_id:
                tracker.dirty = False
                position = tracker.position.copy()
                try:
                    await asyncio.to_thread(self.store.save, tracker.engine_id, position)
                except OSError as exc:
                    tracker.dirty = True
                    log.error("cannot write checkpoint %s: %s", self.store.path, exc)

    def flush(self) -> None:
        """Synchronous final write."""
        tracker = self.tracker
        if tracker.dirty and tracker.engine_id:
            self.store.save(tracker.engine_id, tracker.position)
            tracker.dirty = False
