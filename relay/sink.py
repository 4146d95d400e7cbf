"""The sink port: what a destination adapter implements, and every name it may import.

An adapter (`sinks/`, or a third-party package registered under the entry-point group
`docker_event_relay.sinks`) imports from this module only. It writes a config class (a
`SinkConfigBase` with `type: Literal["..."]` and a `build()`) and a `Sink` with three methods:

    start()      connect; RetryableSinkError while the destination is not there yet
    send(batch)  one attempt to deliver the batch in order; return once it is acknowledged
    aclose()     release the connection

Everything else is shared and lives in the core: retries (one policy, `relay.retry`),
dead-lettering, metrics, shutdown, and the lifecycle below, which this base class enforces
around the adapter's three methods so that no adapter keeps lifecycle state of its own:

    NEW --start()--> STARTED --aclose()--> CLOSED (final)

- `start()` on a started sink does nothing; a failed `start()` leaves it NEW.
- `send()` before `start()` raises RetryableSinkError (nothing is sent; start, then retry).
- `start()` and `send()` after `aclose()` raise PermanentSinkError: closed is final.
- `aclose()` is idempotent, and runs the adapter's close once, whatever state it was in.
- `async with sink:` starts it and closes it.

Per-event outcomes of a batch are folded into one error by `Sink.fail()`, the one rule for it.
When the destination refused, or dropped the connection, with events in flight and does not say
which one it objected to, those events fail with RejectedSinkError (a retryable error): the
outbox then sends them one at a time, and dead-letters one that is rejected twice alone.
"""

from __future__ import annotations

import abc
import enum
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from relay.errors import (
    PartialDeliveryError,
    PermanentSinkError,
    RejectedSinkError,
    RetryableSinkError,
    SinkError,
    SinkStoppedError,
)
from relay.names import (
    KAFKA_TOPIC_MAX,
    MQTT_LEVEL_MAX_BYTES,
    MQTT_TOPIC_MAX_BYTES,
    encode_header_value,
    escape_text,
    has_unsafe_chars,
    kafka_topic,
    kafka_topic_part,
    mqtt_topic_level,
    unescape,
)
from relay.router import RouteFilter
from relay.schema import Event
from relay.template import EVENT_FIELDS, Template, require_fixed_start
from relay.tls import TlsSettings, read_secret_file, resolve_secret_files

__all__ = [
    "EVENT_FIELDS",
    "KAFKA_TOPIC_MAX",
    "MQTT_LEVEL_MAX_BYTES",
    "MQTT_TOPIC_MAX_BYTES",
    "Event",
    "PartialDeliveryError",
    "PermanentSinkError",
    "RejectedSinkError",
    "RetryableSinkError",
    "Sink",
    "SinkConfigBase",
    "SinkContext",
    "SinkError",
    "SinkState",
    "SinkStoppedError",
    "Template",
    "TlsSettings",
    "encode_header_value",
    "escape_text",
    "has_unsafe_chars",
    "kafka_topic",
    "kafka_topic_part",
    "mqtt_topic_level",
    "read_secret_file",
    "require_fixed_start",
    "resolve_secret_files",
    "unescape",
]


@dataclass(frozen=True)
class SinkContext:
    """What a sink may know about the relay it runs in."""

    relay_id: str = field(default_factory=socket.gethostname)
    """Stable name of this relay instance: the node name, else the host name."""


