"""The engine side: read `GET /events` forever, and turn lines into routed events.

`EngineReader` owns the connection. It drains the socket as fast as the engine writes (the
engine drops events for a subscriber that falls 100 ms behind), frames the stream by lines,
and hands chunks of lines to a queue; it never waits on anything downstream. Every way the
stream can end (EOF, cut chunked body, reset, refused) means: reconnect with backoff and jitter,
forever, resuming with `since`.

`Dispatcher` takes the lines off the queue, normalizes them, drops what the engine replayed
twice, notices gaps in the replay, and routes each event to the sinks' outboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiodocker
import aiohttp
import msgspec

from relay.checkpoint import CheckpointStore, CheckpointTracker, Position
from relay.deadletter import DeadLetter
from relay.errors import SourceError
from relay.metrics import Metrics
from relay.normalize import MalformedEventError, Normalizer, since_param
from relay.retry import full_jitter
from relay.schema import Engine, Event
from relay.settings import Settings

log = logging.getLogger("relay.engine")

_RECORD_SEPARATOR = b"\x1e"  # application/json-seq framing (API >= 1.52), stripped if present


@dataclass
class Connected:
    """Queue marker: a new stream began. `boundary` is the newest timeNano handled before it
    (None on a first start): a replay that does not reach back to it may have a gap."""

    normalizer: Normalizer
    boundary: int | None


QueueItem = Connected | list[bytes]


class Target(Protocol):
    def put(self, event: Event) -> None: ...


def engine_address(settings: Settings) -> str:
    return settings.engine.host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class LineFramer:
    """Splits a byte stream into lines. A socket read is never taken for one event: reads split
    events and merge them at will."""

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._partial:
            chunk = self._partial + chunk
        lines = chunk.split(b"\n")
        self._partial = lines.pop()
        return lines


class EngineReader:
    def __init__(
        self,
        settings: Settings,
        queue: asyncio.Queue[QueueItem],
        resume: Callable[[str], Position | None],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self._resume = resume
        self.metrics = metrics
        self.connected = False
        self.last_error: str | None = None
        self._born = time.monotonic()
        self._ever_connected = False

    async def run(self) -> None:
        failures = 0
        address = engine_address(self.settings)
        while True:
            try:
                await self._stream()
                raise SourceError("event stream ended")
            except Exception as exc:
                # Every way a stream ends is a reconnect, an unforeseen one included (logged
                # with its traceback): the reader never takes the relay down.
                expected = isinstance(
                    exc,
                    TimeoutError
                    | SourceError
                    | aiodocker.DockerError
                    | aiohttp.ClientError
                    | OSError
                    | ValueError,
                )
                was_connected = self.connected
                self._set_connected(False)
                failures = 1 if was_connected else failures + 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                wait = full_jitter(
                    failures,
                    self.settings.engine.reconnect_initial,
                    self.settings.engine.reconnect_max,
                )
                # One line when the stream breaks, then one per 10 attempts while it stays down.
                if was_connected or failures == 1 or failures % 10 == 0 or not expected:
                    log.warning(
                        "engine %s: %s; reconnecting (attempt %d, next in %.1fs)",
                        address,
                        self.last_error,
                        failures,
                        wait,
                        exc_info=None if expected else exc,
                    )
                await asyncio.sleep(wait)

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.engine_connected.set(1 if value else 0)

    async def _stream(self) -> None:
        s = self.settings.engine
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=s.connect_timeout)
        docker = aiodocker.Docker(url=s.host, timeout=timeout)
        try:
            info = await docker.system.info()
            version = await docker.version()
            engine = Engine(
                id=str(info.get("ID") or ""),
                name=str(info.get("Name") or ""),
                version=str(version.get("Version") or ""),
                api_version=str(version.get("ApiVersion") or ""),
                node_name=self.settings.node_name,
            )
            if not engine.id:
                raise SourceError("engine /info has no ID")
            resumed = self._resume(engine.id)
            boundary = resumed.time_nano if resumed and resumed.time_nano else None
            if boundary is not None:
                since = max(1, boundary - int(s.resume_margin * 1e9))
            else:
                # A first start: from when the relay started (the engine's clock, less the
                # time spent here since, so clock skew does not matter), which covers what
                # happened while the sinks were connecting. Always pass `since`: the engine
                # sends the response headers before it subscribes us, and events in between
                # are only recovered by the replay.
                waited = int((time.monotonic() - self._born) * 1e9)
                since = max(1, engine_now(info) - waited)
            params: dict[str, str] = {"since": since_param(since)}
            if s.filters:
                params["filters"] = msgspec.json.encode(s.filters).decode()
            async with docker._query(  # the streaming call aiodocker's own events API uses
                "events",
                params=params,
                headers={"Accept": "application/x-ndjson"},
                timeout=timeout,
            ) as response:
                self._set_connected(True)
                if self._ever_connected:
                    self.metrics.engine_reconnects.inc()
                self._ever_connected = True
                log.info(
                    "engine %s connected: id=%s name=%s version=%s api=%s since=%s",
                    engine_address(self.settings),
                    engine.id,
                    engine.name,
                    engine.version,
                    engine.api_version,
                    params["since"],
                )
                normalizer = Normalizer(
                    engine,
                    type_prefix=self.settings.schema_.type_prefix,
                    exec_command=self.settings.schema_.exec_command,
                )
                self._put(Connected(normalizer, boundary))
                try:
                    await self._read(response)
                finally:
                    # Cancelled (shutdown) or cut: drop the connection itself, not back to a
                    # pool, so nothing is left open for the garbage collector to complain of.
                    response.close()
        finally:
            with contextlib.suppress(Exception):
                await docker.close()

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        content = response.content
        framer = LineFramer()
        while True:
            chunk = await content.readany()
            if not chunk:
                return
            lines = framer.feed(chunk)
            if lines:
                self._put(lines)

    def _put(self, item: QueueItem) -> None:
        # The bound applies to lines only: a Connected marker always goes in. The normalizer
        # is far faster than any engine; this is a last-resort bound on memory, and counted.
        if isinstance(item, list) and self.queue.qsize() >= self.settings.engine.queue_max:
            self.metrics.reader_lines_dropped.inc(len(item))
            log.error("reader queue full: dropped %d line(s)", len(item))
            return
        self.queue.put_nowait(item)


_TIME = re.compile(
    r"(?P<base>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))?(?P<tz>[Zz]|[+-]\d\d:\d\d)?"
)


def engine_now(info: Mapping[str, Any]) -> int:
    """The engine's clock in ns, from /info `SystemTime` (RFC 3339 with up to ns), else ours."""
    match = _TIME.fullmatch(str(info.get("SystemTime") or ""))
    if match is None:
        return time.time_ns()
    tz = match["tz"] or "Z"
    stamp = datetime.fromisoformat(match["base"] + ("+00:00" if tz in "Zz" else tz))
    return int(stamp.timestamp()) * 10**9 + int(((match["frac"] or "") + "0" * 9)[:9])


