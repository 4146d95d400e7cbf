"""Reconcile after a gap: a snapshot of the engine's objects for the sinks that ask for one.

When the relay reports a gap (`relay.gap`), a consumer cannot know what changed while events
were missing. A sink with `reconcile: true` then receives the engine's current objects as
`<prefix>.container.state`, `.volume.state`, `.network.state` (and `.image.state` with
`images: true`) events, all with the same `data.snapshot.id`, closed by one
`<prefix>.relay.snapshot_end` event that counts what the sink was sent per kind.

    reconcile: true                     # the same as {on_gap: true}
    reconcile: {on_gap: true, on_start: true, images: false}

Where it sits: the pipeline asks for a snapshot when it emits a gap (or on the first stream from
an engine it has no position for, with `on_start`) and, once the engine's replay is through
(`Pipeline.run`), waits for the query before it handles anything more. The reader goes on
reading meanwhile, so the engine drops nothing; what it read waits in the queue. A snapshot
therefore reflects every event before it in the stream and may already reflect some that follow
it (those that happened during the query).

Durability: the snapshot owed is written to STATE_DIR/reconcile.json before the gap's event can
be committed, and removed once the spool committed the snapshot's events. A crash in between
takes the snapshot again at the next start, with the same snapshot id and the same event ids
(they derive from the gap, not from the moment of the query), so a consumer that dedupes on ids
keeps one copy. A failed query (the engine gone again) is logged and counted, and retried at the
next connection to the engine, or with the first item read at least `RETRY_AFTER` seconds
later; it never holds the stream longer than `QUERY_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import aiodocker
import aiohttp
import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from relay.normalize import context_of, format_time
from relay.router import RouteFilter, Target
from relay.schema import DATASCHEMA, Actor, CloudEvent, Engine, Event, EventData, Snapshot

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger("relay.reconcile")

Reason = Literal["gap", "start"]
KINDS: Final = ("container", "volume", "network", "image")
# A snapshot query that takes longer than this is abandoned (and retried later): meanwhile the
# pipeline hands nothing on.
QUERY_TIMEOUT: Final = 30.0
RETRY_AFTER: Final = 30.0
PENDING_FILE: Final = "reconcile.json"
# Values the engine sends as strings; anything else (no real engine) is kept as JSON text, up
# to this length: a snapshot must not fail on one odd object.
_MAX_VALUE_CHARS: Final = 64 * 1024


class ReconcileSettings(BaseModel):
    """When a sink receives snapshots of the engine's objects (see Reconcile after a gap)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on_gap: bool = Field(
        default=False,
        description="A snapshot after every gap the relay reports (relay.gap). "
        "`reconcile: true` is short for this.",
    )
    on_start: bool = Field(
        default=False,
        description="A snapshot when the relay first reads an engine it has no position for "
        "(its first start, a new engine).",
    )
    images: bool = Field(default=False, description="Images in the snapshot too.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"on_gap": value}
        return value

    @property
    def enabled(self) -> bool:
        return self.on_gap or self.on_start


# -- the conversion (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Objects:
    """What the engine's list calls answered (JSON as decoded), and its clock then."""

    time_nano: int
    containers: list[Any]
    volumes: list[Any]
    networks: list[Any]
    images: list[Any] | None = None


def snapshot_id(engine_id: str, reason: Reason, key: str) -> str:
    """A snapshot's id from what asked for it (the gap event's id): the same after a crash."""
    return _hash(engine_id, reason, key)


def state_event_id(snapshot: str, kind: str, object_id: str) -> str:
    return _hash(snapshot, kind, object_id)


def _hash(*parts: str) -> str:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError, RecursionError):
        text = repr(type(value))
    return text[:_MAX_VALUE_CHARS]


def _strings(value: Any) -> dict[str, str]:
    """A map of strings from what the engine sent as one (null, or anything odd: empty)."""
    if not isinstance(value, dict):
        return {}
    return {_text(k): _text(v) for k, v in value.items()}


def _attributes(obj: Mapping[str, Any], fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name: _text(obj[key]) for key, name in fields if obj.get(key) not in (None, "")}


