"""Durable delivery against a real engine: the spool's restart semantics and its faults (a first
start, a corrupt spool, a cursor from the future, a full disk, unwritable paths), and dead
letters acted on with `docker-event-relay dead-letter`."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.router import RouteFilter
from tests.harness import PrivateEngine, async_wait_for
from tests.harness.receiver import Receiver
from tests.relay_harness import Recorder, relay_settings, running_relay, spool_cursor
from tests.scenarios import engine_events, engine_time

REPO = Path(__file__).resolve().parents[2]


def volumes(engine: PrivateEngine, prefix: str, count: int) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    for name in names:
        engine.cli("volume", "create", name)
    return names


def subjects(recorder: Recorder, prefix: str) -> list[str]:
    return [e.ce.subject for e in recorder.events if (e.ce.subject or "").startswith(prefix)]


def gaps(recorder: Recorder) -> list[dict[str, str]]:
    return [dict(e.ce.data.actor.attributes) for e in recorder.events if e.ce.data.type == "relay"]


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"RELAY_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "relay", "dead-letter", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_first_start_relays_from_its_start_without_a_gap(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    since = engine_time(engine)
    before = await asyncio.to_thread(volumes, engine, f"before-{tag}", 3)

    def logged() -> bool:
        seen = engine_events(engine, since, engine_time(engine), f"volume=before-{tag}")
        return {e["Actor"]["ID"] for e in seen} == set(before)

    # The engine may stamp an event a moment after its API call returned: start the relay
    # only once the engine has them all, so "before" really is before the relay's start.
    await async_wait_for(lambda: asyncio.to_thread(logged), 30, message="logged")
    recorder = Recorder()
    settings = relay_settings(
        engine.docker_host, tmp_path, engine={"filters": {"type": ["volume"]}}
    )
    async with running_relay(settings, [(recorder, RouteFilter())]):
        after = await asyncio.to_thread(volumes, engine, f"after-{tag}", 3)
        await async_wait_for(lambda: subjects(recorder, f"after-{tag}") == after, 30)
    assert not subjects(recorder, f"before-{tag}"), before
    assert not gaps(recorder)
    cursor = spool_cursor(tmp_path)
    assert cursor is not None and cursor["ids"][-1] == recorder.events[-1].id


async def test_a_corrupt_spool_is_moved_aside_and_a_gap_reported(
    engine: PrivateEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "spool.db").write_bytes(b"this is not what the relay wrote" * 64)
    recorder = Recorder()
    settings = relay_settings(
        engine.docker_host, tmp_path, engine={"filters": {"type": ["volume"]}}
    )
    async with running_relay(settings, [(recorder, RouteFilter())]) as relay:
        names = await asyncio.to_thread(volumes, engine, f"c-{tag}", 2)
        await async_wait_for(lambda: subjects(recorder, f"c-{tag}") == names, 30)
        assert relay.metrics.registry.get_sample_value("relay_replay_gaps_total") == 1
    (gap,) = gaps(recorder)
    assert "the spool was unusable" in gap["reason"] and "moved aside" in gap["reason"]
    assert recorder.events[0].ce.data.type == "relay"  # the gap comes first
    kept = await asyncio.to_thread(lambda: list(tmp_path.glob("spool.db.corrupt-*")))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not what")
    assert any(
        r.levelno == logging.ERROR and "could not be used" in r.getMessage() for r in caplog.records
    )
    assert spool_cursor(tmp_path) is not None  # a fresh spool, in use


async def test_a_cursor_from_the_future_is_clamped_with_a_gap(
    engine: PrivateEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = relay_settings(
        engine.docker_host, tmp_path, engine={"filters": {"type": ["volume"]}}
    )
    first = Recorder()
    async with running_relay(settings, [(first, RouteFilter())]):
        names = await asyncio.to_thread(volumes, engine, f"f1-{tag}", 1)
        await async_wait_for(lambda: subjects(first, f"f1-{tag}") == names, 30)
    # A restored backup, or a clock set back: the stored position is a day ahead.
    with sqlite3.connect(tmp_path / "spool.db") as db:
        (raw,) = db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        cursor = json.loads(raw)
        cursor["time_nano"] += 86_400 * 10**9
        db.execute("UPDATE meta SET value = ? WHERE key = 'cursor'", (json.dumps(cursor),))
    second = Recorder()
    async with running_relay(settings, [(second, RouteFilter())]):
        names = await asyncio.to_thread(volumes, engine, f"f2-{tag}", 2)
        await async_wait_for(lambda: subjects(second, f"f2-{tag}") == names, 30)
    (gap,) = gaps(second)
    assert "ahead of the engine's clock" in gap["reason"]
    assert any("ahead of the engine's clock" in r.getMessage() for r in caplog.records)
    stored = spool_cursor(tmp_path)
    assert stored is not None and stored["time_nano"] < cursor["time_nano"]


def test_an_unwritable_state_dir_is_exit_2_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file, not a directory")
    done = subprocess.run(
        [sys.executable, "-m", "relay", "run"],
        cwd=REPO,
        env={
            "RELAY_STATE_DIR": str(state),
            "RELAY_HTTP__ENABLED": "false",
            "RELAY_ENGINE__HOST": f"unix://{tmp_path}/none.sock",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "state_dir" in done.stderr and str(state) in done.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that fills up for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but for about `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    filler.write_bytes(b"")
    free = _free(disk)
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def _free(path: Path) -> int:
    import os

    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def held(relay: Any, sink: str) -> int:
    return next(w.held_events for w in relay.workers if w.name == sink)


async def test_a_full_disk_loses_nothing_and_says_so(
    engine: PrivateEngine, tmp_path: Path, small_disk: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        receiver.fail(503)  # the destination is down: everything is held
        settings = relay_settings(
            engine.docker_host,
            small_disk,
            engine={"filters": {"type": ["volume"], "event": ["create"]}},
            sinks=[{"type": "webhook", "name": "hook", "url": receiver.url()}],
        )
        async with running_relay(settings) as relay:
            await async_wait_for(
                lambda: relay.spool.disk_error is None and held(relay, "hook") == 0, 10
            )
            filler = await asyncio.to_thread(fill, small_disk, 16 * 1024)
            names = await asyncio.to_thread(volumes, engine, f"d-{tag}", 200)
            await async_wait_for(lambda: held(relay, "hook") == len(names), 60, message="held")
            await async_wait_for(lambda: relay.spool.disk_error is not None, 30, message="full")
            ready, why = relay.readiness()
            assert not ready and "spool" in why and "full" in why, why
            assert relay.metrics.registry.get_sample_value("relay_disk_ok") == 0
            assert relay.metrics.registry.get_sample_value(
                "relay_disk_errors_total", {"what": "spool"}
            )
            # Room again: the spool catches up by itself.
            filler.unlink()
            await async_wait_for(lambda: relay.spool.disk_error is None, 30, message="writing")
            assert relay.metrics.registry.get_sample_value("relay_disk_ok") == 1
            receiver.reset()
            await receiver.wait_for_events(len(names), timeout=60)
        got = [e["subject"] for e in receiver.events()]
        assert got == names


async def test_an_unwritable_dead_letter_file_keeps_the_records_and_writes_them_later(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where the dead-letter directory should be
    export = blocked / "dead-letter.jsonl"
    async with Receiver() as receiver:
        receiver.fail(400, body="no")
        settings = relay_settings(
            engine.docker_host,
            tmp_path,
            engine={"filters": {"type": ["volume"], "event": ["create"]}},
            dead_letter_path=export,
            sinks=[{"type": "webhook", "name": "hook", "url": receiver.url()}],
        )
        async with running_relay(settings) as relay:
            names = await asyncio.to_thread(volumes, engine, f"u-{tag}", 3)
            await async_wait_for(lambda: relay.dead_letter.count == 3, 30, message="3 letters")
            ready, why = relay.readiness()
            assert not ready and "dead-letter file" in why
            listed = await asyncio.to_thread(cli, tmp_path, "list", "--json")
            assert [
                json.loads(line)["event"]["subject"] for line in listed.stdout.splitlines()
            ] == names
            blocked.unlink()
            blocked.mkdir()
            # The next write flushes what waited, in order: one more dead letter.
            extra = await asyncio.to_thread(volumes, engine, f"v-{tag}", 1)
            await async_wait_for(lambda: relay.dead_letter.disk_error is None, 30)
        lines = [json.loads(line) for line in export.read_text().splitlines()]
        assert [r["event"]["subject"] for r in lines] == names + extra
        assert export.stat().st_mode & 0o777 == 0o600


async def test_dead_letter_replay_delivers_once(engine: PrivateEngine, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        receiver.fail(400, body="not yet", times=3)
        settings = relay_settings(
            engine.docker_host,
            tmp_path,
            engine={"filters": {"type": ["volume"], "event": ["create"]}},
            sinks=[{"type": "webhook", "name": "hook", "url": receiver.url()}],
        )
        async with running_relay(settings) as relay:
            names = await asyncio.to_thread(volumes, engine, f"r-{tag}", 3)
            await async_wait_for(lambda: relay.dead_letter.count == 3, 30, message="3 letters")
            await async_wait_for(lambda: len(cli(tmp_path, "list").stdout.splitlines()) == 3, 10)

            dry = await asyncio.to_thread(cli, tmp_path, "replay", "--sink", "hook", "--dry-run")
            assert dry.returncode == 0 and "would be replayed: 3" in dry.stdout, dry.stderr
            done = await asyncio.to_thread(cli, tmp_path, "replay", "--sink", "hook")
            assert done.returncode == 0 and "replayed: 3" in done.stdout, done.stderr
            await receiver.wait_for_events(3, timeout=30)
            again = await asyncio.to_thread(cli, tmp_path, "replay", "--sink", "hook")
            assert "replayed: 0" in again.stdout
            # Nothing more arrives: each was replayed once.
            more = await asyncio.to_thread(volumes, engine, f"s-{tag}", 1)
            await receiver.wait_for_events(4, timeout=30)
        assert [e["subject"] for e in receiver.events()] == names + more
        assert cli(tmp_path, "list").stdout == ""  # replayed ones are listed with --replayed
        assert len(cli(tmp_path, "list", "--replayed").stdout.splitlines()) == 3
        purged = cli(tmp_path, "purge", "--replayed", "--sink", "hook")
        assert "purged: 3" in purged.stdout
        assert cli(tmp_path, "list", "--replayed").stdout == ""
