"""The pipeline: lines from the reader's queue -> events in the spool and the sinks' outboxes,
in engine order.

It owns the state between reading and delivering: the normalizer of the current engine, the
cursor (where the relay is in the engine's stream, with the ids of the last events, to drop
what the engine replays twice; the spool writes it with each commit), the routing table and the
sequence numbers. The reader only asks it where to resume (`resume_point`), which changes
nothing; a new engine's state is taken up when its `Connected` marker comes through the queue,
in order with the lines.

Gaps are said, never hidden: a replay that does not reach back to the cursor, a spool that was
corrupt (moved aside, and the engine's whole replay asked for), a cursor ahead of the engine's
clock (clamped to it): each is a `relay.gap` event, a metric and a log line.
"""

from __future__ import annotations

import asyncio
import logging

from relay.cursor import Position
from relay.deadletter import DeadLetter
from relay.engine import Connected, QueueItem
from relay.flap import Suppressor
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.normalize import Flavour, MalformedEventError, Normalizer, since_param
from relay.reconcile import Reconciler
from relay.router import RouteTable, Target
from relay.schema import Engine, Event
from relay.settings import SchemaSettings
from relay.spool import Recovered, Spool

log = logging.getLogger("relay.pipeline")

# Seconds without a line from the engine after which a replay is taken to be through (a snapshot
# owed after a gap waits for it, or for a live event).
REPLAY_QUIET = 0.5

# A flood of bad lines is one log line per burst, with the count (relay.logs.BurstFilter).
_BURST = {"burst": True}
_RECORD_SEPARATOR = b"\x1e"  # application/json-seq framing (API >= 1.52), stripped if present


