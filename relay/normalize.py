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
from relay.schema import (
    DATASCHEMA,
    DEFAULT_TYPE_PREFIX,
    MAX_COMPOSE_NUMBER,
    Actor,
    CloudEvent,
    Compose,
    Context,
    Engine,
    EventData,
    Kubernetes,
)

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

# The actions whose detail is a command line (`exec_start: sh -c ...`).
EXEC_ACTIONS: Final = frozenset({"exec_create", "exec_start"})
# Each mode keeps less of a command line than the one after it: a sink's rule can only take
# away from what the normalizer kept (relay.redact).
EXEC_COMMAND_MODES: Final[tuple[ExecCommandMode, ...]] = ("none", "program", "full")


def exec_detail(command: str, mode: ExecCommandMode) -> str | None:
    """What `mode` keeps of an exec command line. Idempotent, so a sink's narrower rule can
    apply it again to what the normalizer kept."""
    if mode == "full":
        return command
    if mode == "program":
        return command.split(" ", 1)[0]
    return None


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


# The labels `data.context` is read from: Docker Compose's (v1 and v2 alike), and those the
# kubelet sets on a pod's containers through cri-dockerd (dockershim before it).
COMPOSE_PROJECT: Final = "com.docker.compose.project"
COMPOSE_SERVICE: Final = "com.docker.compose.service"
COMPOSE_NUMBER: Final = "com.docker.compose.container-number"
COMPOSE_ONEOFF: Final = "com.docker.compose.oneoff"
K8S_POD: Final = "io.kubernetes.pod.name"
K8S_NAMESPACE: Final = "io.kubernetes.pod.namespace"
K8S_CONTAINER: Final = "io.kubernetes.container.name"
# Compose writes "True"/"False"; any other text is not a flag Compose set.
_ONEOFF: Final[Mapping[str, bool]] = {"True": True, "true": True, "False": False, "false": False}
_NUMBER_DIGITS: Final = len(str(MAX_COMPOSE_NUMBER))


def _compose_number(text: str | None) -> int | None:
    # ASCII digits only, as for `reclaimed`: int() would take "-1", " 1", "1_0" and other
    # scripts' digits. Anything else stays readable in the label, and is no number.
    if text is not None and 0 < len(text) <= _NUMBER_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def context_of(labels: Mapping[str, str]) -> Context | None:
    """The Compose and Kubernetes context that `labels` name, or None. A pure function of the
    labels, so whatever rewrites an event's labels can derive the context again from what it
    kept."""
    project = labels.get(COMPOSE_PROJECT)
    pod = labels.get(K8S_POD)
    if project is None and pod is None:
        return None
    compose = None
    if project is not None:
        oneoff = labels.get(COMPOSE_ONEOFF)
        compose = Compose(
            project=project,
            service=labels.get(COMPOSE_SERVICE),
            number=_compose_number(labels.get(COMPOSE_NUMBER)),
            oneoff=None if oneoff is None else _ONEOFF.get(oneoff),
        )
    kubernetes = None
    if pod is not None:
        kubernetes = Kubernetes(
            namespace=labels.get(K8S_NAMESPACE), pod=pod, container=labels.get(K8S_CONTAINER)
        )
    return Context(compose=compose, kubernetes=kubernetes)


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
        self._id_from_name = flavour == "podman"
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
        if action_detail is not None and action in EXEC_ACTIONS:
            # The exec command line can carry secrets (passwords on the command line): only
            # what the most permissive sink receives is kept, by default the program name.
            action_detail = exec_detail(action_detail, self.exec_command)

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

        # Absent when the engine did not say (Podman's prunes): 0 would claim nothing was freed.
        reclaimed: int | None = None
        if action == "prune":
            count = attributes.get("reclaimed")
            if count is not None:
                reclaimed = _byte_count(count)

        # Inline, on every event: two lookups when there are labels (measured: 40 ns, where a
        # call of context_of that finds nothing costs 100).
        context = None
        if labels and (COMPOSE_PROJECT in labels or K8S_POD in labels):
            context = context_of(labels)

        name = attributes.get("name")
        if not actor_id and self._id_from_name and name:
            # Podman leaves Actor.ID empty on volume, image pull/build and system events and
            # names the object instead; the name is its id there (Docker's volume ids are
            # names too), and keeps two such events of one timeNano apart in the event id.
            actor_id = name
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
            context=context,
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
