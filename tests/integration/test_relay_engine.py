"""The relay end to end against real engines (20.10 / API 1.41 and 28.5 / API 1.51), with the
stdout sink writing to a real file."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from relay.normalize import event_id
from relay.router import RouteFilter
from sinks.stdout import StdoutSink
from tests.harness import PrivateEngine, async_wait_for, wait_for
from tests.harness.engine import docker_cli_path
from tests.relay_harness import (
    RelayThread,
    relay_settings,
    running_relay,
    spool_cursor,
    start_cli_relay,
)
from tests.scenarios import (
    PRUNED_TYPES,
    create_volumes,
    engine_events,
    engine_id,
    engine_time,
    prune_scenario,
)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def actor_is(name: str) -> Any:
    return lambda e: e["data"]["actor"]["id"] == name


def events_once(path: Path, predicate: Any) -> Any:
    """For wait_for: all events of `path` once one satisfies `predicate`, else None."""

    def check() -> list[dict[str, Any]] | None:
        events = read_events(path)
        return events if any(predicate(e) for e in events) else None

    return check


def file_sink(path: Path) -> tuple[StdoutSink, RouteFilter]:
    return StdoutSink("stdout", 500, stream=open(path, "wb")), RouteFilter()


def ce_id(engine_uid: str, raw: dict[str, Any]) -> str:
    return event_id(engine_uid, raw["timeNano"], raw["Type"], raw["Action"], raw["Actor"]["ID"])


async def test_prune_scenario_reclaimed_bytes(engine: PrivateEngine, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    settings = relay_settings(engine.docker_host, tmp_path / "state")
    async with running_relay(settings, [file_sink(out)]):
        reported = await asyncio.to_thread(prune_scenario, engine)
        prunes = await async_wait_for(
            lambda: (
                len(p := [e for e in read_events(out) if e["data"]["action"] == "prune"]) >= 5 and p
            ),
            timeout=30,
            message="five prune events in the relay's output",
        )
    assert sorted(e["data"]["type"] for e in prunes) == sorted(PRUNED_TYPES)
    got = {e["data"]["type"]: e["data"]["reclaimed_bytes"] for e in prunes}
    assert got == reported
    # At least what the scenario wrote (a shared engine may hold more from other tests).
    assert got["container"] >= 5 * 1024 * 1024 and got["volume"] >= 5 * 1024 * 1024
    for e in prunes:
        assert e["type"] == f"dev.docker-event-relay.{e['data']['type']}.prune"
        assert e["data"]["engine"]["api_version"] == engine.api_version
        assert e["data"]["engine"]["version"] == engine.version


async def test_burst_of_5000_volumes_every_event_once_in_engine_order(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"burst-{tag}-{i:04d}" for i in range(5000)]
    out = tmp_path / "out.jsonl"
    uid = engine_id(engine)
    since = engine_time(engine)
    # The engine's own account: a second, independent subscriber (the docker CLI). Blocking
    # calls in this async test are fine: the relay runs on its own thread and loop.
    witness_out = open(tmp_path / "witness.jsonl", "wb")  # noqa: ASYNC230
    witness = subprocess.Popen(  # noqa: ASYNC220
        [
            docker_cli_path(),
            "events",
            "--since",
            since,
            "--filter",
            "type=volume",
            "--format",
            "{{json .}}",
        ],
        stdout=witness_out,
        env=engine.env(),
    )
    try:
        settings = relay_settings(engine.docker_host, tmp_path / "state")
        async with running_relay(settings, [file_sink(out)]):
            await asyncio.to_thread(create_volumes, engine, names, tag)
            prune_args = ["volume", "prune", "-f", "--filter", f"label=burst={tag}"]
            if tuple(map(int, engine.api_version.split("."))) >= (1, 42):
                prune_args.insert(3, "--all")  # named volumes too, on newer engines
            pruned = await asyncio.to_thread(engine.cli, *prune_args)
            assert "Total reclaimed space" in pruned.stdout

            def relay_prunes() -> bool:
                return any(
                    e["data"]["action"] == "prune"
                    and e["data"]["type"] == "volume"
                    and e["data"]["time_nano"] > int(float(since) * 1e9)
                    for e in read_events(out)
                )

            await async_wait_for(relay_prunes, timeout=60, message="the relay saw the prune")
            await async_wait_for(
                lambda: b'"Action":"prune"' in (tmp_path / "witness.jsonl").read_bytes(),
                timeout=60,
                message="docker events saw the prune",
            )
    finally:
        witness.terminate()
        witness.wait(10)
        witness_out.close()

    def ours(raw_actor: str, action: str) -> bool:
        return raw_actor.startswith(f"burst-{tag}-") or action == "prune"

    expected = [
        ce_id(uid, raw)
        for raw in read_events(tmp_path / "witness.jsonl")
        if ours(raw["Actor"]["ID"], raw["Action"])
    ]
    got_events = [
        e
        for e in read_events(out)
        if e["data"]["type"] == "volume" and ours(e["data"]["actor"]["id"], e["data"]["action"])
    ]
    got = [e["id"] for e in got_events]
    creates = [e for e in got_events if e["data"]["action"] == "create"]
    assert len(creates) == 5000
    assert sorted(e["data"]["actor"]["id"] for e in creates) == names
    assert len(set(got)) == len(got), "an event came out twice"
    # The engine hands each event to each subscriber from its own goroutine: two subscribers
    # can see neighbours in a different order, and neither stream is strictly time-ordered.
    # Same events, once each; the relay's order is the engine's (any inversion is the
    # engine's few-ms jitter, not a reordering); the prune comes after every create.
    assert sorted(got) == sorted(expected), "the relay's events differ from the engine's account"
    times = [e["data"]["time_nano"] for e in got_events]
    assert max(a - b for a, b in itertools.pairwise(times)) < 50_000_000
    assert (
        got_events[-1]["data"]["action"] == "prune" or got_events[-1]["data"]["action"] == "destroy"
    )
    last_create = max(i for i, e in enumerate(got_events) if e["data"]["action"] == "create")
    prune_at = next(i for i, e in enumerate(got_events) if e["data"]["action"] == "prune")
    assert prune_at > last_create


def _start_cli_relay(
    engine: PrivateEngine, state: Path, out: Path, err: Path
) -> subprocess.Popen[bytes]:
    return start_cli_relay(
        engine.env(),
        engine.docker_host,
        state,
        out,
        err,
        RELAY_ENGINE__FILTERS=json.dumps({"type": ["volume"]}),
    )


def test_restart_resumes_from_the_spool_cursor_without_duplicates(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    state = tmp_path / "state"
    uid = engine_id(engine)
    first = _start_cli_relay(engine, state, tmp_path / "out1.jsonl", tmp_path / "err1.log")
    for i in range(20):
        engine.cli("volume", "create", f"a-{tag}-{i}")
    seen_a = wait_for(
        lambda: (
            len(
                ev := [
                    e
                    for e in read_events(tmp_path / "out1.jsonl")
                    if e["data"]["actor"]["id"].startswith(f"a-{tag}")
                ]
            )
            == 20
            and ev
        ),
        timeout=30,
        message="first run delivered the a-volumes",
    )
    wait_for(
        lambda: (
            (cursor := spool_cursor(state)) is not None
            and cursor["time_nano"] == seen_a[-1]["data"]["time_nano"]
        ),
        timeout=10,
        message="the spool's cursor caught up",
    )
    first.kill()  # no goodbye: SIGKILL mid-stream
    first.wait(10)

    since = engine_time(engine)
    gap_names = [f"b-{tag}-{i}" for i in range(30)]
    for name in gap_names:
        engine.cli("volume", "create", name)
    for name in gap_names[:10]:
        engine.cli("volume", "rm", name)
    until = engine_time(engine)
    in_gap = [ce_id(uid, raw) for raw in engine_events(engine, since, until, "type=volume")]
    assert len(in_gap) == 40

    second = _start_cli_relay(engine, state, tmp_path / "out2.jsonl", tmp_path / "err2.log")
    engine.cli("volume", "create", f"c-{tag}")
    after = wait_for(
        events_once(tmp_path / "out2.jsonl", actor_is(f"c-{tag}")),
        timeout=30,
        message="second run delivered the live event",
    )
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, (tmp_path / "err2.log").read_text()

    ids = [e["id"] for e in after]
    assert ids[:40] == in_gap, "the gap's events, once each, in engine order"
    assert [e["data"]["actor"]["id"] for e in after[40:]] == [f"c-{tag}"]
    first_ids = {e["id"] for e in read_events(tmp_path / "out1.jsonl")}
    assert not first_ids & set(ids), "events of the first run came out again"
    assert not [e for e in after if e["type"].endswith("relay.gap")]
    logs = [json.loads(line) for line in (tmp_path / "err2.log").read_text().splitlines()]
    assert any(
        "since=" in rec["message"] and "now" not in rec["message"].split("since=")[1]
        for rec in logs
    )


async def test_engine_restart_reconnects_and_goes_on(
    engine_fresh: PrivateEngine, tmp_path: Path
) -> None:
    engine = engine_fresh
    out = tmp_path / "out.jsonl"
    settings = relay_settings(engine.docker_host, tmp_path / "state")
    async with running_relay(settings, [file_sink(out)]) as relay:
        await asyncio.to_thread(engine.cli, "volume", "create", "before-restart")
        await async_wait_for(events_once(out, actor_is("before-restart")), timeout=30)
        await asyncio.to_thread(engine.restart)
        await async_wait_for(
            lambda: (
                relay.reader.connected
                and relay.metrics.registry.get_sample_value("relay_engine_reconnects_total") == 1
            ),
            timeout=30,
            message="relay reconnected by itself",
        )
        await asyncio.to_thread(engine.cli, "volume", "create", "after-restart")
        events = await async_wait_for(
            events_once(out, actor_is("after-restart")),
            timeout=30,
            message="events after the engine restart",
        )
    volumes = [
        e["data"]["actor"]["id"]
        for e in events
        if e["data"]["type"] == "volume" and e["data"]["action"] == "create"
    ]
    assert volumes == ["before-restart", "after-restart"]
    # The engine's replay ring starts empty after a restart: the relay says there may be a gap.
    gaps = [e for e in events if e["type"] == "dev.docker-event-relay.relay.gap"]
    assert len(gaps) == 1
    before = next(e for e in events if e["data"]["actor"]["id"] == "before-restart")
    assert int(gaps[0]["data"]["actor"]["attributes"]["since_nano"]) == before["data"]["time_nano"]


def test_engine_unreachable_at_start_is_retried_with_a_clear_message(
    engine_fresh: PrivateEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_fresh
    engine.stop()
    out = tmp_path / "out.jsonl"
    settings = relay_settings(engine.docker_host, tmp_path / "state")
    runner = RelayThread(settings, [file_sink(out)])
    started = threading.Thread(target=runner.start, args=(60,), daemon=True)
    started.start()
    try:
        wait_for(lambda: runner.relay is not None and runner.relay.reader.last_error, timeout=30)
        assert runner.relay is not None
        ready, reason = runner.relay.readiness()
        assert not ready and str(engine.socket_path) in reason
        wait_for(
            lambda: str(engine.socket_path) in caplog.text and "reconnecting" in caplog.text,
            timeout=10,
            message="a log line naming the engine address",
        )
        engine.start()
        wait_for(
            lambda: runner.relay is not None and runner.relay.reader.connected,
            timeout=30,
            message="connected once the engine is up",
        )
        engine.cli("volume", "create", "late-engine")
        wait_for(events_once(out, actor_is("late-engine")), timeout=30)
    finally:
        runner.stop(30)
    assert os.path.getsize(out) > 0
