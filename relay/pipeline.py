"""The pipeline: lines from the reader's queue -> events in the sinks' outboxes, in engine order.

It owns the state between reading and delivering: the normalizer of the current engine, the
cursor (where the relay is in the engine's stream, with the ids of the last events, to drop
what the engine replays twice), the routing table, and the checkpoint tracker (which events
every sink has finished with). The reader only asks it where to resume (`resume_point`), which
changes nothing; a new engine's state is taken up when its `Connected` marker comes through
the queue, in order with the lines.
"""

from __future__ import annotations

import asyncio
import logging

from relay.checkpoint import CheckpointStore, CheckpointTracker, Position
from relay.deadletter import DeadLetter
from relay.engine import Connected, QueueItem
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.normalize import MalformedEventError, Normalizer, since_param
from relay.router import RouteTable
from relay.schema import Engine, Event
from relay.settings import SchemaSettings

log = logging.getLogger("relay.pipeline")

_RECORD_SEPARATOR = b"\x1e"  # application/json-seq framing (API >= 1.52), stripped if present


class Pipeline:
    def __init__(
        self,
        queue: asyncio.Queue[QueueItem],
        routes: RouteTable,
        store: CheckpointStore,
        dead_letter: DeadLetter,
        metrics: Metrics,
        schema: SchemaSettings,
    ) -> None:
        self.queue = queue
        self.routes = routes
        self.store = store
        self.dead_letter = dead_letter
        self.metrics = metrics
        self.schema = schema
        self.tracker = CheckpointTracker()
        self.cursor = Position()
        self.normalizer: Normalizer | None = None
        self.seq = 0
        self._check_gap_since: int | None = None
        # The stored position of the engine last asked about, read once per engine.
        self._loaded: tuple[str, Position | None] | None = None

    # -- what the reader may ask -------------------------------------------------------------

    def resume_point(self, engine_id: str) -> int | None:
        """The newest timeNano handled on engine `engine_id`, None when there is none."""
        if self.normalizer is not None and self.normalizer.engine.id == engine_id:
            return self.cursor.time_nano or None
        stored = self._stored(engine_id)
        return stored.time_nano if stored is not None and stored.time_nano else None

    def _stored(self, engine_id: str) -> Position | None:
        if self._loaded is None or self._loaded[0] != engine_id:
            self._loaded = (engine_id, self.store.load(engine_id))
        return self._loaded[1]

    # -- the component -------------------------------------------------------------------------

    async def run(self, task_status: TaskStatus) -> None:
        task_status.started()
        while True:
            self._handle(await self.queue.get())

    def drain_nowait(self) -> None:
        """Dispatch whatever the reader already queued (shutdown)."""
        while not self.queue.empty():
            self._handle(self.queue.get_nowait())

    def _handle(self, item: QueueItem) -> None:
        if isinstance(item, Connected):
            self._connected(item.engine)
        else:
            self.dispatch(item)

    def _connected(self, engine: Engine) -> None:
        if self.normalizer is None or self.normalizer.engine.id != engine.id:
            stored = self._stored(engine.id)
            self.tracker.reset(engine.id, stored)
            self.cursor = stored.copy() if stored is not None else Position()
        self.normalizer = Normalizer(
            engine, type_prefix=self.schema.type_prefix, exec_command=self.schema.exec_command
        )
        # A replay that does not reach back to the newest event handled may have a gap.
        self._check_gap_since = self.cursor.time_nano or None

    def dispatch(self, lines: list[bytes]) -> None:
        normalizer = self.normalizer
        assert normalizer is not None, "lines before a Connected marker"
        cursor = self.cursor
        for line in lines:
            if line.startswith(_RECORD_SEPARATOR):
                line = line[1:]
            if not line.strip():
                continue
            try:
                ce = normalizer.normalize(line)
            except MalformedEventError as exc:
                self.metrics.events_malformed.inc()
                log.warning("malformed line from the engine, dead-lettered: %s", exc)
                self.dead_letter.write_raw(exc.raw, reason="malformed", error=exc)
                continue
            data = ce.data
            if self._check_gap_since is not None:
                since, self._check_gap_since = self._check_gap_since, None
                if data.time_nano > since:
                    self._gap(normalizer, since, data.time_nano)
            if cursor.seen(ce.id):
                self.metrics.events_duplicate.inc()
                continue
            cursor.advance(data.time_nano, ce.id)
            self.metrics.read(data.type, data.action, data.reclaimed_bytes)
            self._emit(Event(ce))

    def _emit(self, event: Event) -> None:
        self.seq += 1
        event.seq = self.seq
        targets = self.routes.targets(event)
        # Tracked before it is handed on: a target may finish with it at once (dead-letter).
        self.tracker.track(event.seq, event.time_nano, event.id, len(targets))
        for target in targets:
            target.put(event)

    def _gap(self, normalizer: Normalizer, since: int, first: int) -> None:
        self.metrics.replay_gaps.inc()
        log.warning(
            "the engine's replay starts after the last event handled (since=%s, first=%s): "
            "events in between may be lost (engine restarted, or more than 256 events since)",
            since_param(since),
            since_param(first),
        )
        ce = normalizer.gap(since, first, "replay did not reach back to the last handled event")
        self.cursor.advance(first, ce.id)
        self._emit(Event(ce))