class Pipeline:
    def __init__(
        self,
        queue: asyncio.Queue[QueueItem],
        routes: RouteTable,
        spool: Spool,
        dead_letter: DeadLetter,
        metrics: Metrics,
        schema: SchemaSettings,
    ) -> None:
        self.queue = queue
        self.routes = routes
        self.spool = spool
        self.dead_letter = dead_letter
        self.metrics = metrics
        self.schema = schema
        self.cursor = Position()
        self.normalizer: Normalizer | None = None
        self.seq = 0
        self._check_gap_since: int | None = None
        # A gap to report at the first event of the next stream, and why.
        self._pending_gap: str | None = None
        self._recovered = Recovered()
        # The engine's clock when the current stream began: events up to it are its replay.
        self._stream_now = 0
        # Set by the app when a sink asks for snapshots (relay.reconcile); None costs nothing.
        self.reconciler: Reconciler | None = None
        # Flap suppression (relay.flap), when some sink has `flap:`; None costs nothing.
        self.flap: Suppressor | None = None
        spool.follow(self._cursor)

    def recover(self, recovered: Recovered) -> None:
        """What the spool held: the cursor, the next sequence number, a corrupt spool."""
        self._recovered = recovered
        self.seq = recovered.next_seq - 1
        if recovered.corrupt is not None:
            self.metrics.replay_gaps.inc()
            self._pending_gap = f"the spool was unusable ({recovered.corrupt})"

    def _cursor(self) -> tuple[str, Position] | None:
        if self.normalizer is None:
            return None
        return self.normalizer.engine.id, self.cursor

    # -- what the reader may ask -------------------------------------------------------------

    def resume_point(self, engine_id: str) -> int | None:
        """The newest timeNano read from engine `engine_id`; None for "from now"; 1 for all the
        engine can replay (after the spool was lost)."""
        if self.normalizer is not None and self.normalizer.engine.id == engine_id:
            return self.cursor.time_nano or None
        if self._pending_gap is not None and self.normalizer is None:
            return 1
        stored = self._stored(engine_id)
        return stored.time_nano if stored is not None and stored.time_nano else None

    def _stored(self, engine_id: str) -> Position | None:
        recovered = self._recovered
        if recovered.position is None or recovered.engine_id != engine_id:
            return None
        return recovered.position

    # -- the component -------------------------------------------------------------------------

    async def run(self, task_status: TaskStatus) -> None:
        task_status.started()
        if self.flap is not None:
            # Windows a killed run left open: summarised before anything new is read.
            await self.flap.recover(self.spool.load)
        reconciler = self.reconciler
        while True:
            if reconciler is not None and reconciler.due and self.queue.empty():
                # A snapshot waits for the end of the replay: taken before it, the replay's
                # older events would follow a snapshot that is newer than they are. The engine
                # sends its replay at once, so a quiet queue means it is through.
                try:
                    async with asyncio.timeout(REPLAY_QUIET):
                        item = await self.queue.get()
                except TimeoutError:
                    await self._reconcile(reconciler)
                    continue
            else:
                item = await self.queue.get()
            self._handle(item)
            if reconciler is not None and reconciler.due and self._replay_through():
                await self._reconcile(reconciler)

    def _replay_through(self) -> bool:
        # An event newer than the engine's clock at the connection is live: the replay is over.
        return self.cursor.time_nano > self._stream_now

    def drain_nowait(self) -> None:
        """Dispatch whatever the reader already queued (shutdown)."""
        while not self.queue.empty():
            self._handle(self.queue.get_nowait())

    def _handle(self, item: QueueItem) -> None:
        if isinstance(item, list):
            self.dispatch(item)
        elif isinstance(item, Connected):
            self._connected(item.engine, item.clamped_from, item.engine_now, item.flavour)
        else:
            # Dropped by the reader as it arrived; the pipeline owns dead letters.
            error = MalformedEventError(
                f"line of {item.size} bytes exceeds engine.max_line_bytes ({item.limit}); "
                f"its first {len(item.head)} bytes kept",
                item.head,
            )
            self.metrics.events_malformed.inc()
            self.metrics.engine_lines_oversized.inc()
            log.warning("oversized line from the engine, dead-lettered: %s", error, extra=_BURST)
            self.dead_letter.write_raw(item.head, reason="malformed", error=error)

    def _connected(
        self, engine: Engine, clamped_from: int | None, now: int, flavour: Flavour = "docker"
    ) -> None:
        # An engine read for the first time (no position for it): a snapshot with on_start.
        first = False
        if self.normalizer is None or self.normalizer.engine.id != engine.id:
            stored = self._stored(engine.id)
            first = self._pending_gap is None and stored is None
            if stored is None and self._recovered.engine_id not in (None, engine.id):
                log.warning(
                    "the spool's position belongs to engine %s, not %s: reading from now",
                    self._recovered.engine_id,
                    engine.id,
                )
            self.cursor = stored.copy() if stored is not None else Position()
        self._stream_now = now
        self.normalizer = Normalizer(
            engine,
            type_prefix=self.schema.type_prefix,
            exec_command=self.schema.exec_command,
            flavour=flavour,
        )
        if clamped_from is not None:
            self.metrics.replay_gaps.inc()
            self.cursor.rewind(now)
            self._pending_gap = (
                f"the position ({since_param(clamped_from)}) was ahead of the engine's clock "
                f"({since_param(now)}): read from the engine's now"
            )
        # A replay that does not reach back to the newest event handled may have a gap.
        self._check_gap_since = self.cursor.time_nano or None
        if self.reconciler is not None:
            self.reconciler.connected(engine.id, first, now)

    def dispatch(self, lines: list[bytes]) -> None:
        # The cursor moves with every line read, routed or not: the spool writes it.
        self.spool.changed()
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
            except Exception as exc:
                # The normalizer raises only MalformedEventError; should anything else escape
                # it, that is still one bad line: a crash would loop on the engine's replay.
                malformed = (
                    exc
                    if isinstance(exc, MalformedEventError)
                    else MalformedEventError(
                        f"the normalizer failed: {type(exc).__name__}: {exc}", line
                    )
                )
                self.metrics.events_malformed.inc()
                log.warning(
                    "malformed line from the engine, dead-lettered: %s", malformed, extra=_BURST
                )
                self.dead_letter.write_raw(malformed.raw, reason="malformed", error=malformed)
                continue
            data = ce.data
            if self._pending_gap is not None:
                why, self._pending_gap = self._pending_gap, None
                self._check_gap_since = None
                self._report_gap(normalizer, self.cursor.time_nano, data.time_nano, why)
            if self._check_gap_since is not None:
                since, self._check_gap_since = self._check_gap_since, None
                if data.time_nano > since:
                    self._gap(normalizer, since, data.time_nano)
            if cursor.seen(ce.id):
                self.metrics.events_duplicate.inc()
                continue
            cursor.advance(data.time_nano, ce.id)
            self.metrics.read(data.type, data.action, data.reclaimed_bytes, data.context)
            self._emit(Event(ce))

    def deliver_to(self, target: Target, event: Event) -> None:
        """An event for one target alone (a replayed dead letter), behind what it has."""
        self.seq += 1
        event.seq = self.seq
        self._hand_on(event, [target])

    def _emit(self, event: Event) -> None:
        flap = self.flap
        if flap is not None:
            # Summaries of the windows due go ahead of this event, in sequence order.
            flap.tick()
        self.seq += 1
        event.seq = self.seq
        targets = self.routes.targets(event)
        if not targets:
            return
        owed = 0
        if flap is not None:
            # Held: owed under the sink's held bit, not handed to the sink (relay.flap).
            targets, owed = flap.split(event, targets)
        self._hand_on(event, targets, owed)

    def _hand_on(self, event: Event, targets: list[Target], owed: int = 0) -> None:
        """A numbered event to `targets`, owed in the spool by them (and by the bits `owed`)."""
        for target in targets:
            owed |= target.bit
        # In the spool before it is handed on: a target may finish with it at once.
        self.spool.add(event, owed)
        for target in targets:
            target.put(event)

    def _gap(self, normalizer: Normalizer, since: int, first: int) -> None:
        self.metrics.replay_gaps.inc()
        log.warning(
            "the engine's replay starts after the last event read (since=%s, first=%s): "
            "events in between may be lost (engine restarted, or more than 256 events since)",
            since_param(since),
            since_param(first),
        )
        self._emit_gap(
            normalizer, since, first, "replay did not reach back to the last handled event"
        )

    def _report_gap(self, normalizer: Normalizer, since: int, first: int, why: str) -> None:
        # Counted where it was found (recover, _connected); said here, where it can be an event.
        log.error("events may be missing: %s", why)
        self._emit_gap(normalizer, since, first, why)

    def _emit_gap(self, normalizer: Normalizer, since: int, first: int, why: str) -> None:
        ce = normalizer.gap(since, first, why)
        self.cursor.advance(first, ce.id)
        self._emit(Event(ce))
        if self.reconciler is not None:
            self.reconciler.gap(normalizer.engine.id, ce.id)

    async def _reconcile(self, reconciler: Reconciler) -> None:
        """The snapshot owed, after what was handled so far and before anything read since;
        committed before it counts as taken (a crash before that takes it again)."""
        normalizer = self.normalizer
        if normalizer is None:
            return
        taken = await reconciler.take(normalizer.engine, normalizer.source, normalizer.type_prefix)
        if taken is None:
            return
        for event, targets in taken.events:
            self.seq += 1
            event.seq = self.seq
            self._hand_on(event, targets)
        if await self.spool.commit():
            reconciler.committed(taken.id)
