"""One exception tree for the whole relay.

    RelayError
    ├── ConfigError            a setting is wrong; the CLI exits 2 naming it
    ├── SourceError            the engine cannot be reached or its stream broke
    └── SinkError              one delivery attempt failed (carries the sink name)
        ├── RetryableSinkError     try again later (optionally after `retry_after` seconds)
        │   └── RejectedSinkError  the destination refused or dropped the connection while this
        │                          event (or its batch) was in flight: one of its events may be
        │                          the cause; the outbox retries such events one at a time
        ├── PermanentSinkError     this event can never be delivered: dead-letter it
        │   └── SinkStoppedError   the destination asked us to stop (e.g. HTTP 410 Gone)
        └── PartialDeliveryError   some events of a batch failed; `failures` says which

Library exceptions are translated at the sink boundary (`raise ... from exc`), so the
outbox only ever sees this tree.
"""

from __future__ import annotations

from collections.abc import Mapping


class RelayError(Exception):
    """Root of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is invalid. `setting` names it the way the user wrote it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class SourceError(RelayError):
    """The engine could not be reached, or its event stream ended."""


class SinkError(RelayError):
    """A delivery attempt failed."""

    def __init__(self, message: str, *, sink: str = "") -> None:
        super().__init__(message)
        self.sink = sink
        self.message = message
        """The text without the sink's name, for quoting inside another error of that sink."""

    def __str__(self) -> str:
        text = super().__str__()
        return f"[{self.sink}] {text}" if self.sink else text


class RetryableSinkError(SinkError):
    """Transient: the same events may succeed later. `retry_after` overrides the backoff."""

    def __init__(self, message: str, *, sink: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, sink=sink)
        self.retry_after = retry_after


class RejectedSinkError(RetryableSinkError):
    """The destination refused, or dropped the connection, while this event or its batch was in
    flight: a malformed-packet disconnect, a broker's verdict on a whole batch of records. One
    event of the batch may be the cause, or the timing may be a coincidence (a broker restart).

    The outbox retries the events of a batch that failed so one at a time, in order, with the
    usual backoff; an event rejected twice when sent alone is dead-lettered as permanent, and
    the sink goes on with the next (`relay.outbox.Isolation`; README, "Delivery").
    """


class PermanentSinkError(SinkError):
    """The event(s) can never be delivered as they are: they go to the dead-letter file."""


class SinkStoppedError(PermanentSinkError):
    """The destination told us to stop sending (HTTP 410). The sink stays stopped."""


class PartialDeliveryError(SinkError):
    """Some events of a batch failed. `failures` maps batch index to the error of that event.

    Indexes missing from `failures` were delivered.
    """

    def __init__(
        self, failures: Mapping[int, SinkError], *, sink: str = "", message: str = ""
    ) -> None:
        super().__init__(message or f"{len(failures)} event(s) of the batch failed", sink=sink)
        self.failures = dict(failures)
