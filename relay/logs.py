"""Logging: JSON lines on stderr by default, a readable console format for a terminal.

Lines that repeat in bursts (a client library's error on every reconnect attempt, a dead letter
per event while a spool is full) are written once per burst: `BurstLog` writes the first line of
a burst at once, counts the repeats, and writes at most one summary line per interval with
their count. A burst is over once a whole interval passes without a repeat; the next one starts
with a line written at once again. Summaries still owed when the process exits are written then.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

_encoder = msgspec.json.Encoder()
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

# Client libraries repeat the same line on every attempt while a destination is down (aiokafka:
# one ERROR per connect). One line a minute still shows that it goes on; the relay's own
# "delivery failing" line has already said what it means for the sink.
THIRD_PARTY_INTERVAL = 60.0
# The loggers whose lines are the relay's own, already written once per burst where they repeat.
OWN_LOGGERS = ("relay",)
# At most this many kinds of line are tracked at once; beyond, lines pass unlimited rather than
# evicting a burst that is still being counted.
MAX_KEYS = 1024

K = TypeVar("K", bound=Hashable)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


# A message can carry what an engine user chose (a network name with a newline, in an error):
# on a terminal each control character is shown escaped, so no message can forge a line.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL   logger: message`, one line per message (a traceback follows on its
    own lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


# -- bursts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary(Generic[K]):
    """What was held back of one kind of line since the last line written for it."""

    key: K
    count: int
    seconds: float
    last: str  # the detail given with the latest one held back


@dataclass
class _Burst:
    since: float  # when the last line of this kind was written: the count runs from there
    count: int = 0
    last: str = ""


class BurstLog(Generic[K]):
    """Which lines of a repeating kind (`key`) to write: `hit` says whether to write this one
    now (the first of a burst) or hold it back (counted); `summarize` is called with what was
    held back once per `interval`, and once the burst is over.

    Thread-safe. With `timer`, a shared background thread calls `flush` when a summary is due,
    and every summary still owed is written at exit; without it, the owner calls `flush` (the
    tests do, with a scripted `clock`)."""

    def __init__(
        self,
        interval: float,
        summarize: Callable[[Summary[K]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        timer: bool = True,
    ) -> None:
        self.interval = interval
        self._summarize = summarize
        self._clock = clock
        self._bursts: dict[K, _Burst] = {}
        self._lock = threading.Lock()
        self._timer = timer
        if timer:
            _flusher.register(self)

    def hit(self, key: K, count: int = 1, detail: str = "") -> bool:
        """`count` more of `key`: True when the caller writes its line now, False when they
        are held back for a summary."""
        now = self._clock()
        with self._lock:
            burst = self._bursts.get(key)
            if burst is None or (burst.count == 0 and now - burst.since >= self.interval):
                if burst is None and len(self._bursts) >= MAX_KEYS:
                    self._forget_idle(now)
                    if len(self._bursts) >= MAX_KEYS:
                        return True
                self._bursts[key] = _Burst(since=now)
                return True
            first_held = burst.count == 0
            burst.count += count
            burst.last = detail
        if first_held and self._timer:
            _flusher.wake()
        return False

    def due(self, *, everything: bool = False) -> list[Summary[K]]:
        """The summaries whose interval is over (`everything`: all still owed), each counted
        from the last line written for its key; the bursts that are over are forgotten."""
        now = self._clock()
        out: list[Summary[K]] = []
        with self._lock:
            for key, burst in list(self._bursts.items()):
                elapsed = now - burst.since
                if burst.count and (everything or elapsed >= self.interval):
                    out.append(Summary(key, burst.count, elapsed, burst.last))
                    burst.since, burst.count, burst.last = now, 0, ""
                elif not burst.count and elapsed >= self.interval:
                    del self._bursts[key]
        return out

    def flush(self, *, everything: bool = False) -> None:
        for summary in self.due(everything=everything):
            self._summarize(summary)

    def seconds_to_due(self) -> float | None:
        """Until the next summary is due; None when none is owed."""
        now = self._clock()
        with self._lock:
            # The same difference `due` compares: its sign is exact, so 0 here means due there.
            owed = [self.interval - (now - b.since) for b in self._bursts.values() if b.count]
        return max(0.0, min(owed)) if owed else None

    def _forget_idle(self, now: float) -> None:
        for key, burst in list(self._bursts.items()):
            if not burst.count and now - burst.since >= self.interval:
                del self._bursts[key]


class _Flusher:
    """One daemon thread that writes the summaries of every timed `BurstLog` when they are due.
    It sleeps until the earliest one owed, and without end while none is."""

    def __init__(self) -> None:
        self._logs: weakref.WeakSet[BurstLog[Any]] = weakref.WeakSet()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._at_exit = False

    def register(self, burst_log: BurstLog[Any]) -> None:
        with self._wakeup:
            if not self._at_exit:
                # Registered after logging's own exit hook, so it runs first: the handlers are
                # still open.
                atexit.register(self.flush_everything)
                self._at_exit = True
            self._logs.add(burst_log)

    def wake(self) -> None:
        with self._wakeup:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-bursts", daemon=True)
                self._thread.start()
            self._wakeup.notify()

    def flush_everything(self) -> None:
        if not logging.getLogger().handlers:
            # Logging was never set up (a library use, a test run): what is owed would come
            # out through logging's last-resort handler after everything else, out of context.
            return
        for burst_log in list(self._logs):
            burst_log.flush(everything=True)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                waits = [w for w in (b.seconds_to_due() for b in list(self._logs)) if w is not None]
                wait = min(waits) if waits else None
                if wait is None or wait > 0:
                    self._wakeup.wait(wait)
            for burst_log in list(self._logs):
                try:
                    burst_log.flush()
                except Exception:  # a summary that cannot be written must not end the thread
                    logging.getLogger("relay.logs").debug("summary failed", exc_info=True)


_flusher = _Flusher()


class BurstFilter(logging.Filter):
    """On the handler: lines of client libraries (every logger outside the relay's own), and
    the relay's own lines marked `burst`, are written once per burst of the same logger, level
    and message template; the summary names the count held back and the latest such line."""

    def __init__(
        self,
        handler: logging.Handler,
        interval: float = THIRD_PARTY_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
        timer: bool = True,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.bursts: BurstLog[tuple[str, int, str]] = BurstLog(
            interval, self._write_summary, clock=clock, timer=timer
        )

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_burst_summary", False):
            return True
        # The relay's own lines are its own business, except those it marks as repeating with
        # whatever the input does (`extra={"burst": True}`: a flood of malformed lines).
        if _is_own(record.name) and not getattr(record, "burst", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        try:
            text = record.getMessage()
        except Exception:  # bad arguments: the handler reports them when it formats the line
            text = str(record.msg)
        return self.bursts.hit(key, 1, text)

    def flush(self, *, everything: bool = False) -> None:
        self.bursts.flush(everything=everything)

    def _write_summary(self, summary: Summary[tuple[str, int, str]]) -> None:
        name, level, _ = summary.key
        record = logging.makeLogRecord(
            {
                "name": name,
                "levelno": level,
                "levelname": logging.getLevelName(level),
                "msg": "%d more like this in the last %.0fs, suppressed; the last: %s",
                "args": (summary.count, summary.seconds, summary.last),
                "suppressed": summary.count,
                "_burst_summary": True,
            }
        )
        self.handler.handle(record)


def _is_own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


# -- set-up ------------------------------------------------------------------------------------


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(BurstFilter(handler))
    root = logging.getLogger()
    for old in root.handlers:
        # What an earlier set-up still owed goes out before its handler does.
        for f in old.filters:
            if isinstance(f, BurstFilter):
                f.flush(everything=True)
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO (every reconnect, every metadata refresh).
    for noisy in ("aiokafka", "kafka", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
