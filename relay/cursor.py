"""The cursor: where the relay is in the engine's stream. The spool writes it with every commit;
after a restart it is what `since` is made of.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


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

    def rewind(self, time_nano: int) -> None:
        """Move the position back (a cursor ahead of the engine's clock), keeping the ids."""
        self.time_nano = time_nano

    @property
    def last_id(self) -> str | None:
        return self._order[-1] if self._order else None

    def last_ids(self, count: int) -> list[str]:
        order = self._order
        skip = max(0, len(order) - count)
        return [order[i] for i in range(skip, len(order))]

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
