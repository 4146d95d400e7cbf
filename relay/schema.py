"""The v1 event schema: a CloudEvents 1.0 envelope whose `data` is the normalized engine event.

The structs here are the single source of truth: the JSON Schema under `schemas/` is generated
from them (`docker-event-relay schema`), and a test fails when the committed copy drifts.
Within major version 1, changes are additive only.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

DATASCHEMA: Final = "urn:docker-event-relay:schema:v1"
DEFAULT_TYPE_PREFIX: Final = "dev.docker-event-relay"


# The structs hold only strings, numbers, string maps and each other: they cannot form reference
# cycles, so the garbage collector need not track them (gc=False). Events the spool holds
# until a commit would otherwise make every collection walk them (measured: half the
# normalizing loop's speed with 500 events held).


class Actor(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """The object the event is about. `labels` are kept apart from the engine's attributes."""

    id: str
    name: str | None = None
    attributes: dict[str, str]
    labels: dict[str, str]


class Engine(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """The engine that emitted the event, from its `/info` and `/version`."""

    id: str
    name: str
    version: str
    api_version: str
    node_name: str | None = None


# The largest Compose container number carried as `number`: a label of more digits is no
# number Compose wrote, and every value up to it is exact in any JSON reader.
MAX_COMPOSE_NUMBER: Final = 999_999_999


class Compose(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """Docker Compose's labels on the object (`com.docker.compose.*`): present when the
    `com.docker.compose.project` label is. Values are the labels' text, exactly as set, except
    `number` and `oneoff`; `data.actor.labels` keeps every label as it is."""

    project: Annotated[str, msgspec.Meta(description="com.docker.compose.project")]
    service: Annotated[
        str | None, msgspec.Meta(description="com.docker.compose.service; absent without it.")
    ] = None
    number: (
        Annotated[
            int,
            msgspec.Meta(
                ge=0,
                le=MAX_COMPOSE_NUMBER,
                description="com.docker.compose.container-number as an integer; absent "
                "without the label or when it is not 1 to 9 ASCII digits (the label keeps the "
                "text).",
            ),
        ]
        | None
    ) = None
    oneoff: Annotated[
        bool | None,
        msgspec.Meta(
            description="com.docker.compose.oneoff (true for `docker compose run`): True/true "
            "or False/false; absent without the label or with any other value."
        ),
    ] = None


class Kubernetes(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """The kubelet's labels on a pod's container (nodes running Docker through cri-dockerd or
    dockershim): present when the `io.kubernetes.pod.name` label is. Values are the labels'
    text, exactly as set; a pod's sandbox (pause) container has the container `POD`."""

    namespace: Annotated[
        str | None,
        msgspec.Meta(description="io.kubernetes.pod.namespace; absent without it."),
    ] = None
    pod: Annotated[str, msgspec.Meta(description="io.kubernetes.pod.name")]
    container: Annotated[
        str | None,
        msgspec.Meta(description="io.kubernetes.container.name; absent without it."),
    ] = None


class Context(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """Where the object belongs, read from the labels its orchestrator sets on it; each part
    only when its labels are there."""

    compose: Compose | None = None
    kubernetes: Kubernetes | None = None


class Suppressed(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """What a sink's flap suppression held back of one actor's action in one window (the data
    of a `<type_prefix>.<type>.suppressed` event): those events were not delivered to this sink."""

    action: Annotated[str, msgspec.Meta(description="The base action held (die, start...).")]
    action_detail: Annotated[
        str | None,
        msgspec.Meta(description="Its detail (health_status: healthy or unhealthy), if any."),
    ] = None
    count: Annotated[int, msgspec.Meta(ge=1, description="Events held.")]
    first_time: Annotated[str, msgspec.Meta(description="RFC 3339 time of the first held.")]
    first_time_nano: int
    last_time: Annotated[str, msgspec.Meta(description="RFC 3339 time of the last held.")]
    last_time_nano: int


class Snapshot(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """Which snapshot of the engine's objects an event belongs to (`<type_prefix>.<kind>.state`
    and the closing `<type_prefix>.relay.snapshot_end`; see Reconcile after a gap)."""

    id: Annotated[str, msgspec.Meta(description="Shared by every event of one snapshot.")]
    reason: Annotated[
        str,
        msgspec.Meta(
            description="Why it was taken: gap (after a relay.gap) or start (the first "
            "stream from an engine)."
        ),
    ]
    counts: Annotated[
        dict[str, int] | None,
        msgspec.Meta(
            description="On snapshot_end only: the state events of each kind (container, "
            "volume, network, image) this destination was sent in the snapshot."
        ),
    ] = None


class EventData(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """Normalized engine event (the CloudEvent's `data`), schema version 1."""

    type: str
    action: str
    action_detail: str | None = None
    scope: str
    time: str
    time_nano: int
    actor: Actor
    reclaimed_bytes: int | None = None
    engine: Engine
    # Last, and absent unless the actor carries Compose or Kubernetes labels: every other event
    # encodes exactly as before the field existed.
    context: Context | None = None
    # Only on `...suppressed` events (relay.flap).
    suppressed: Suppressed | None = None
    # Only on snapshot events (relay.reconcile).
    snapshot: Snapshot | None = None


class CloudEvent(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    """A CloudEvents 1.0 event in structured JSON form. Only `subject` is ever omitted."""

    specversion: Literal["1.0"]
    id: str
    source: str
    type: str
    subject: str | None = None
    time: str
    datacontenttype: Literal["application/json"]
    dataschema: str
    data: EventData


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CloudEvent)


class Event:
    """One normalized event on its way through the relay.

    `seq` is the reader's sequence number (engine order); encodings are computed once and shared
    by every sink.
    """

    __slots__ = ("_data_json", "_json", "ce", "seq")

    def __init__(self, ce: CloudEvent, seq: int = 0) -> None:
        self.ce = ce
        self.seq = seq
        self._json: bytes | None = None
        self._data_json: bytes | None = None

    @classmethod
    def from_json(cls, body: bytes, seq: int) -> Event:
        """An event read back from its structured encoding (the spool keeps that)."""
        event = cls(_decoder.decode(body), seq)
        event._json = body
        return event

    @property
    def time_nano(self) -> int:
        return self.ce.data.time_nano

    @property
    def id(self) -> str:
        return self.ce.id

    def json(self) -> bytes:
        """Structured-mode encoding: the whole CloudEvent as JSON."""
        if self._json is None:
            self._json = _encoder.encode(self.ce)
        return self._json

    def data_json(self) -> bytes:
        """Binary-mode payload: only `data` as JSON."""
        if self._data_json is None:
            self._data_json = _encoder.encode(self.ce.data)
        return self._data_json

    def attributes(self) -> dict[str, str]:
        """Context attributes for binary-mode bindings (all but `data` and `datacontenttype`)."""
        ce = self.ce
        attrs = {
            "specversion": ce.specversion,
            "id": ce.id,
            "source": ce.source,
            "type": ce.type,
            "time": ce.time,
            "dataschema": ce.dataschema,
        }
        if ce.subject is not None:
            attrs["subject"] = ce.subject
        return attrs

    def __repr__(self) -> str:
        return f"Event(seq={self.seq}, type={self.ce.type!r}, id={self.ce.id!r})"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a v1 event (structured CloudEvent), generated from the structs."""
    schema = msgspec.json.schema(CloudEvent)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = DATASCHEMA
    schema["title"] = "docker-event-relay event, schema version 1"
    return schema
