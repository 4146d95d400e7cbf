"""Reconcile after a gap, against a real engine: after a restart of the engine while the relay
was down (the engine's replay starts empty: a gap), the sinks with `reconcile` receive a
snapshot of the engine's objects that matches `docker ps -a`, `docker volume ls` and
`docker network ls`, closed by a marker whose counts match; a sink without `reconcile` receives
none of it. And the snapshot of a first start (`on_start`)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from relay.reconcile import ReconcileSettings
from relay.router import RouteFilter
from relay.schema import Event
from tests.harness import PrivateEngine, async_wait_for
from tests.relay_harness import Recorder, relay_settings, running_relay
from tests.scenarios import ensure_busybox

PREFIX = "dev.docker-event-relay"
HOSTILE = 'x\n"}{=\u202e$(id)\r'


def recorder(name: str, reconcile: ReconcileSettings | None = None) -> Recorder:
    sink = Recorder(name)
    if reconcile is not None:
        sink.reconcile = reconcile
    return sink


def ends(sink: Recorder) -> list[Event]:
    return [e for e in sink.events if e.ce.type == f"{PREFIX}.relay.snapshot_end"]


def snapshot_of(sink: Recorder, snapshot_id: str) -> list[Event]:
    return [
        e
        for e in sink.events
        if e.ce.data.snapshot is not None and e.ce.data.snapshot.id == snapshot_id
    ]


def engine_objects(engine: PrivateEngine) -> dict[str, dict[str, str]]:
    """What the docker CLI lists: container id -> "name state", volume name -> driver, network
    id -> name."""
    ps = engine.cli("ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}} {{.State}}")
    volumes = engine.cli("volume", "ls", "--format", "{{.Name}} {{.Driver}}")
    networks = engine.cli("network", "ls", "--no-trunc", "--format", "{{.ID}} {{.Name}}")
    out: dict[str, dict[str, str]] = {}
    for kind, listing in (("container", ps), ("volume", volumes), ("network", networks)):
        rows = [line.split(" ", 1) for line in listing.stdout.splitlines() if line.strip()]
        out[kind] = {key: rest for key, rest in rows}
    return out


def received_objects(events: list[Event]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {"container": {}, "volume": {}, "network": {}}
    for e in events:
        data = e.ce.data
        attrs = data.actor.attributes
        if data.type == "container":
            out["container"][data.actor.id] = f"{data.actor.name} {attrs['state']}"
        elif data.type == "volume":
            out["volume"][data.actor.id] = attrs["driver"]
        elif data.type == "network":
            out["network"][data.actor.id] = str(data.actor.name)
    return out


def check_snapshot(sink: Recorder, end: Event, reason: str) -> list[Event]:
    """The snapshot `end` closes, as `sink` received it: complete, consistent, in order."""
    assert end.ce.data.snapshot is not None
    snapshot = end.ce.data.snapshot
    events = snapshot_of(sink, snapshot.id)
    assert events[-1] is end, "the marker closes the snapshot"
    states = events[:-1]
    assert {e.ce.type for e in states} <= {f"{PREFIX}.{k}.state" for k in snapshot.counts or {}}
    counts = {kind: 0 for kind in ("container", "volume", "network")}
    for e in states:
        counts[e.ce.data.type] += 1
        assert e.ce.data.snapshot is not None and e.ce.data.snapshot.reason == reason
    assert snapshot.counts == counts
    assert len({e.id for e in events}) == len(events)
    # Nothing else came in between: the snapshot is one run of the sink's stream.
    first = sink.events.index(states[0] if states else end)
    assert sink.events[first : sink.events.index(end) + 1] == events
    return states


async def test_a_gap_after_an_engine_restart_is_followed_by_a_snapshot(
    engine_fresh: PrivateEngine, tmp_path: Path
) -> None:
    engine = engine_fresh
    tag = uuid.uuid4().hex[:8]
    await asyncio.to_thread(ensure_busybox, engine)
    settings = relay_settings(engine.docker_host, tmp_path / "state")

    def first_objects() -> None:
        engine.cli("volume", "create", f"before-{tag}")
        engine.cli("create", "--name", f"kept-{tag}", "--network", "none", "busybox", "true")

    reconciling = recorder("reconciling", ReconcileSettings(on_gap=True))
    plain = recorder("plain")
    async with running_relay(settings, [(reconciling, RouteFilter()), (plain, RouteFilter())]):
        await asyncio.to_thread(first_objects)
        await async_wait_for(lambda: any(e.ce.subject == f"kept-{tag}" for e in plain.events), 30)
    assert not ends(reconciling), "no gap, no snapshot"

    def while_the_relay_is_down() -> None:
        # Restarted: the engine's replay starts empty, so the relay cannot see what follows.
        engine.restart()
        for name in ("a", "b", "c"):
            engine.cli("create", "--name", f"{name}-{tag}", "--network", "none", "busybox", "true")
        engine.cli("start", f"c-{tag}")
        engine.cli("rm", f"a-{tag}")
        engine.cli("rm", f"kept-{tag}")
        for name in ("v1", "v2"):
            engine.cli("volume", "create", "--label", f"owner={tag}", f"{name}-{tag}")
        engine.cli("volume", "rm", f"v1-{tag}")
        engine.cli("network", "create", "--internal", f"net-{tag}")

    await asyncio.to_thread(while_the_relay_is_down)
    reconciling, plain = recorder("reconciling", ReconcileSettings(on_gap=True)), recorder("plain")
    async with running_relay(
        settings, [(reconciling, RouteFilter()), (plain, RouteFilter())]
    ) as relay:
        (end,) = await async_wait_for(lambda: ends(reconciling), 60, message="snapshot end")
        listed = await asyncio.to_thread(engine_objects, engine)
        assert (
            relay.metrics.registry.get_sample_value("relay_snapshots_total", {"outcome": "taken"})
            == 1
        )
        # The live stream goes on after the snapshot, to both sinks.
        await asyncio.to_thread(engine.cli, "volume", "create", f"after-{tag}")
        await async_wait_for(
            lambda: all(
                any(e.ce.subject == f"after-{tag}" for e in s.events) for s in (reconciling, plain)
            ),
            30,
        )

    states = check_snapshot(reconciling, end, "gap")
    assert received_objects(states) == listed
    containers = received_objects(states)["container"]
    assert sorted(v for v in containers.values() if tag in v) == [
        f"b-{tag} created",
        f"c-{tag} exited",
    ]
    assert f"v2-{tag}" in listed["volume"] and f"v1-{tag}" not in listed["volume"]
    volume = next(e for e in states if e.ce.data.actor.id == f"v2-{tag}")
    assert volume.ce.data.actor.labels == {"owner": tag}
    assert f"net-{tag}" in listed["network"].values()
    # In order with the stream: the gap, then what the engine replayed, the snapshot, the rest.
    types = [e.ce.type for e in reconciling.events]
    gap = types.index(f"{PREFIX}.relay.gap")
    first_state = reconciling.events.index(states[0])
    after = next(i for i, e in enumerate(reconciling.events) if e.ce.subject == f"after-{tag}")
    assert gap < first_state < reconciling.events.index(end) < after
    # The snapshot follows every event read before it: the replay after the restart.
    replayed = {e.ce.subject for e in reconciling.events[gap:first_state]}
    assert {f"a-{tag}", f"b-{tag}", f"c-{tag}", f"v2-{tag}"} <= replayed
    # The sink without reconcile: the same stream, without the snapshot.
    assert not [e for e in plain.events if e.ce.data.snapshot is not None]
    without = [e.id for e in reconciling.events if e.ce.data.snapshot is None]
    assert [e.id for e in plain.events] == without
    # Taken, committed: nothing owed any more.
    assert not (tmp_path / "state" / "reconcile.json").exists()


async def test_on_start_snapshots_the_engine_once_with_filters_and_images(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    await asyncio.to_thread(ensure_busybox, engine)

    made: list[str] = []

    def objects() -> None:
        engine.cli("volume", "create", "--label", f"team={tag}", "--label", HOSTILE, f"mine-{tag}")
        engine.cli("volume", "create", f"theirs-{tag}")
        # A dangling image (its tag moved to a newer commit): listed by the engine as any other.
        engine.cli("create", "--name", f"img-{tag}", "--network", "none", "busybox", "true")
        for _ in range(2):
            made.append(engine.cli("commit", f"img-{tag}", f"relay-reconcile-{tag}:x").stdout)

    await asyncio.to_thread(objects)
    settings = relay_settings(engine.docker_host, tmp_path / "state")
    everything = recorder("everything", ReconcileSettings(on_start=True, images=True))
    team = recorder("team", ReconcileSettings(on_start=True))
    gap_only = recorder("gap-only", ReconcileSettings(on_gap=True))
    sinks = [
        (everything, RouteFilter()),
        (team, RouteFilter(labels={"team": tag})),
        (gap_only, RouteFilter()),
    ]
    async with running_relay(settings, sinks):
        (end,) = await async_wait_for(lambda: ends(everything), 60, message="snapshot end")
        (team_end,) = await async_wait_for(lambda: ends(team), 30, message="team's end")
        listed = await asyncio.to_thread(engine_objects, engine)
        images = await asyncio.to_thread(engine.cli, "images", "-q", "--no-trunc")
        dangling = await asyncio.to_thread(
            engine.cli, "images", "-q", "--no-trunc", "--filter", "dangling=true"
        )

    def remove_image_objects() -> None:
        engine.cli("rm", f"img-{tag}")
        engine.cli("rmi", *(image.strip() for image in made))

    await asyncio.to_thread(remove_image_objects)
    assert not ends(gap_only) and not [e for e in gap_only.events if e.ce.data.snapshot]
    assert end.ce.data.snapshot is not None and end.ce.data.snapshot.counts is not None
    states = snapshot_of(everything, end.ce.data.snapshot.id)[:-1]
    image_ids = {e.ce.data.actor.id for e in states if e.ce.data.type == "image"}
    assert image_ids == set(images.stdout.split())
    assert made[0].strip() in set(dangling.stdout.split()) & image_ids, "a dangling image"
    assert end.ce.data.snapshot.counts["image"] == len(image_ids) > 0
    without_images = [e for e in states if e.ce.data.type != "image"]
    assert received_objects(without_images) == listed
    # The team's sink: its route filter holds for snapshots too, and its marker counts that.
    team_states = snapshot_of(team, end.ce.data.snapshot.id)
    assert [e.ce.data.actor.id for e in team_states[:-1]] == [f"mine-{tag}"]
    # A hostile label arrives as the engine has it, inside the JSON string, nothing more.
    assert team_states[0].ce.data.actor.labels == {"team": tag, 'x\n"}{': "\u202e$(id)\r"}
    assert team_states[-1] is team_end and team_end.ce.data.snapshot is not None
    assert team_end.ce.data.snapshot.counts == {"container": 0, "volume": 1, "network": 0}
    assert team_end.id != end.id