def _container(obj: Mapping[str, Any]) -> tuple[str, str | None, dict[str, str], str | None]:
    names = obj.get("Names")
    name = None
    if isinstance(names, list) and names and isinstance(names[0], str):
        # The API lists names with a leading "/"; events carry them without.
        name = names[0].removeprefix("/")
    attributes = _attributes(
        obj,
        (
            ("Image", "image"),
            ("ImageID", "imageID"),
            ("State", "state"),
            ("Status", "status"),
            ("Created", "created"),
        ),
    )
    if name is not None:
        attributes["name"] = name
    # The command line is left out: like an exec's, it can carry secrets.
    return _text(obj.get("Id", "")), name, attributes, None


def _volume(obj: Mapping[str, Any]) -> tuple[str, str | None, dict[str, str], str | None]:
    name = _text(obj.get("Name", ""))
    attributes = _attributes(
        obj, (("Driver", "driver"), ("Scope", "scope"), ("CreatedAt", "created"))
    )
    return name, name or None, attributes, _scope(obj)


def _network(obj: Mapping[str, Any]) -> tuple[str, str | None, dict[str, str], str | None]:
    name = obj.get("Name")
    attributes = _attributes(
        obj, (("Name", "name"), ("Driver", "type"), ("Scope", "scope"), ("Created", "created"))
    )
    return _text(obj.get("Id", "")), None if name is None else _text(name), attributes, _scope(obj)


def _image(obj: Mapping[str, Any]) -> tuple[str, str | None, dict[str, str], str | None]:
    tags = obj.get("RepoTags")
    tag_list = [_text(t) for t in tags] if isinstance(tags, list) else []
    name = next((t for t in tag_list if t and t != "<none>:<none>"), None)
    attributes = _attributes(obj, (("Size", "size"), ("Created", "created")))
    if name is not None:
        attributes["name"] = name
    if tag_list:
        attributes["tags"] = ",".join(tag_list)
    return _text(obj.get("Id", "")), name, attributes, None


def _scope(obj: Mapping[str, Any]) -> str | None:
    scope = obj.get("Scope")
    return scope if isinstance(scope, str) and scope else None


_CONVERT = {"container": _container, "volume": _volume, "network": _network, "image": _image}


def state_events(
    objects: Objects,
    *,
    engine: Engine,
    source: str,
    type_prefix: str,
    snapshot: str,
    reason: Reason,
) -> list[CloudEvent]:
    """One `<prefix>.<kind>.state` event per object, containers first, then volumes, networks
    and images. Whatever the engine answered, this returns: an entry that is not an object is
    skipped; labels and attributes become strings, as an event's do."""
    time = format_time(objects.time_nano)
    mark = Snapshot(id=snapshot, reason=reason)
    events: list[CloudEvent] = []
    lists: tuple[tuple[str, list[Any] | None], ...] = (
        ("container", objects.containers),
        ("volume", objects.volumes),
        ("network", objects.networks),
        ("image", objects.images),
    )
    for kind, items in lists:
        for obj in items or ():
            if not isinstance(obj, dict):
                continue
            object_id, name, attributes, scope = _CONVERT[kind](obj)
            labels = _strings(obj.get("Labels"))
            data = EventData(
                type=kind,
                action="state",
                scope=scope or "local",
                time=time,
                time_nano=objects.time_nano,
                actor=Actor(id=object_id, name=name, attributes=attributes, labels=labels),
                engine=engine,
                context=context_of(labels) if labels else None,
                snapshot=mark,
            )
            events.append(
                CloudEvent(
                    specversion="1.0",
                    datacontenttype="application/json",
                    dataschema=DATASCHEMA,
                    id=state_event_id(snapshot, kind, object_id),
                    source=source,
                    type=f"{type_prefix}.{kind}.state",
                    subject=name or object_id or None,
                    time=time,
                    data=data,
                )
            )
    return events


def end_event(
    *,
    engine: Engine,
    source: str,
    type_prefix: str,
    snapshot: str,
    reason: Reason,
    sink: str,
    counts: Mapping[str, int],
    time_nano: int,
) -> CloudEvent:
    """The marker that closes a snapshot for one sink: what that sink was sent, per kind."""
    time = format_time(time_nano)
    data = EventData(
        type="relay",
        action="snapshot_end",
        scope="local",
        time=time,
        time_nano=time_nano,
        actor=Actor(id=engine.id, attributes={}, labels={}),
        engine=engine,
        snapshot=Snapshot(id=snapshot, reason=reason, counts=dict(counts)),
    )
    return CloudEvent(
        specversion="1.0",
        datacontenttype="application/json",
        dataschema=DATASCHEMA,
        # Per sink: each marker counts what its sink was sent.
        id=_hash(snapshot, "end", sink),
        source=source,
        type=f"{type_prefix}.relay.snapshot_end",
        subject=engine.id,
        time=time,
        data=data,
    )


