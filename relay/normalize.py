"""Raw engine message (one line of `GET /events`) -> v1 CloudEvent. Pure; never raises on odd
input except `MalformedEventError` for a line that is not an engine message at all."""

from __future__ import annotations

import hashlib
import time as _time
from typing import Any, Final, Literal

import msgspec

from relay.errors import RelayError
from relay.schema import DATASCHEMA, DEFAULT_TYPE_PREFIX, Actor, CloudEvent, Engine, EventData

ExecCommandMode = Literal["full", "program", "none"]

# Keys the engine itself sets on container and image events. Every other attribute of those two
# types is one of the object's labels, which the engine copies in beside them. A label with one
# of these names is shadowed by the engine's value and cannot be told apart.
CONTAINER_ATTRIBUTES: Final = frozenset(
    {
        "image",
        "name",
        "exitCode",
        "execDuration",
        "signal",
        "execID",
        "oldName",
        "comment",
        "imageID",
        "imageRef",
    }
)
IMAGE_ATTRIBUTES: Final = frozenset({"name"})
_LABELLED_TYPES: Final = {"container": CONTAINER_ATTRIBUTES, "image": IMAGE_ATTRIBUTES}
_EXEC_ACTIONS: Final = frozenset({"exec_create", "exec_start"})


class MalformedEventError(RelayError):
    """The line is not an engine event message. Carries the raw line for the dead-letter file."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.raw = raw


class _RawActor(msgspec.Struct):
    ID: str = ""
    Attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class _RawMessage(msgspec.Struct):
    # Legacy `status`, `id` and `from` are not declared, so the decoder skips them.
    Type: str = ""
    Action: str = ""
    Actor: _RawActor = msgspec.field(default_factory=_RawActor)
    scope: str = ""
    timeNano: int = 0


_decoder = msgspec.json.Decoder(_RawMessage)


def format_time(time_nano: int, _cache: dict[int, str] = {}) -> str:  # noqa: B006 - a deliberate per-second cache
    """RFC 3339 UTC with nanoseconds, from an integer number of nanoseconds."""
    secs, nanos = divmod(time_nano, 1_000_000_000)
    prefix = _cache.get(secs)
    if prefix is None:
        if len(_cache) > 64:
            _cache.clear()
        prefix = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(secs))
        _cache[secs] = prefix
    return f"{prefix}.{nanos:09d}Z"


def since_param(time_nano: int) -> str:
    """The engine's `since` value for a timeNano, built from the integer (a float loses ns)."""
    return f"{time_nano // 10**9}.{time_nano % 10**9:09d}"


def event_id(engine_id: str, time_nano: int, type_: str, action: str, actor_id: str) -> str:
    """Deterministic id: the same engine event always hashes to the same id."""
    key = f"{engine_id}\x00{time_nano}\x00{type_}\x00{action}\x00{actor_id}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


class Normalizer:
    """Turns raw engine lines into v1 CloudEvents for one engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        type_prefix: str = DEFAULT_TYPE_PREFIX,
        exec_command: ExecCommandMode = "program",
    ) -> None:
        self.engine = engine
        self.source = f"urn:docker:engine:{engine.id}"
        self.type_prefix = type_prefix.rstrip(".")
        self.exec_command = exec_command

    def normalize(self, line: bytes) -> CloudEvent:
        try:
            raw = _decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MalformedEventError(f"not an engine event: {exc}", line) from exc
        if not raw.Type or not raw.Action or raw.timeNano <= 0:
            raise MalformedEventError("not an engine event: Type, Action or timeNano missing", line)
        return self.build(
            raw.Type, raw.Action, raw.Actor.ID, raw.Actor.Attributes, raw.scope, raw.timeNano
        )

    def build(
        self,
        type_: str,
        full_action: str,
        actor_id: str,
        raw_attributes: dict[str, Any],
        scope: str,
        time_nano: int,
    ) -> CloudEvent:
        action, sep, detail = full_action.partition(": ")
        action_detail: str | None = detail if sep else None
        if action_detail is not None and action in _EXEC_ACTIONS:
            action_detail = self._exec_detail(action_detail)

        # Prune events have no actor, hence no labels.
        known = None if action == "prune" else _LABELLED_TYPES.get(type_)
        attributes: dict[str, str] = {}
        labels: dict[str, str] = {}
        for key, value in raw_attributes.items():
            text = value if type(value) is str else msgspec.json.encode(value).decode()
            if known is None or key in known:
                attributes[key] = text
            else:
                labels[key] = text

        reclaimed: int | None = None
        if action == "prune":
            try:
                reclaimed = int(attributes.get("reclaimed", "0"))
            except ValueError:
                reclaimed = None

        name = attributes.get("name")
        time = format_time(time_nano)
        data = EventData(
            type=type_,
            action=action,
            action_detail=action_detail,
            scope=scope or "local",
            time=time,
            time_nano=time_nano,
            actor=Actor(id=actor_id, name=name, attributes=attributes, labels=labels),
            reclaimed_bytes=reclaimed,
            engine=self.engine,
        )
        return CloudEvent(
            specversion="1.0",
            datacontenttype="application/json",
            dataschema=DATASCHEMA,
            id=event_id(self.engine.id, time_nano, type_, full_action, actor_id),
            source=self.source,
            type=f"{self.type_prefix}.{type_}.{action}",
            subject=name or actor_id or None,
            time=time,
            data=data,
        )

    def _exec_detail(self, command: str) -> str | None:
        # The exec command line can carry secrets (passwords on the command line); by default
        # only the program name is kept.
        if self.exec_command == "full":
            return command
        if self.exec_command == "program":
            return command.split(" ", 1)[0]
        return None

    def gap(self, since_nano: int, first_nano: int, reason: str) -> CloudEvent:
        """A marker for a possible gap: the engine's replay did not reach back to `since`."""
        return self.build(
            "relay",
            "gap",
            self.engine.id,
            {
                "since_nano": str(since_nano),
                "resumed_at_nano": str(first_nano),
                "reason": reason,
            },
            "local",
            first_nano,
        )