class Dispatcher:
    """Lines -> events -> outboxes, in engine order."""

    def __init__(
        self,
        queue: asyncio.Queue[QueueItem],
        route: Callable[[Event], Sequence[Target]],
        tracker: CheckpointTracker,
        dead_letter: DeadLetter,
        metrics: Metrics,
    ) -> None:
        self.queue = queue
        self.route = route
        self.tracker = tracker
        self.dead_letter = dead_letter
        self.metrics = metrics
        self.cursor = Position()
        self.normalizer: Normalizer | None = None
        self.seq = 0
        self._check_gap_since: int | None = None

    def resume_position(self, store: CheckpointStore) -> Callable[[str], Position | None]:
        """For the reader: where to resume on engine `engine_id`."""

        def resume(engine_id: str) -> Position | None:
            if self.normalizer is None or self.normalizer.engine.id != engine_id:
                stored = store.load(engine_id)
                self.tracker.reset(engine_id, stored)
                self.cursor = stored.copy() if stored else Position()
                return stored
            return self.cursor.copy()

        return resume

    async def run(self) -> None:
        while True:
            self._handle(await self.queue.get())

    def drain_nowait(self) -> None:
        """Dispatch whatever the reader already queued (shutdown)."""
        while not self.queue.empty():
            self._handle(self.queue.get_nowait())

    def _handle(self, item: QueueItem) -> None:
        if isinstance(item, Connected):
            self.normalizer = item.normalizer
            self._check_gap_since = item.boundary
        else:
            self.dispatch(item)

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
        targets = self.route(event)
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