# -- the engine query --------------------------------------------------------------------------


# The engine's clock from its /info (relay.engine.engine_now, handed in: the reader's module
# depends on the settings, which depend on this one).
Clock = Callable[[Mapping[str, Any]], int]


async def query_objects(
    host: str | None, connect_timeout: float, images: bool, clock: Clock
) -> Objects:
    """The engine's containers (all, with their state), volumes, networks and, if asked,
    images, through the API the reader uses."""
    timeout = aiohttp.ClientTimeout(total=QUERY_TIMEOUT, sock_connect=connect_timeout)
    docker = aiodocker.Docker(url=host, timeout=timeout)
    try:
        info = await docker.system.info()
        # `containers.list` wraps each container in an object that is no mapping; the
        # conversion reads the engine's JSON, which the other three lists return as it is.
        containers = await docker._query_json("containers/json", params={"all": "1"})
        volumes = await docker.volumes.list()  # type: ignore[no-untyped-call]
        networks = await docker.networks.list()
        image_list = await docker.images.list() if images else None
    finally:
        with contextlib.suppress(Exception):
            await docker.close()
    volume_list = volumes.get("Volumes") if isinstance(volumes, dict) else None
    return Objects(
        time_nano=clock(info if isinstance(info, dict) else {}),
        containers=containers if isinstance(containers, list) else [],
        volumes=volume_list if isinstance(volume_list, list) else [],
        networks=networks if isinstance(networks, list) else [],
        images=image_list if isinstance(image_list, list) or image_list is None else [],
    )


# -- the component -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconcileTarget:
    """A sink that takes snapshots: its worker, its route filter (None: all), its settings."""

    name: str
    target: Target
    filter: RouteFilter | None
    settings: ReconcileSettings


@dataclass(slots=True)
class Pending:
    """A snapshot owed: its id, why, and to which sinks (by name)."""

    id: str
    reason: Reason
    sinks: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Taken:
    """A snapshot's events in order, each with the targets that owe it."""

    id: str
    events: list[tuple[Event, list[Target]]]


class QueryObjects:
    """The engine query, as the reconciler calls it (a test may pass another)."""

    def __init__(self, host: str | None, connect_timeout: float, clock: Clock) -> None:
        self.host = host
        self.connect_timeout = connect_timeout
        self.clock = clock

    async def __call__(self, images: bool) -> Objects:
        return await query_objects(self.host, self.connect_timeout, images, self.clock)


