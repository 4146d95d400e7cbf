"""Raw engine message (one line of `GET /events`) -> v1 CloudEvent. Pure. For any bytes at all
`Normalizer.normalize` returns an event or raises `MalformedEventError`, never anything else:
one hostile line must not stop the relay (the engine replays it after a restart, so a crash
would loop)."""

from __future__ import annotations

import hashlib
import time as _time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

from relay.errors import RelayError
from relay.schema import DATASCHEMA, DEFAULT_TYPE_PREFIX, Actor, CloudEvent, Engine, EventData

ExecCommandMode = Literal["full", "program", "none"]
Flavour = Literal["docker", "podman"]

# The engine's timeNano is a Go int64 (time.UnixNano): no real engine sends a later time than
# 2262, and every time up to it formats as RFC 3339 (which ends with year 9999).
MAX_TIME_NANO: Final = 2**63 - 1
# `reclaimed` is the engine's uint64 count of bytes.
MAX_RECLAIMED: Final = 2**64 - 1
# Attribute values are strings on every real engine. Anything else is kept as its JSON text, up
# to this many levels of nested arrays and objects; deeper is not an engine message.
MAX_VALUE_DEPTH: Final = 32

_EXEC_ACTIONS: Final = frozenset({"exec_create", "exec_start"})


def _per_action(
    common: Iterable[str], actions: Iterable[str], extra: Mapping[str, Iterable[str]]
) -> dict[str, frozenset[str]]:
    keys = frozenset(common)
    table = dict.fromkeys(actions, keys)
    for action, more in extra.items():
        table[action] = keys | frozenset(more)
    return table


# The keys the engine itself writes into Actor.Attributes of container and image events, per
# type and action. The engine copies the object's labels into the same map, so every other key
# of those events is a label; an action not listed here falls back to the union of its type's
# sets. Recorded from Docker 20.10 and 28.5 (tests/fixtures; a unit test holds the table to
# them); the container actions oom, detach, top, copy, extract-to-dir, resize and exec_detach
# are missing from the recordings and come from the engine's source.
DOCKER_ENGINE_KEYS: Final[Mapping[str, Mapping[str, frozenset[str]]]] = {
    "container": _per_action(
        ("image", "name"),
        (
            "archive-path",
            "attach",
            "copy",
            "create",
            "destroy",
            "detach",
            "export",
            "extract-to-dir",
            "health_status",
            "oom",
            "pause",
            "restart",
            "start",
            "stop",
            "top",
            "unpause",
            "update",
        ),
        {
            "commit": ("comment", "imageID", "imageRef"),
            "die": ("exitCode", "execDuration"),  # 28.5 sets execDuration, 20.10 does not
            "exec_create": ("execID",),
            "exec_detach": ("execID",),
            "exec_die": ("execID", "exitCode"),
            "exec_start": ("execID",),
            "kill": ("signal",),
            "rename": ("oldName",),
            "resize": ("height", "width"),
        },
    ),
    "image": _per_action(
        ("name",),
        ("create", "delete", "import", "load", "pull", "push", "save", "tag", "untag"),
        {},
    ),
}

# Podman's Docker-compatible API writes the same keys on every event, and on die exitCode (a copy
# of containerExitCode). Recorded from Podman 4.3.1; later versions add network and error when
# they have one.
_PODMAN_COMMON: Final = ("containerExitCode", "image", "name", "podId", "network", "error")
PODMAN_ENGINE_KEYS: Final[Mapping[str, Mapping[str, frozenset[str]]]] = {
    "container": _per_action(
        _PODMAN_COMMON,
        (
            "attach",
            "checkpoint",
            "cleanup",
            "commit",
            "create",
            "exec",
            "exec_died",
            "export",
            "health_status",
            "import",
            "init",
            "kill",
            "mount",
            "pause",
            "remove",
            "rename",
            "restart",
            "restore",
            "start",
            "stop",
            "sync",
            "unmount",
            "unpause",
        ),
        {"die": ("exitCode",)},
    ),
    "image": _per_action(
        _PODMAN_COMMON,
        (
            "build",
            "delete",
            "import",
            "load",
            "mount",
            "pull",
            "push",
            "remove",
            "save",
            "tag",
            "unmount",
            "untag",
        ),
        {},
    ),
}

ENGINE_KEYS: Final[Mapping[Flavour, Mapping[str, Mapping[str, frozenset[str]]]]] = {
    "docker": DOCKER_ENGINE_KEYS,
    "podman": PODMAN_ENGINE_KEYS,
}