class SinkConfigBase(BaseModel):
    """Settings every sink has. Subclasses add `type: Literal[...]`, their own fields, and
    `build()`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, description="Name in logs and metrics; default: the type."
    )
    filter: RouteFilter = Field(
        default_factory=RouteFilter, description="Which events this sink receives."
    )
    max_batch: int = Field(default=100, ge=1, description="Events handed to one send call.")

    @property
    def sink_name(self) -> str:
        return self.name or str(getattr(self, "type", "sink"))

    def build(self, context: SinkContext) -> Sink:
        raise NotImplementedError(f"{type(self).__name__}.build")


class SinkState(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


_Method = Callable[..., Awaitable[None]]


def _guard_start(start: _Method) -> _Method:
    @functools.wraps(start)
    async def guarded(self: Sink) -> None:
        if self._state is SinkState.CLOSED:
            raise PermanentSinkError("start after close: the sink is closed", sink=self.name)
        if self._state is SinkState.STARTED:
            return
        await start(self)
        if self._state is SinkState.NEW:
            self._state = SinkState.STARTED

    return guarded


def _guard_send(send: _Method) -> _Method:
    @functools.wraps(send)
    async def guarded(self: Sink, batch: Sequence[Event]) -> None:
        if self._state is not SinkState.STARTED:
            if self._state is SinkState.CLOSED:
                raise PermanentSinkError("send after close: the sink is closed", sink=self.name)
            raise RetryableSinkError("send before start: the sink is not started", sink=self.name)
        await send(self, batch)

    return guarded


def _guard_aclose(aclose: _Method) -> _Method:
    @functools.wraps(aclose)
    async def guarded(self: Sink) -> None:
        if self._closing:
            # A subclass's aclose calling super().aclose(): part of the one close.
            await aclose(self)
            return
        if self._state is SinkState.CLOSED:
            return
        # Closed first: a send racing with the close sees a closed sink, not a half-closed one.
        self._state = SinkState.CLOSED
        self._closing = True
        try:
            await aclose(self)
        finally:
            self._closing = False

    return guarded


class Sink(abc.ABC):
    """One destination: one attempt per call, failures classified; see the module docstring."""

    _GUARDS: ClassVar[dict[str, Callable[[_Method], _Method]]] = {
        "start": _guard_start,
        "send": _guard_send,
        "aclose": _guard_aclose,
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The adapter writes plain start/send/aclose; the lifecycle is wrapped around them
        # here, once per class that defines them.
        for name, guard in Sink._GUARDS.items():
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_lifecycle_guarded", False):
                wrapped = guard(method)
                wrapped._lifecycle_guarded = True  # type: ignore[attr-defined]
                setattr(cls, name, wrapped)

    def __init__(self, name: str, max_batch: int = 100, linger: float = 0.0) -> None:
        self.name = name
        self.max_batch = max_batch
        # Seconds the outbox may wait, once it holds an event, for a batch of max_batch.
        self.linger = linger
        self.log = logging.getLogger(f"relay.sink.{name}")
        self._state = SinkState.NEW
        self._closing = False

    @property
    def state(self) -> SinkState:
        return self._state

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect. Raise RetryableSinkError when the destination is not there yet."""

    @abc.abstractmethod
    async def send(self, batch: Sequence[Event]) -> None:
        """Deliver `batch` in order; return only once the destination acknowledged all of it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection. Called once, whatever state the sink is in."""

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def fail(self, failures: Mapping[int, SinkError], size: int) -> None:
        """The one rule for a batch of `size` events of which `failures` (batch index -> error)
        failed: return when nothing failed; otherwise raise one error for the batch.

        - Every event failed and every failure is retryable, or every one is the destination
          stopping us: the first error stands for the batch (one retry, one log line).
        - A batch of one: its error.
        - Otherwise PartialDeliveryError: the indexes not in `failures` were delivered.

        Retryable failures share the longest Retry-After among them, so a retry waits as long
        as the most demanding destination answer asked.
        """
        if not failures:
            return
        retryable = [e for e in failures.values() if isinstance(e, RetryableSinkError)]
        waits = [e.retry_after for e in retryable if e.retry_after is not None]
        if waits:
            longest = max(waits)
            for error in retryable:
                error.retry_after = longest
        first = failures[min(failures)]
        if len(failures) == size and (
            size == 1
            or len(retryable) == size
            or all(isinstance(e, SinkStoppedError) for e in failures.values())
        ):
            raise first
        raise PartialDeliveryError(failures, sink=self.name)