class Reconciler:
    """Owns the snapshot owed (in memory and in STATE_DIR/reconcile.json) and turns the
    engine's answer into events for the pipeline. The pipeline calls `gap` and `connected`
    as it emits, and `take` when `due`."""

    def __init__(
        self,
        targets: Sequence[ReconcileTarget],
        query: QueryObjects,
        metrics: Metrics,
        state_file: Path | None,
    ) -> None:
        self.targets = list(targets)
        self.query = query
        self.metrics = metrics
        self.state_file = state_file
        # Checked by the pipeline after each item it handles: the one cost when nothing is owed.
        self.due = False
        self.pending: Pending | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._on_gap = [t.name for t in self.targets if t.settings.on_gap]
        self._on_start = [t.name for t in self.targets if t.settings.on_start]

    def recover(self) -> None:
        """A snapshot owed from before a crash, taken at the first connection."""
        if self.state_file is None:
            return
        try:
            raw = json.loads(self.state_file.read_text())
            pending = Pending(str(raw["id"]), raw["reason"], [str(s) for s in raw["sinks"]])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "%s cannot be read (%s): the snapshot it owed is not taken", self.state_file, exc
            )
            return
        configured = {t.name for t in self.targets}
        pending.sinks = [s for s in pending.sinks if s in configured]
        if pending.reason not in ("gap", "start") or not pending.sinks:
            self._forget()
            return
        log.info("a snapshot (%s) was owed to %s before the restart", pending.id, pending.sinks)
        self.pending = pending

    def gap(self, engine_id: str, gap_event_id: str) -> None:
        """A gap was emitted (event `gap_event_id`): a snapshot for the on_gap sinks."""
        if self._on_gap:
            self._ask(snapshot_id(engine_id, "gap", gap_event_id), "gap", self._on_gap)

    def connected(self, engine_id: str, first: bool, engine_now: int) -> None:
        """A stream began; `first`: from an engine the relay had no position for."""
        if first and self._on_start:
            self._ask(snapshot_id(engine_id, "start", str(engine_now)), "start", self._on_start)
        elif self.pending is not None:
            self.due = True

    def _ask(self, id_: str, reason: Reason, sinks: list[str]) -> None:
        pending = self.pending
        if pending is not None:
            # One snapshot serves every sink that is owed one; the newest reason names it.
            sinks = [*pending.sinks, *(s for s in sinks if s not in pending.sinks)]
            if reason == "start" and pending.reason == "gap":
                id_, reason = pending.id, "gap"
        self.pending = Pending(id_, reason, sinks)
        self._store()
        self.due = True

    def _store(self) -> None:
        # Written and synced before the gap's event can reach the spool's next commit: a
        # snapshot owed is never forgotten by a crash. A gap is rare; the few ms are spent here.
        if self.state_file is None or self.pending is None:
            return
        body = json.dumps(
            {"id": self.pending.id, "reason": self.pending.reason, "sinks": self.pending.sinks}
        ).encode()
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.state_file)
            dir_fd = os.open(self.state_file.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.error(
                "cannot write %s (%s): the snapshot owed is not kept across a crash",
                self.state_file,
                exc,
            )

    def _forget(self) -> None:
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()

    async def take(self, engine: Engine, source: str, type_prefix: str) -> Taken | None:
        """The owed snapshot's events, each with its targets; None when the query failed (it
        stays owed until `committed`). Called by the pipeline when `due`."""
        self.due = False
        pending = self.pending
        if pending is None:
            return None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        sinks = [t for t in self.targets if t.name in pending.sinks]
        images = any(t.settings.images for t in sinks)
        started = time.monotonic()
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                objects = await self.query(images)
        except Exception as exc:
            self.metrics.snapshots.labels("failed").inc()
            log.warning(
                "the snapshot of the engine's objects failed (%s: %s): retried at the next "
                "connection, or in %.0fs",
                type(exc).__name__,
                exc,
                RETRY_AFTER,
            )
            self._retry = asyncio.get_running_loop().call_later(RETRY_AFTER, self._again)
            return None
        states = state_events(
            objects,
            engine=engine,
            source=source,
            type_prefix=type_prefix,
            snapshot=pending.id,
            reason=pending.reason,
        )
        out: list[tuple[Event, list[Target]]] = []
        counts = {t.name: dict.fromkeys(_kinds(t), 0) for t in sinks}
        for ce in states:
            event = Event(ce)
            kind = ce.data.type
            chosen = [
                t
                for t in sinks
                if (kind != "image" or t.settings.images)
                and (t.filter is None or t.filter.matches(event))
            ]
            for t in chosen:
                counts[t.name][kind] += 1
            if chosen:
                out.append((event, [t.target for t in chosen]))
        for t in sinks:
            end = end_event(
                engine=engine,
                source=source,
                type_prefix=type_prefix,
                snapshot=pending.id,
                reason=pending.reason,
                sink=t.name,
                counts=counts[t.name],
                time_nano=objects.time_nano,
            )
            out.append((Event(end), [t.target]))
        self.metrics.snapshots.labels("taken").inc()
        log.info(
            "snapshot %s (%s) taken in %.3fs: %s",
            pending.id,
            pending.reason,
            time.monotonic() - started,
            ", ".join(f"{t.name}: {counts[t.name]}" for t in sinks),
        )
        return Taken(pending.id, out)

    def committed(self, id_: str) -> None:
        """The spool committed snapshot `id_`'s events: it is no longer owed."""
        if self.pending is not None and self.pending.id == id_:
            self.pending = None
            self._forget()

    def _again(self) -> None:
        self._retry = None
        if self.pending is not None:
            self.due = True

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None


def _kinds(target: ReconcileTarget) -> tuple[str, ...]:
    return KINDS if target.settings.images else KINDS[:3]