class MalformedEventError(RelayError):
    """The line is not an engine event message. Carries the raw line for the dead-letter file."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.raw = raw


class InvalidEventError(ValueError):
    """Something in a decoded message that no engine sends (`build` raises it; `normalize`
    turns it into `MalformedEventError` with the line)."""


class _RawActor(msgspec.Struct):
    ID: str = ""
    # Go writes a nil map as null.
    Attributes: dict[str, Any] | None = None


class _RawMessage(msgspec.Struct):
    # Legacy `status`, `id` and `from` are not declared, so the decoder skips them.
    Type: str = ""
    Action: str = ""
    Actor: _RawActor = msgspec.field(default_factory=_RawActor)
    scope: str = ""
    # Bounded here, where the check costs nothing: `time.gmtime` overflows on larger values.
    timeNano: Annotated[int, msgspec.Meta(le=MAX_TIME_NANO)] = 0


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


def _nests_deeper(value: list[Any] | dict[str, Any], limit: int) -> bool:
    # Level by level rather than recursively: the point is to refuse what would exhaust the
    # stack of a recursive walk (the JSON encoder's).
    level: list[Any] = [value]
    for _ in range(limit):
        inner: list[Any] = []
        for container in level:
            for item in container.values() if isinstance(container, dict) else container:
                if isinstance(item, (list, dict)):
                    inner.append(item)
        if not inner:
            return False
        level = inner
    return True


def _value_text(value: object) -> str:
    if isinstance(value, (list, dict)) and _nests_deeper(value, MAX_VALUE_DEPTH):
        raise InvalidEventError(f"an attribute value nests deeper than {MAX_VALUE_DEPTH} levels")
    return msgspec.json.encode(value).decode()


def _byte_count(text: str) -> int:
    # ASCII digits only: int() would also take "-5", " 5", "1_000" and other scripts' digits.
    if len(text) <= 20 and text.isascii() and text.isdigit():
        count = int(text)
        if count <= MAX_RECLAIMED:
            return count
    raise InvalidEventError(f"reclaimed is not a byte count: {text[:40]!r}")


class Normalizer:
    """Turns raw engine lines into v1 CloudEvents for one engine.

    `flavour` picks the table of keys the engine itself sets (`ENGINE_KEYS`), which tells the
    engine's attributes from the object's labels."""

    def __init__(
        self,
        engine: Engine,
        *,
        type_prefix: str = DEFAULT_TYPE_PREFIX,
        exec_command: ExecCommandMode = "program",
        flavour: Flavour = "docker",
    ) -> None:
        self.engine = engine
        self.source = f"urn:docker:engine:{engine.id}"
        self.type_prefix = type_prefix.rstrip(".")
        self.exec_command = exec_command
        self.flavour = flavour
        # Per labelled type: the engine's keys per action, and their union for other actions.
        self._engine_keys = {
            type_: (actions, frozenset[str]().union(*actions.values()))
            for type_, actions in ENGINE_KEYS[flavour].items()
        }

    def normalize(self, line: bytes) -> CloudEvent:
        """The event of one line; `MalformedEventError` (with the line) for anything else."""
        try:
            raw = _decoder.decode(line)
            if not raw.Type or not raw.Action:
                raise InvalidEventError("Type or Action missing")
            if raw.timeNano <= 0:
                raise InvalidEventError("timeNano missing or not positive")
            return self.build(
                raw.Type,
                raw.Action,
                raw.Actor.ID,
                raw.Actor.Attributes or {},
                raw.scope,
                raw.timeNano,
            )
        except (msgspec.DecodeError, msgspec.ValidationError, InvalidEventError) as exc:
            raise MalformedEventError(f"not an engine event: {exc}", line) from exc
        except RecursionError as exc:
            raise MalformedEventError("not an engine event: nested too deeply", line) from exc
        except Exception as exc:
            # No known input gets here; whatever does is still one bad line, not a stopped relay.
            raise MalformedEventError(
                f"not an engine event: {type(exc).__name__}: {exc}", line
            ) from exc

    def build(
        self,
        type_: str,
        full_action: str,
        actor_id: str,
        raw_attributes: dict[str, Any],
        scope: str,
        time_nano: int,
    ) -> CloudEvent:
        """The event from a decoded message. Raises `InvalidEventError` for what no engine sends
        (an attribute value nested too deeply, a `reclaimed` that is not a byte count)."""
        action, sep, detail = full_action.partition(": ")
        action_detail: str | None = detail if sep else None
        if action_detail is not None and action in _EXEC_ACTIONS:
            action_detail = self._exec_detail(action_detail)

        # Prune events have no actor, hence no labels; nor have types the table does not name.
        labelled = None if action == "prune" else self._engine_keys.get(type_)
        engine_keys = None if labelled is None else labelled[0].get(action, labelled[1])
        attributes: dict[str, str] = {}
        labels: dict[str, str] = {}
        for key, value in raw_attributes.items():
            text = value if type(value) is str else _value_text(value)
            if engine_keys is None or key in engine_keys:
                attributes[key] = text
            else:
                labels[key] = text

        reclaimed: int | None = None
        if action == "prune":
            count = attributes.get("reclaimed")
            reclaimed = 0 if count is None else _byte_count(count)

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
