"""The relay against a real Podman service (Podman 4.3.1's Docker-compatible API), each test on a
private service (tests/harness/podman.py): the seed-style scenario, a SIGKILLed relay, a restarted
service, and the rotation of Podman's events file. The engine's own account of what happened is
its /events replay, read by the test through the same socket."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.identity import podman_id
from relay.normalize import event_id, since_param
from relay.router import RouteFilter
from sinks.stdout import StdoutSink
from tests.harness import PrivateEngine, async_wait_for
from tests.harness.podman import PrivatePodman
from tests.relay_harness import relay_settings, running_relay, spool_cursor, start_cli_relay

pytestmark = pytest.mark.integration

PODMAN_ATTRIBUTES = {"containerExitCode", "podId", "image", "name", "exitCode"}
PREFIX = "dev.docker-event-relay"


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def file_sink(path: Path) -> tuple[StdoutSink, RouteFilter]:
    return StdoutSink("stdout", 500, stream=open(path, "wb")), RouteFilter()


def ce_id(engine_uid: str, raw: dict[str, Any]) -> str:
    """The id the relay must give a raw Podman event: the actor is its name when ID is empty."""
    actor = raw["Actor"]["ID"] or raw["Actor"]["Attributes"].get("name", "")
    return event_id(engine_uid, raw["timeNano"], raw["Type"], raw["Action"], actor)


def now_since() -> str:
    # The test and Podman share one host, hence one clock.
    return since_param(time.time_ns())


async def engine_events(
    podman: PrivatePodman,
    since: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 60,  # noqa: ASYNC109 - a deadline, as in harness.wait
) -> list[dict[str, Any]]:
    """Podman's own replay from `since` (its /events; `until` answers nothing on 4.3.1), read
    until `done` says it holds what the test waits for."""
    events: list[dict[str, Any]] = []
    connector = aiohttp.UnixConnector(path=str(podman.socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get("http://podman/v1.41/events", params={"since": since}) as resp,
    ):
        try:
            async with asyncio.timeout(timeout):
                async for line in resp.content:
                    if line.strip():
                        events.append(json.loads(line))
                        if done(events):
                            return events
        except TimeoutError:
            pass
    raise AssertionError(f"Podman's replay from {since} never held what was expected: {events}")


def has_volume(name: str, action: str = "create") -> Callable[[list[dict[str, Any]]], bool]:
    def check(events: list[dict[str, Any]]) -> bool:
        return any(
            e["Type"] == "volume"
            and e["Action"] == action
            and e["Actor"]["Attributes"].get("name") == name
            for e in events
        )

    return check


async def expected_id(podman: PrivatePodman) -> str:
    connector = aiohttp.UnixConnector(path=str(podman.socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get("http://podman/v1.41/info") as resp,
    ):
        info = await resp.json()
    return podman_id(info)


def of_volumes(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["data"]["type"] == "volume" and e["data"]["actor"]["id"].startswith(prefix)
    ]


def gaps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"{PREFIX}.relay.gap"]


async def test_seed_scenario_types_actors_and_no_podman_attribute_among_labels(
    podman: PrivatePodman, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    tag = uuid.uuid4().hex[:8]
    uid = await expected_id(podman)
    assert uid == await expected_id(podman), "the derived id changes between /info calls"
    since = now_since()
    settings = relay_settings(podman.docker_host, tmp_path / "state")
    async with running_relay(settings, [file_sink(out)]) as relay:

        def run() -> None:
            ran = podman.cli(
                *("run", "--name", f"c-{tag}", "--network", "none", "--label", "app=web"),
                *("busybox:latest", "sh", "-c", "exit 3"),
                check=False,
            )
            assert ran.returncode == 3, ran.stderr
            podman.cli("rm", f"c-{tag}")
            podman.cli("volume", "create", f"v-{tag}")
            podman.cli("volume", "rm", f"v-{tag}")

        await asyncio.to_thread(run)
        reported = await engine_events(podman, since, has_volume(f"v-{tag}", "remove"))
        got = await async_wait_for(
            lambda: len(e := read_events(out)) >= len(reported) and e,
            timeout=30,
            message="every event Podman reported, in the relay's output",
        )
        assert relay.reader.connected
    # Everything, once, in the order Podman sent it, with the ids a replay would give again.
    assert [e["id"] for e in got] == [ce_id(uid, raw) for raw in reported]
    assert not gaps(got)
    container = [e for e in got if e["data"]["type"] == "container"]
    # Podman's own actions, kept as they are (no `destroy`, and `init`, `cleanup`, `remove`).
    assert [e["data"]["action"] for e in container] == [
        "create",
        "init",
        "start",
        "attach",
        "die",
        "cleanup",
        "remove",
    ]
    for e in container:
        actor = e["data"]["actor"]
        assert actor["name"] == f"c-{tag}" and len(actor["id"]) == 64
        assert actor["labels"] == {"app": "web"}, actor
        assert set(actor["attributes"]) <= PODMAN_ATTRIBUTES, actor
        assert e["type"] == f"{PREFIX}.container.{e['data']['action']}"
    die = next(e for e in container if e["data"]["action"] == "die")
    assert die["data"]["actor"]["attributes"]["exitCode"] == "3"
    assert die["data"]["actor"]["attributes"]["containerExitCode"] == "3"
    volume = [e for e in got if e["data"]["type"] == "volume"]
    assert [(e["type"], e["data"]["actor"]["id"], e["subject"]) for e in volume] == [
        (f"{PREFIX}.volume.create", f"v-{tag}", f"v-{tag}"),
        (f"{PREFIX}.volume.remove", f"v-{tag}", f"v-{tag}"),
    ]
    for e in got:
        assert e["source"] == f"urn:docker:engine:{uid}"
        assert e["data"]["engine"]["id"] == uid
        assert e["data"]["engine"]["version"] == "4.3.1"
        assert not (set(e["data"]["actor"]["labels"]) & PODMAN_ATTRIBUTES), e


def _relay_process(
    podman: PrivatePodman, state: Path, out: Path, err: Path
) -> subprocess.Popen[bytes]:
    return start_cli_relay(podman.env(), podman.docker_host, state, out, err)


async def _create_volumes(podman: PrivatePodman, names: list[str]) -> None:
    """Through the service's API, as many at once as a busy host's clients would."""
    connector = aiohttp.UnixConnector(path=str(podman.socket_path))
    async with aiohttp.ClientSession(connector=connector) as http:
        sem = asyncio.Semaphore(16)

        async def one(name: str) -> None:
            async with (
                sem,
                http.post("http://podman/v1.41/volumes/create", json={"Name": name}) as resp,
            ):
                assert resp.status == 201, await resp.text()

        await asyncio.gather(*(one(n) for n in names))


async def test_sigkill_then_300_volumes_are_all_delivered_once(
    podman: PrivatePodman, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    state = tmp_path / "state"
    out1, out2 = tmp_path / "out1.jsonl", tmp_path / "out2.jsonl"
    first = await asyncio.to_thread(_relay_process, podman, state, out1, tmp_path / "err1.log")
    try:
        await asyncio.to_thread(podman.cli, "volume", "create", f"a-{tag}")
        seen = await async_wait_for(
            lambda: of_volumes(read_events(out1), f"a-{tag}"),
            timeout=30,
            message="the first relay delivered its volume",
        )
        await async_wait_for(
            lambda: (
                (c := spool_cursor(state)) is not None
                and c["time_nano"] == seen[-1]["data"]["time_nano"]
            ),
            timeout=10,
            message="the spool's cursor caught up",
        )
    finally:
        first.kill()  # SIGKILL: no goodbye
        first.wait(10)

    names = [f"b-{tag}-{i:03d}" for i in range(300)]
    since = now_since()
    await _create_volumes(podman, names)
    reported = await engine_events(podman, since, lambda ev: len(ev) >= 300)

    second = await asyncio.to_thread(_relay_process, podman, state, out2, tmp_path / "err2.log")
    try:
        got = await async_wait_for(
            lambda: len(v := of_volumes(read_events(out2), f"b-{tag}")) >= 300 and v,
            timeout=120,
            message="the second relay delivered the 300 volumes",
        )
        await asyncio.to_thread(podman.cli, "volume", "create", f"c-{tag}")
        after = await async_wait_for(
            lambda: of_volumes(read_events(out2), f"c-{tag}") and read_events(out2),
            timeout=30,
            message="the second relay delivered a live event after the replay",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "err2.log").read_text()
    assert Counter(e["data"]["actor"]["id"] for e in got) == Counter(names)
    uid = await expected_id(podman)
    assert [e["id"] for e in of_volumes(after, f"b-{tag}")] == [ce_id(uid, r) for r in reported]
    assert not gaps(after), gaps(after)
    ids = [e["id"] for e in after]
    assert len(ids) == len(set(ids))
    assert not {e["id"] for e in read_events(out1)} & set(ids), "the first run's events again"


async def test_service_restart_sends_nothing_twice_under_new_ids(
    podman: PrivatePodman, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    tag = uuid.uuid4().hex[:8]
    since = now_since()
    settings = relay_settings(podman.docker_host, tmp_path / "state")
    async with running_relay(settings, [file_sink(out)]) as relay:

        def before() -> None:
            ran = podman.cli(
                *("run", "--name", f"c-{tag}", "--network", "none"),
                *("busybox:latest", "sh", "-c", "exit 1"),
                check=False,
            )
            assert ran.returncode == 1, ran.stderr
            for i in range(20):
                podman.cli("volume", "create", f"v-{tag}-a{i}")

        await asyncio.to_thread(before)
        await async_wait_for(
            lambda: len(of_volumes(read_events(out), f"v-{tag}-a")) == 20,
            timeout=30,
            message="the volumes before the restart",
        )
        await asyncio.to_thread(podman.stop)
        for i in range(20):  # the CLI still writes Podman's events file
            await asyncio.to_thread(podman.cli, "volume", "create", f"v-{tag}-b{i}")
        await asyncio.to_thread(podman.start)
        for i in range(20):
            await asyncio.to_thread(podman.cli, "volume", "create", f"v-{tag}-c{i}")
        reported = await engine_events(podman, since, has_volume(f"v-{tag}-c19"))
        got = await async_wait_for(
            lambda: has_volume_event(e := read_events(out), f"v-{tag}-c19") and e,
            timeout=60,
            message="the volumes after the restart",
        )
        reconnects = relay.metrics.registry.get_sample_value("relay_engine_reconnects_total")
        gap_count = relay.metrics.registry.get_sample_value("relay_replay_gaps_total")
    assert reconnects is not None and reconnects >= 1
    assert gap_count == 0
    uid = await expected_id(podman)
    ours = [e for e in got if e["data"]["type"] != "system"]
    theirs = [raw for raw in reported if raw["Type"] != "system"]
    # Each event once, with the id it had before the restart.
    assert [e["id"] for e in ours] == [ce_id(uid, raw) for raw in theirs]
    assert len({e["id"] for e in got}) == len(got)
    assert {e["source"] for e in got} == {f"urn:docker:engine:{uid}"}
    dies = [e for e in got if e["data"]["action"] == "die"]
    assert len(dies) == 1


def has_volume_event(events: list[dict[str, Any]], name: str) -> bool:
    return any(e["data"]["type"] == "volume" and e["data"]["actor"]["id"] == name for e in events)


# Small events files: Podman rotates its file at this size, keeping the newer half (about 50
# volume events here, 2 s of `podman volume create` in a loop). A live reader loses nothing as
# long as that half reaches back to what it last read when it reconnects: Podman polls its
# file every 250 ms and ends a `since` stream at a rotation, so a file that holds less than
# that (4000 bytes, measured) can rotate events away under a live reader too, a reported gap.
ROTATE_AT = 12000
ROTATE_TINY = 4000


async def test_rotation_while_reading_loses_nothing(
    podman_factory: Callable[..., PrivatePodman], tmp_path: Path
) -> None:
    """A stream opened with `since` ends at each rotation: the relay reconnects, resumes from
    its cursor (still in the file's newer half) and reports no gap, because there is none."""
    podman = podman_factory(events_logfile_max_size=ROTATE_AT)
    out = tmp_path / "out.jsonl"
    tag = uuid.uuid4().hex[:8]
    names = [f"v-{tag}-{i:03d}" for i in range(150)]
    settings = relay_settings(podman.docker_host, tmp_path / "state")
    async with running_relay(settings, [file_sink(out)]) as relay:
        for name in names:
            await asyncio.to_thread(podman.cli, "volume", "create", name)
        got = await async_wait_for(
            lambda: has_volume_event(e := read_events(out), names[-1]) and e,
            timeout=60,
            message="the last volume",
        )
        reconnects = relay.metrics.registry.get_sample_value("relay_engine_reconnects_total")
    assert reconnects is not None and reconnects >= 2, "the file did not rotate"
    rotations = [e for e in got if e["type"] == f"{PREFIX}.system.log-rotation"]
    assert rotations and rotations[0]["data"]["actor"]["id"] == str(podman.events_log)
    assert [e["data"]["actor"]["id"] for e in of_volumes(got, f"v-{tag}")] == names
    assert len({e["id"] for e in got}) == len(got)
    assert not gaps(got)


async def test_rotation_while_away_is_a_reported_gap(
    podman_factory: Callable[..., PrivatePodman], tmp_path: Path
) -> None:
    """Events rotated out of the file while the relay was down are lost: the relay says so
    (one gap event, the metric) and delivers, once each, what the file still holds."""
    podman = podman_factory(events_logfile_max_size=ROTATE_TINY)
    out1, out2 = tmp_path / "out1.jsonl", tmp_path / "out2.jsonl"
    tag = uuid.uuid4().hex[:8]
    state = tmp_path / "state"
    settings = relay_settings(podman.docker_host, state)
    async with running_relay(settings, [file_sink(out1)]):
        await asyncio.to_thread(podman.cli, "volume", "create", f"a-{tag}")
        first = await async_wait_for(
            lambda: of_volumes(read_events(out1), f"a-{tag}"), timeout=30, message="a-"
        )
    last_nano = first[-1]["data"]["time_nano"]
    names = [f"b-{tag}-{i:03d}" for i in range(120)]
    for name in names:
        await asyncio.to_thread(podman.cli, "volume", "create", name)
    # What Podman can still replay: the newest part of its file only.
    kept = await engine_events(podman, since_param(last_nano), has_volume(names[-1]))
    kept_names = [
        raw["Actor"]["Attributes"]["name"]
        for raw in kept
        if raw["Type"] == "volume" and raw["Actor"]["Attributes"]["name"].startswith(f"b-{tag}")
    ]
    assert kept_names and kept_names[0] != names[0], "the file did not rotate the start away"
    async with running_relay(settings, [file_sink(out2)]) as relay:
        got = await async_wait_for(
            lambda: has_volume_event(e := read_events(out2), names[-1]) and e,
            timeout=60,
            message="the last volume",
        )
        gap_count = relay.metrics.registry.get_sample_value("relay_replay_gaps_total")
    assert gap_count == 1
    assert got[0]["type"] == f"{PREFIX}.relay.gap"
    attributes = got[0]["data"]["actor"]["attributes"]
    assert int(attributes["since_nano"]) == last_nano
    assert int(attributes["resumed_at_nano"]) == kept[0]["timeNano"]
    assert len(gaps(got)) == 1
    assert [e["data"]["actor"]["id"] for e in of_volumes(got, f"b-{tag}")] == kept_names
    assert len({e["id"] for e in got}) == len(got)


async def test_a_pinned_engine_id_replaces_the_engines_own(
    engine: PrivateEngine, podman: PrivatePodman, tmp_path: Path
) -> None:
    """`engine.id` wins on Docker as on Podman: `source`, `data.engine.id` and the event ids."""
    for host, make in (
        (engine.docker_host, lambda name: engine.cli("volume", "create", name)),
        (podman.docker_host, lambda name: podman.cli("volume", "create", name)),
    ):
        pin = f"pinned-{uuid.uuid4().hex[:8]}"
        out = tmp_path / f"{pin}.jsonl"
        settings = relay_settings(host, tmp_path / pin, engine={"host": host, "id": pin})
        async with running_relay(settings, [file_sink(out)]):
            await asyncio.to_thread(make, pin)
            got = await async_wait_for(
                lambda out=out, pin=pin: of_volumes(read_events(out), pin),
                timeout=30,
                message=pin,
            )
        assert [(e["source"], e["data"]["engine"]["id"]) for e in got] == [
            (f"urn:docker:engine:{pin}", pin)
        ]
        data = got[0]["data"]
        assert got[0]["id"] == event_id(pin, data["time_nano"], "volume", "create", pin)
        assert spool_cursor(tmp_path / pin)["engine_id"] == pin  # type: ignore[index]
