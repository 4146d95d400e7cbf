"""Flap suppression against a real engine: a container in a restart loop (`--restart=always`,
a command that fails at once; the engine's back-off doubles from 100 ms), relayed to two real
webhook receivers, one sink with `flap:` and one without.

The sink without it receives every engine event; the flapping sink receives, per (action,
window), the first `max_events`, then one `...suppressed` summary whose count and first/last
times cover exactly the events it did not receive. Nothing is missing or counted twice, the
metric says the same, and what a window holds survives a SIGKILL of the relay.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from relay.schema import DEFAULT_TYPE_PREFIX
from tests.harness import PrivateEngine, async_wait_for
from tests.harness.receiver import Receiver
from tests.integration.test_crash_durability import (
    DRAIN_TIMEOUT,
    STOP_MARGIN,
    RelayProcess,
    relay_env,
)
from tests.relay_harness import relay_settings, running_relay

pytestmark = pytest.mark.integration

SUPPRESSED = f"{DEFAULT_TYPE_PREFIX}.container.suppressed"
# Long enough for several restarts (back-off 0.1, 0.2, 0.4 ... s: about seven in 15 s).
WINDOW = 15.0
MAX_EVENTS = 3


async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    flap, every = Receiver(), Receiver()
    await flap.start()
    await every.start()
    try:
        yield flap, every
    finally:
        await flap.aclose()
        await every.aclose()


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Receiver, Receiver]]:
    async for pair in receivers():
        yield pair


def sinks(flap: Receiver, every: Receiver, settings: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "webhook", "name": "flapping", "url": flap.url(), "flap": settings},
        {"type": "webhook", "name": "every", "url": every.url()},
    ]


def restart_loop(engine: PrivateEngine, name: str) -> None:
    engine.cli(
        *("run", "-d", "--restart=always", "--network", "none", "--name", name),
        *("busybox:latest", "false"),
    )


def container_events(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["data"]["actor"].get("name") == name]


def account(
    flapping: list[dict[str, Any]], every: list[dict[str, Any]], max_events: int
) -> dict[str, int]:
    """Check that the flapping sink's stream is the full stream summarised, per action: every
    event arrived, or lies in the time range of exactly one summary of its action, whose count
    is the number of such events; each summary follows `max_events` delivered events of its
    window. Returns the held count per action."""
    delivered = {e["id"] for e in flapping if e["type"] != SUPPRESSED}
    assert delivered <= {e["id"] for e in every}, "the flapping sink got nothing else"
    summaries = [e for e in flapping if e["type"] == SUPPRESSED]
    assert len({s["id"] for s in summaries}) == len(summaries), "one summary per window"
    held: dict[str, int] = {}
    for action in sorted({e["data"]["action"] for e in every}):
        stream = [e for e in every if e["data"]["action"] == action]
        mine = [
            s["data"]["suppressed"]
            for s in summaries
            if s["data"]["suppressed"]["action"] == action
        ]
        missing = [e for e in stream if e["id"] not in delivered]
        covered = []
        for s in mine:
            inside = [
                e
                for e in missing
                if s["first_time_nano"] <= e["data"]["time_nano"] <= s["last_time_nano"]
            ]
            assert len(inside) == s["count"], (action, s, [e["data"]["time"] for e in inside])
            assert inside[0]["data"]["time"] == s["first_time"]
            assert inside[-1]["data"]["time"] == s["last_time"]
            # The window let the first max_events through before it held any.
            before = [e for e in stream if e["data"]["time_nano"] < s["first_time_nano"]]
            assert [e["id"] for e in before[-max_events:]] == [
                e["id"] for e in before[-max_events:] if e["id"] in delivered
            ]
            assert len(before) >= max_events
            covered += inside
        assert sorted(e["id"] for e in covered) == sorted(e["id"] for e in missing), action
        held[action] = len(missing)
    return held


async def test_a_restart_loop_is_summarised_for_the_flapping_sink_only(
    engine: PrivateEngine, hooks: tuple[Receiver, Receiver], tmp_path: Path
) -> None:
    flap_hook, every_hook = hooks
    name = f"flap-{uuid.uuid4().hex[:8]}"
    settings = relay_settings(
        engine.docker_host,
        tmp_path / "state",
        engine={"filters": {"container": [name]}},
        sinks=sinks(flap_hook, every_hook, {"window": WINDOW, "max_events": MAX_EVENTS}),
    )
    try:
        async with running_relay(settings) as relay:
            await asyncio.to_thread(restart_loop, engine, name)

            def summarised() -> bool:
                got = [
                    e["data"]["suppressed"]["action"]
                    for e in flap_hook.events()
                    if e["type"] == SUPPRESSED
                ]
                return "die" in got and "start" in got

            # The first window closes WINDOW seconds after the first event.
            await async_wait_for(summarised, WINDOW + 30, interval=0.2, message="summaries")
            await asyncio.to_thread(engine.cli, "rm", "-f", name)
            await every_hook.wait_for_events(
                1, 30, where=lambda e: e["data"]["action"] == "destroy"
            )
        metrics = relay.metrics
    finally:
        engine.cli("rm", "-f", name, check=False)

    # The drain closed the windows still open: every held event is summarised by now.
    every = container_events(every_hook.events(), name)
    flapping = container_events(flap_hook.events(), name)
    actions = [e["data"]["action"] for e in every]
    assert actions.count("die") > MAX_EVENTS + 1 and actions.count("start") > MAX_EVENTS + 1
    held = account(flapping, every, MAX_EVENTS)
    print(f"\nengine events {len(every)}, flapping sink {len(flapping)}, held {held}")
    assert held["die"] >= 1 and held["start"] >= 1
    for action, count in held.items():
        sample = metrics.registry.get_sample_value(
            "relay_events_suppressed_total", {"sink": "flapping", "action": action}
        )
        assert (sample or 0) == count, action
    assert (
        metrics.registry.get_sample_value(
            "relay_events_suppressed_total", {"sink": "every", "action": "die"}
        )
        is None
    )


def held_rows(state: Path) -> Counter[str]:
    """Events the spool holds (committed) for the flapping sink's windows, by action."""
    with closing(sqlite3.connect(f"file:{state / 'spool.db'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT bit FROM sinks WHERE name = 'flap:flapping'").fetchone()
        if row is None:
            return Counter()
        bodies = db.execute("SELECT body FROM events WHERE owed & ? != 0", row).fetchall()
    return Counter(json.loads(body)["data"]["action"] for (body,) in bodies)


async def test_what_a_window_holds_survives_sigkill_and_is_summarised_after_the_restart(
    engine: PrivateEngine, hooks: tuple[Receiver, Receiver], tmp_path: Path
) -> None:
    flap_hook, every_hook = hooks
    name = f"flapkill-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    # The defaults users run: a 60 s window, 3 events per actor and action.
    env = relay_env(engine, state, name, {"type": "stdout"})
    env["RELAY_ENGINE__FILTERS"] = json.dumps({"container": [name]})
    env["RELAY_SINKS"] = json.dumps(sinks(flap_hook, every_hook, {}))
    relays: list[RelayProcess] = []
    try:
        relays.append(RelayProcess(env, tmp_path / "relay-1.log"))
        await relays[0].ready(60)
        await asyncio.to_thread(restart_loop, engine, name)
        # Some held and committed (a commit every 50 ms), the window far from closing.
        await async_wait_for(
            lambda: held_rows(state).total() >= 4, 60, interval=0.1, message="held rows"
        )
        await relays[0].stop(signal.SIGKILL, 30)
        committed = held_rows(state)
        first_run = container_events(flap_hook.events(), name)
        assert not [e for e in first_run if e["type"] == SUPPRESSED], "no window closed yet"
        # The loop ends while the relay is away; the engine replays what came after the cursor.
        await asyncio.to_thread(engine.cli, "rm", "-f", name)

        relays.append(RelayProcess(env, tmp_path / "relay-2.log"))
        await relays[1].ready(60)
        await async_wait_for(
            lambda: [e for e in flap_hook.events() if e["type"] == SUPPRESSED],
            30,
            message="the summary of what the killed relay held",
        )
        await every_hook.wait_for_events(1, 30, where=lambda e: e["data"]["action"] == "destroy")
        await relays[1].stop(signal.SIGTERM, DRAIN_TIMEOUT + STOP_MARGIN)
        assert relays[1].proc.returncode == 0
        recovered = [
            r["message"]
            for r in relays[1].records()
            if "held by flap windows" in r.get("message", "")
        ]
    finally:
        for relay in relays:
            relay.kill()
        engine.cli("rm", "-f", name, check=False)

    assert held_rows(state).total() == 0
    every = container_events(every_hook.events(), name)
    flapping = container_events(flap_hook.events(), name)
    summaries = [e for e in flapping if e["type"] == SUPPRESSED]
    said = [s["data"]["suppressed"] for s in summaries]
    print(f"\nheld when killed {dict(committed)}; summaries {said}")
    # What the killed relay held, summed up at the start of the next, one summary per action,
    # before any other: none of it lost.
    assert {
        s["data"]["suppressed"]["action"]: s["data"]["suppressed"]["count"]
        for s in summaries[: len(committed)]
    } == dict(committed), summaries
    assert len(recovered) == 1 and f"{committed.total()} event(s) held" in recovered[0], recovered
    # Every engine event reached the flapping sink or is counted in a summary; at least once.
    delivered = {e["id"] for e in flapping}
    missing = [e for e in every if e["id"] not in delivered]
    counted = sum(s["data"]["suppressed"]["count"] for s in summaries)
    assert len(missing) <= counted, (len(missing), counted)
    for e in missing:
        assert any(
            s["data"]["suppressed"]["action"] == e["data"]["action"]
            and s["data"]["suppressed"]["first_time_nano"]
            <= e["data"]["time_nano"]
            <= s["data"]["suppressed"]["last_time_nano"]
            for s in summaries
        ), e


async def test_a_drain_on_sigterm_closes_the_open_windows_first(
    engine: PrivateEngine, hooks: tuple[Receiver, Receiver], tmp_path: Path
) -> None:
    flap_hook, every_hook = hooks
    name = f"flapterm-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    env = relay_env(engine, state, name, {"type": "stdout"})
    env["RELAY_ENGINE__FILTERS"] = json.dumps({"container": [name]})
    env["RELAY_SINKS"] = json.dumps(sinks(flap_hook, every_hook, {}))
    relay = RelayProcess(env, tmp_path / "relay.log")
    try:
        await relay.ready(60)
        await asyncio.to_thread(restart_loop, engine, name)
        await async_wait_for(
            lambda: held_rows(state).total() >= 4, 60, interval=0.1, message="held rows"
        )
        await asyncio.to_thread(engine.cli, "rm", "-f", name)
        await every_hook.wait_for_events(1, 30, where=lambda e: e["data"]["action"] == "destroy")
        # Far within the 60 s window: only the drain can close it.
        assert not [e for e in flap_hook.events() if e["type"] == SUPPRESSED]
        await relay.stop(signal.SIGTERM, DRAIN_TIMEOUT + STOP_MARGIN)
        assert relay.proc.returncode == 0, relay.log.read_text()[-3000:]
    finally:
        relay.kill()
        engine.cli("rm", "-f", name, check=False)

    assert held_rows(state).total() == 0, "the summaries were committed with the drain"
    held = account(
        container_events(flap_hook.events(), name), container_events(every_hook.events(), name), 3
    )
    assert held["die"] + held["start"] >= 4
