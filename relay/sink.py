"""The sink port: what a destination adapter implements, and every name it may import.

An adapter (`sinks/`, or a third-party package registered under the entry-point group
`docker_event_relay.sinks`) imports from this module only. It writes a config class (a
`SinkConfigBase` with `type: Literal["..."]` and a `build()`) and a `Sink` with three methods:

    start()      connect; RetryableSinkError while the destination is not there yet
    send(batch)  one attempt to deliver the batch in order; return once it is acknowledged
    aclose()     release the connection

A config may also say where its sink publishes (`event_channel()`, an `EventChannel`): the
AsyncAPI document (`relay.asyncapi`) describes the bundled sinks that do.

Everything else is shared and lives in the core: retries (one policy, `relay.retry`),
dead-lettering, metrics, shutdown, redaction (`redact:` on every sink's config; `send` is
handed the redacted copies, `relay.redact`), and the lifecycle below, which this base class
enforces around the adapter's three methods so that no adapter keeps lifecycle state of its own:

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
from relay.flap import FlapSettings
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
from relay.reconcile import ReconcileSettings
from relay.redact import Redaction, RedactSettings
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
    "EventChannel",
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


@dataclass(frozen=True, kw_only=True)
class EventChannel:
    """Where and how a sink type publishes events, for the AsyncAPI document
    (`docker-event-relay asyncapi`, `relay.asyncapi`). The adapter says what only it knows: its
    protocol, its default destination and how its binding carries a CloudEvent; the core adds
    the CloudEvents messages, the template fields and the v1 event schema. The AsyncAPI objects
    (`server`, the bindings) go into the document as they are."""

    title: str
    protocol: str
    """The AsyncAPI protocol name (kafka, mqtt, http)."""
    server: Mapping[str, Any]
    """An AsyncAPI Server Object: the destination the sink's settings name."""
    address: str | None
    """The default destination template over EVENT_FIELDS (a topic); None when the sink has
    no template (a webhook's URL)."""
    description: str
    """Which settings pick the destination and how field values are made safe in it."""
    modes: tuple[str, ...]
    """CloudEvents content modes offered: binary, structured, batch."""
    default_mode: str
    mode_setting: str
    attribute_header: str
    """Binary mode: the header (property) of a context attribute, `{name}` its name."""
    attribute_escape: str
    """Binary mode: how an attribute's value is escaped in its header."""
    content_type_header: str | None
    """The header carrying the content type; None where the protocol has a field for it."""
    structured_content_type: str
    batch_content_type: str | None = None
    extra_headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Other headers the sink may send (name -> JSON Schema), none of them required."""
    channel_bindings: Mapping[str, Any] = field(default_factory=dict)
    operation_bindings: Mapping[str, Any] = field(default_factory=dict)
    message_bindings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """AsyncAPI message bindings by content mode."""


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
    redact: RedactSettings = Field(
        default_factory=RedactSettings,
        description="What this sink must not receive (see Redaction); empty: nothing is taken out.",
    )
    flap: FlapSettings | None = Field(
        default=None,
        description="Flap suppression (see Flap suppression): repeats of one actor's action "
        "within a window are held and summarised; absent: off.",
    )
    reconcile: ReconcileSettings = Field(
        default_factory=ReconcileSettings,
        description="Snapshots of the engine's objects after a gap (true, or {on_gap, "
        "on_start, images}; see Reconcile after a gap); false: none.",
    )

    @property
    def sink_name(self) -> str:
        return self.name or str(getattr(self, "type", "sink"))

    def build(self, context: SinkContext) -> Sink:
        raise NotImplementedError(f"{type(self).__name__}.build")

    @classmethod
    def event_channel(cls) -> EventChannel | None:
        """The channel this sink type publishes to with its default settings, for the AsyncAPI
        document; None: it publishes to none (stdout)."""
        return None


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
        redaction = self.redaction
        # Only the send the relay calls redacts: a subclass's send calling super().send()
        # must not hash a hash.
        if redaction is not None and type(self).send is guarded:
            batch = redaction.batch(batch)
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
        # Set by the composition root from the sink's `redact:`; None: events as they are.
        self.redaction: Redaction | None = None
        # Set by the composition root from the sink's `flap:`; None: no flap suppression.
        self.flap: FlapSettings | None = None
        # Set by the composition root from the sink's `reconcile:`; off by default.
        self.reconcile = ReconcileSettings()

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
