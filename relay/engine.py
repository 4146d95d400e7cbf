"""The engine reader: read `GET /events` forever; it only reads.

`EngineReader` owns the connection. It drains the socket as fast as the engine writes (the
engine drops events for a subscriber that falls 100 ms behind), frames the stream by lines,
and hands chunks of lines to a queue; it never waits on anything downstream. Every way the
stream can end (EOF, cut chunked body, reset, refused) means: reconnect with the shared retry
policy, forever, resuming with `since` from where the pipeline says it is.

Whatever the engine sends costs bounded memory: a line longer than `engine.max_line_bytes` is
skipped as it arrives and handed on as an `OversizedLine` (its head and size) in its place
among the lines, for the pipeline to dead-letter; the queue holds at most `engine.queue_max`
lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiodocker
import aiohttp
import msgspec

from relay.identity import engine_identity, flavour_of
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.normalize import Flavour, since_param
from relay.retry import RetryPolicy
from relay.schema import Engine
from relay.settings import EngineSettings

log = logging.getLogger("relay.engine")


@dataclass(frozen=True)
class Connected:
    """Queue marker: a new stream began, from this engine, whose clock said `engine_now`.
    `clamped_from`: the resume point was ahead of that clock (and read from its now instead).
    `flavour`: which engine it is (`/version`), for the normalizer."""

    engine: Engine
    engine_now: int = 0
    clamped_from: int | None = None
    flavour: Flavour = "docker"


DEFAULT_MAX_LINE_BYTES: int = EngineSettings.model_fields["max_line_bytes"].default
# What of an oversized line is kept for its dead letter: enough to tell what it was.
OVERSIZED_HEAD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class OversizedLine:
    """Queue item: a line longer than `engine.max_line_bytes`, dropped while it was read. Its
    first bytes are kept for the dead letter, with its size and the limit it broke."""

    head: bytes
    size: int
    limit: int


QueueItem = Connected | list[bytes] | OversizedLine

# Where to resume on an engine (its id): the newest timeNano handled, or None for "from now".
ResumePoint = Callable[[str], int | None]


def engine_address(settings: EngineSettings) -> str:
    return settings.host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class LineFramer:
    """Splits a byte stream into lines. A socket read is never taken for one event: reads split
    events and merge them at will.

    Linear in the bytes fed and bounded in memory, whatever the stream: the line begun is kept
    as one piece (a bytearray once it spans reads, so a trickle of small reads costs neither a
    copy per read nor an object per read), and never more than `max_line_bytes` of it. A line
    longer than that is dropped as it arrives, up to its newline; only its first
    `OVERSIZED_HEAD_BYTES` and its size are kept. `feed` returns the complete lines and leaves
    the dropped ones in `oversized`, each with the place it stood among them.
    """

    __slots__ = ("_fast_max", "_head", "_partial", "_skipped", "limit", "oversized")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.limit = max_line_bytes
        # Of the last feed: (index in the lines it returned, record) in stream order.
        self.oversized: list[tuple[int, OversizedLine]] = []
        self._partial: bytes | bytearray = b""
        # Set while an oversized line is being skipped: its first bytes, and its size so far.
        self._head: bytes | None = None
        self._skipped = 0
        # Reads with a newline up to this size take the fast path: no line in them can be over
        # the limit. -1 while only the careful path may run (a line being skipped, records of
        # the last read to clear): one comparison per read decides.
        self._fast_max = max_line_bytes

    @property
    def retained(self) -> int:
        """Bytes held between reads (the line begun, or the head of one being skipped)."""
        return len(self._head) if self._head is not None else len(self._partial)

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if lines and len(chunk) <= self._fast_max:
            partial = self._partial
            if partial:
                if len(partial) + len(lines[0]) > self.limit:
                    return self._careful(lines, rest)
                lines[0] = b"".join((partial, lines[0]))
            self._partial = rest
            return lines
        return self._careful(lines, rest)

    def items(self, lines: list[bytes]) -> list[list[bytes] | OversizedLine]:
        """What `feed` returned, cut where its oversized lines stood, with them in place."""
        items: list[list[bytes] | OversizedLine] = []
        start = 0
        for at, record in self.oversized:
            if at > start:
                items.append(lines[start:at])
            items.append(record)
            start = at
        if start < len(lines):
            items.append(lines[start:])
        return items

    def _careful(self, lines: list[bytes], rest: bytes) -> list[bytes]:
        """`feed` for a read without a newline, or in which a line may be over the limit."""
        if self.oversized:
            self.oversized = []
        if lines:
            lines = self._checked(lines)
            self._partial = b""
            self._head = None
        if rest:
            self._extend(rest)
        self._fast_max = -1 if self._head is not None or self.oversized else self.limit
        return lines

    def _checked(self, lines: list[bytes]) -> list[bytes]:
        """The complete lines of a read, each over the limit taken out into `oversized`."""
        limit = self.limit
        out: list[bytes] = []
        first = lines[0]
        if self._head is not None:
            self._drop(out, self._head, self._skipped + len(first))
        elif len(self._partial) + len(first) > limit:
            self._drop(out, _head_of(self._partial, first), len(self._partial) + len(first))
        else:
            out.append(b"".join((self._partial, first)))
        for line in itertools.islice(lines, 1, None):
            if len(line) > limit:
                self._drop(out, line[:OVERSIZED_HEAD_BYTES], len(line))
            else:
                out.append(line)
        return out

    def _drop(self, out: list[bytes], head: bytes, size: int) -> None:
        self.oversized.append((len(out), OversizedLine(head, size, self.limit)))

    def _extend(self, piece: bytes) -> None:
        """The line begun goes on with `piece` (no newline in it)."""
        if self._head is not None:
            self._skipped += len(piece)
            return
        partial = self._partial
        size = len(partial) + len(piece)
        if size > self.limit:
            self._head = _head_of(partial, piece)
            self._skipped = size
            self._partial = b""
        elif not partial:
            self._partial = piece
        elif isinstance(partial, bytearray):
            partial += piece
        else:
            self._partial = bytearray(partial)
            self._partial += piece


def _head_of(partial: bytes | bytearray, piece: bytes) -> bytes:
    head = bytes(partial[:OVERSIZED_HEAD_BYTES])
    return head + piece[: OVERSIZED_HEAD_BYTES - len(head)]


class EngineReader:
    def __init__(
        self,
        settings: EngineSettings,
        queue: asyncio.Queue[QueueItem],
        resume_point: ResumePoint,
        policy: RetryPolicy,
        metrics: Metrics,
        node_name: str | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self._resume_point = resume_point
        self.policy = policy
        self.metrics = metrics
        self.node_name = node_name
        self.address = engine_address(settings)
        self.connected = False
        self.last_error: str | None = None
        self._born = time.monotonic()
        self._ever_connected = False
        self._failures = 0
        # engine.queue_max bounds lines, not queue items (a read carries any number of lines):
        # the lines of each item still queued, oldest first, and their sum.
        self._queued_counts: deque[int] = deque()
        self._queued_lines = 0
        self._queue_max = settings.queue_max

    async def run(self, task_status: TaskStatus) -> None:
        task_status.started()
        while True:
            # A fresh retry context per connection: a stream that ran for hours and broke
            # reconnects at once, with the backoff starting over.
            await self.policy.reconnect(self._attempt)

    async def _attempt(self) -> None:
        """One connection: returns when a stream that was open ended, raises when none opened."""
        try:
            await self._stream()
            raise ConnectionResetError("event stream ended")
        except Exception as exc:
            # Every way a stream ends is a reconnect, an unforeseen one included (logged with
            # its traceback): the reader never takes the relay down.
            expected = isinstance(
                exc,
                TimeoutError | aiodocker.DockerError | aiohttp.ClientError | OSError | ValueError,
            )
            was_connected = self.connected
            self._set_connected(False)
            self._failures = 1 if was_connected else self._failures + 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            # One line when the stream breaks, then one per 10 attempts while it stays down.
            if was_connected or self._failures % 10 == 1 or not expected:
                log.warning(
                    "engine %s: %s; reconnecting (attempt %d)",
                    self.address,
                    self.last_error,
                    self._failures,
                    exc_info=None if expected else exc,
                )
            if not was_connected:
                raise

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        self.metrics.engine_connected.set(1 if value else 0)

    async def _stream(self) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=s.connect_timeout)
        docker = aiodocker.Docker(url=s.host, timeout=timeout)
        try:
            info = await docker.system.info()
            # When the engine's clock said SystemTime: the start of the relay is this long
            # before it.
            waited = int((time.monotonic() - self._born) * 1e9)
            version = await docker.version()
            flavour = flavour_of(version)
            engine = Engine(
                id=engine_identity(info, flavour, s.id),
                name=str(info.get("Name") or ""),
                version=str(version.get("Version") or ""),
                api_version=str(version.get("ApiVersion") or ""),
                node_name=self.node_name,
            )
            if not engine.id:
                raise ValueError("engine /info has no ID")
            boundary = self._resume_point(engine.id)
            now = engine_now(info)
            clamped_from = None
            if boundary is not None and boundary > now:
                # A restored backup, or a clock that was set back: resuming from the future
                # would skip everything until then, on every later restart too.
                log.warning(
                    "engine %s: the stored position %s is ahead of the engine's clock %s; "
                    "reading from the engine's now (a gap is reported)",
                    self.address,
                    since_param(boundary),
                    since_param(now),
                )
                clamped_from, boundary = boundary, now
            if boundary is not None:
                since = max(1, boundary - int(s.resume_margin * 1e9))
            else:
                # A first start: from when the relay started (the engine's clock, less the
                # time spent here since, so clock skew does not matter), which covers what
                # happened while the sinks were connecting. Always pass `since`: the engine
                # sends the response headers before it subscribes us, and events in between
                # are only recovered by the replay.
                since = max(1, now - waited)
            params: dict[str, str] = {"since": since_param(since)}
            if s.filters:
                params["filters"] = msgspec.json.encode(s.filters).decode()
            # aiodocker's session and host URL (its unix socket or TLS connector, from
            # DOCKER_HOST and DOCKER_CERT_PATH); `docker.version()` fixed the API version.
            url = f"{docker.docker_host}/{docker.api_version}/events"
            async with docker.session.get(
                url,
                params=params,
                headers={"Accept": "application/x-ndjson"},
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    body = (await response.read())[:200].decode("utf-8", "replace")
                    raise ConnectionError(f"GET /events answered {response.status}: {body}")
                self._set_connected(True)
                if self._ever_connected:
                    self.metrics.engine_reconnects.inc()
                self._ever_connected = True
                log.info(
                    "engine %s connected: %s id=%s (its /info ID: %s) name=%s version=%s "
                    "api=%s since=%s",
                    self.address,
                    flavour,
                    engine.id,
                    info.get("ID"),
                    engine.name,
                    engine.version,
                    engine.api_version,
                    params["since"],
                )
                self._put(Connected(engine, now, clamped_from, flavour))
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
        framer = LineFramer(self.settings.max_line_bytes)
        while True:
            chunk = await content.readany()
            if not chunk:
                return
            lines = framer.feed(chunk)
            if framer.oversized:
                for item in framer.items(lines):
                    self._put(item)
            elif lines:
                self._put(lines)

    def _put(self, item: QueueItem) -> None:
        queue = self.queue
        counts = self._queued_counts
        # Only the reader puts and the pipeline takes in order: whatever left the queue since
        # the last put is the oldest items counted.
        gone = len(counts) - queue.qsize()
        while gone:
            self._queued_lines -= counts.popleft()
            gone -= 1
        if type(item) is list:
            n = len(item)
        elif isinstance(item, OversizedLine):
            n = 1
        else:
            # The bound applies to lines only: a Connected marker always goes in.
            n = 0
        if self._queued_lines + n > self._queue_max:
            # The normalizer is far faster than any engine; this is a last-resort bound on
            # memory, and counted.
            kept = max(self._queue_max - self._queued_lines, 0)
            self.metrics.reader_lines_dropped.inc(n - kept)
            log.error("reader queue full: dropped %d line(s)", n - kept, extra={"burst": True})
            if not kept:
                return
            assert isinstance(item, list)  # an oversized line is one line: nothing was kept
            item, n = item[:kept], kept
        queue.put_nowait(item)
        counts.append(n)
        self._queued_lines += n


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
