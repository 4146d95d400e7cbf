"""Reconcile after a gap, the pure parts: engine API objects -> state events (hostile names and
labels included), the settings' forms, and the reconciler's bookkeeping (what is owed, to whom,
kept across a crash in reconcile.json, retried after a failed query). The query is a stand-in
here; tests/integration/test_reconcile.py takes real snapshots of a real engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pydantic import ValidationError

from relay.metrics import Metrics
from relay.reconcile import (
    Objects,
    QueryObjects,
    Reconciler,
    ReconcileSettings,
    ReconcileTarget,
    end_event,
    state_events,
)
from relay.redact import RedactSettings
from relay.router import RouteFilter
from relay.schema import CloudEvent, Engine, Event
from relay.settings import SchemaSettings

ENGINE = Engine(id="ENGINE-ID", name="host", version="20.10.24", api_version="1.41")
T0 = 1_700_000_000_123_456_789

# As Docker 20.10 answers GET /containers/json?all=1, /volumes, /networks, /images/json.
CONTAINER = {
    "Id": "c0ffee" * 10 + "abcd",
    "Names": ["/web-1"],
    "Image": "busybox:latest",
    "ImageID": "sha256:" + "1" * 64,
    "Command": "sh -c 'echo password=hunter2'",
    "Created": 1700000000,
    "Ports": [],
    "Labels": {"com.docker.compose.project": "shop", "com.docker.compose.service": "web"},
    "State": "exited",
    "Status": "Exited (0) 3 seconds ago",
    "HostConfig": {"NetworkMode": "none"},
    "NetworkSettings": {"Networks": {}},
    "Mounts": [],
}
VOLUME = {
    "CreatedAt": "2024-01-01T00:00:00Z",
    "Driver": "local",
    "Labels": None,
    "Mountpoint": "/var/lib/docker/volumes/data/_data",
    "Name": "data",
    "Options": None,
    "Scope": "local",
}
NETWORK = {
    "Name": "none",
    "Id": "n" * 64,
    "Created": "2024-01-01T00:00:00.000000000Z",
    "Scope": "local",
    "Driver": "null",
    "Labels": {},
}
IMAGE = {
    "Id": "sha256:" + "1" * 64,
    "RepoTags": ["busybox:latest", "busybox:1"],
    "Created": 1700000000,
    "Size": 1234,
    "Labels": None,
}


def objects(**kw: Any) -> Objects:
    values: dict[str, Any] = {
        "time_nano": T0,
        "containers": [CONTAINER],
        "volumes": [VOLUME],
        "networks": [NETWORK],
        "images": None,
    }
    values.update(kw)
    return Objects(**values)


def convert(objs: Objects, snapshot: str = "S1") -> list[CloudEvent]:
    return state_events(
        objs,
        engine=ENGINE,
        source="urn:docker:engine:ENGINE-ID",
        type_prefix="dev.docker-event-relay",
        snapshot=snapshot,
        reason="gap",
    )


def test_api_objects_become_state_events_in_order() -> None:
    events = convert(objects(images=[IMAGE]))
    assert [e.type for e in events] == [
        "dev.docker-event-relay.container.state",
        "dev.docker-event-relay.volume.state",
        "dev.docker-event-relay.network.state",
        "dev.docker-event-relay.image.state",
    ]
    container, volume, network, image = (e.data for e in events)
    assert container.actor.id == CONTAINER["Id"] and container.actor.name == "web-1"
    assert container.actor.attributes == {
        "name": "web-1",
        "image": "busybox:latest",
        "imageID": "sha256:" + "1" * 64,
        "state": "exited",
        "status": "Exited (0) 3 seconds ago",
        "created": "1700000000",
    }
    # Labels apart, context from them, as for an event; the command line is never carried.
    assert container.actor.labels == CONTAINER["Labels"]
    assert container.context is not None and container.context.compose is not None
    assert container.context.compose.project == "shop"
    assert b"hunter2" not in b"".join(Event(e).json() for e in events)
    assert events[0].subject == "web-1"
    assert volume.actor.id == volume.actor.name == "data" and volume.actor.labels == {}
    assert volume.actor.attributes == {
        "driver": "local",
        "scope": "local",
        "created": "2024-01-01T00:00:00Z",
    }
    assert network.actor.attributes["type"] == "null" and network.actor.name == "none"
    assert image.actor.name == "busybox:latest"
    assert image.actor.attributes["tags"] == "busybox:latest,busybox:1"
    assert image.actor.attributes["size"] == "1234"
    for data in (container, volume, network, image):
        assert data.action == "state" and data.time_nano == T0
        assert data.time == "2023-11-14T22:13:20.123456789Z"
        assert data.snapshot is not None and data.snapshot.id == "S1"
        assert data.snapshot.reason == "gap" and data.snapshot.counts is None
        assert data.engine == ENGINE


def test_ids_are_per_snapshot_and_object_and_stable() -> None:
    first, again, other = (
        convert(objects()),
        convert(objects(time_nano=T0 + 5)),
        convert(objects(), snapshot="S2"),
    )
    assert [e.id for e in first] == [e.id for e in again], "a snapshot re-taken: the same ids"
    assert not {e.id for e in first} & {e.id for e in other}
    assert len({e.id for e in first}) == 3


HOSTILE = "x\n\r\x00\u202e/../#+$\"'{{ data.type }}%s😀"


def test_hostile_names_labels_and_odd_answers_never_crash() -> None:
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    weird = {
        "Id": HOSTILE,
        "Names": [f"/{HOSTILE}"],
        "State": {"not": "a string"},
        "Labels": {HOSTILE: HOSTILE, "n": 5, "deep": nested, "null": None},
    }
    events = convert(
        objects(
            containers=[weird, "not an object", None, {"Names": "not a list"}],
            volumes=[{"Name": 7, "Labels": ["not", "a", "map"]}],
            networks=[{}],
        )
    )
    assert [e.data.type for e in events] == ["container", "container", "volume", "network"]
    data = events[0].data
    assert data.actor.name == HOSTILE and data.actor.labels[HOSTILE] == HOSTILE
    assert data.actor.labels["n"] == "5" and data.actor.labels["null"] == "null"
    assert data.actor.attributes["state"] == '{"not":"a string"}'
    assert all(isinstance(v, str) for v in data.actor.labels.values())
    assert events[2].data.actor.id == "7" and events[2].data.actor.labels == {}
    for event in events:
        # Encodes, and decodes back to the same thing: nothing escaped the JSON string.
        body = Event(event).json()
        assert msgspec.json.decode(body, type=CloudEvent) == event


def test_redaction_applies_to_state_events() -> None:
    event = Event(
        convert(objects(containers=[{**CONTAINER, "Labels": {"secret.token": "s3cr3t"}}]))[0]
    )
    redaction = RedactSettings(drop=["labels.secret.*"]).compile("program", "program")
    assert redaction is not None
    (out,) = redaction.batch([event])
    assert b"s3cr3t" not in out.json() and b"s3cr3t" not in out.data_json()
    assert out.ce.data.snapshot == event.ce.data.snapshot


def test_the_end_marker() -> None:
    ce = end_event(
        engine=ENGINE,
        source="urn:docker:engine:ENGINE-ID",
        type_prefix="p",
        snapshot="S1",
        reason="start",
        sink="kafka",
        counts={"container": 2, "volume": 0},
        time_nano=T0,
    )
    assert ce.type == "p.relay.snapshot_end" and ce.data.type == "relay"
    assert ce.data.snapshot is not None and ce.data.snapshot.counts == {"container": 2, "volume": 0}
    assert ce.data.snapshot.reason == "start"


@pytest.mark.parametrize(
    ("given", "want"),
    [
        (True, ReconcileSettings(on_gap=True)),
        (False, ReconcileSettings()),
        ({"on_start": True, "images": True}, ReconcileSettings(on_start=True, images=True)),
    ],
)
def test_settings_forms(given: Any, want: ReconcileSettings) -> None:
    assert ReconcileSettings.model_validate(given) == want


def test_settings_refuse_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        ReconcileSettings.model_validate({"on_gaps": True})


# -- the reconciler, with a stand-in for the engine query ---------------------------------------


class Target:
    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.got: list[Event] = []

    def put(self, event: Event) -> None:
        self.got.append(event)


class Query(QueryObjects):
    def __init__(self, answers: list[Objects | Exception]) -> None:
        super().__init__(None, 1.0, lambda info: T0)
        self.answers = answers
        self.images: list[bool] = []

    async def __call__(self, images: bool) -> Objects:
        self.images.append(images)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def reconciler(
    tmp_path: Path, query: Query, *targets: ReconcileTarget, metrics: Metrics | None = None
) -> Reconciler:
    return Reconciler(targets, query, metrics or Metrics(), tmp_path / "reconcile.json")


def take(r: Reconciler) -> Any:
    prefix = SchemaSettings().type_prefix
    return asyncio.run(r.take(ENGINE, "urn:docker:engine:ENGINE-ID", prefix))


def test_a_gap_is_owed_durably_until_committed(tmp_path: Path) -> None:
    all_, tenant = Target(1), Target(2)
    query = Query([objects(images=[IMAGE])])
    r = reconciler(
        tmp_path,
        query,
        ReconcileTarget("all", all_, None, ReconcileSettings(on_gap=True, images=True)),
        ReconcileTarget(
            "tenant",
            tenant,
            RouteFilter(labels={"com.docker.compose.project": "shop"}),
            ReconcileSettings(on_gap=True),
        ),
        ReconcileTarget("starts", Target(4), None, ReconcileSettings(on_start=True)),
    )
    r.connected("ENGINE-ID", first=False, engine_now=T0)
    assert not r.due
    r.gap("ENGINE-ID", "gap-event-id")
    assert r.due
    stored = json.loads((tmp_path / "reconcile.json").read_text())
    assert stored["reason"] == "gap" and stored["sinks"] == ["all", "tenant"]
    taken = take(r)
    assert query.images == [True]
    kinds = [(e.ce.data.type, [t.bit for t in targets]) for e, targets in taken.events]
    assert kinds == [
        ("container", [1, 2]),  # the tenant's filter passes the shop container only
        ("volume", [1]),
        ("network", [1]),
        ("image", [1]),  # images only where asked
        ("relay", [1]),
        ("relay", [2]),
    ]
    ends = [e.ce.data.snapshot for e, _ in taken.events[-2:]]
    assert [s.counts for s in ends if s is not None] == [
        {"container": 1, "volume": 1, "network": 1, "image": 1},
        {"container": 1, "volume": 0, "network": 0},
    ]
    assert len({e.ce.data.snapshot.id for e, _ in taken.events if e.ce.data.snapshot}) == 1
    assert (tmp_path / "reconcile.json").exists(), "owed until the spool committed it"
    r.committed(taken.id)
    assert not (tmp_path / "reconcile.json").exists() and r.pending is None


def test_a_snapshot_owed_before_a_crash_is_taken_after_it_with_the_same_ids(
    tmp_path: Path,
) -> None:
    settings = ReconcileSettings(on_gap=True)
    first = reconciler(
        tmp_path, Query([objects()]), ReconcileTarget("a", Target(1), None, settings)
    )
    first.gap("ENGINE-ID", "gap-event-id")
    before = take(first)  # handed on, then SIGKILL before the commit: the file stays
    second = reconciler(
        tmp_path,
        Query([objects(time_nano=T0 + 10**9)]),
        ReconcileTarget("a", Target(1), None, settings),
    )
    second.recover()
    assert second.pending is not None and not second.due
    second.connected("ENGINE-ID", first=False, engine_now=T0)
    assert second.due
    after = take(second)
    assert [e.id for e, _ in after.events] == [e.id for e, _ in before.events]


def test_a_failed_query_is_counted_and_retried_at_the_next_connection(tmp_path: Path) -> None:
    metrics = Metrics()
    query = Query([ConnectionRefusedError("engine gone"), objects()])
    r = reconciler(
        tmp_path,
        query,
        ReconcileTarget("a", Target(1), None, ReconcileSettings(on_gap=True)),
        metrics=metrics,
    )
    r.gap("ENGINE-ID", "g")
    assert take(r) is None
    assert metrics.registry.get_sample_value("relay_snapshots_total", {"outcome": "failed"}) == 1
    assert r.pending is not None and not r.due
    r.connected("ENGINE-ID", first=False, engine_now=T0)
    assert r.due and take(r) is not None
    assert metrics.registry.get_sample_value("relay_snapshots_total", {"outcome": "taken"}) == 1


def test_on_start_only_for_an_engine_without_a_position(tmp_path: Path) -> None:
    gap_only = ReconcileTarget("g", Target(1), None, ReconcileSettings(on_gap=True))
    start = ReconcileTarget("s", Target(2), None, ReconcileSettings(on_start=True))
    r = reconciler(tmp_path, Query([objects()]), gap_only, start)
    r.connected("ENGINE-ID", first=True, engine_now=T0)
    assert r.due and r.pending is not None and r.pending.sinks == ["s"]
    assert r.pending.reason == "start"
    # A gap before it was taken: one snapshot serves both.
    r.gap("ENGINE-ID", "g")
    assert r.pending.sinks == ["s", "g"] and r.pending.reason == "gap"
    taken = take(r)
    assert {t.bit for _, targets in taken.events for t in targets} == {1, 2}
