"""What the relay keeps on disk is its own, whatever the umask: the state directory 0700, the
spool (and SQLite's WAL and shared-memory files beside it) and the dead letters 0600. Files and
directories left wider by someone else, or by an older relay, are narrowed at start."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PrivateEngine, async_wait_for
from tests.harness.receiver import Receiver
from tests.relay_harness import relay_settings, running_relay


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: every file created without an explicit mode would be world-writable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_state_files_are_private_whatever_the_umask(
    engine: PrivateEngine, tmp_path: Path, open_umask: None
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    # A dead-letter file left world-readable (by hand, or by an older relay).
    export = state / "dead-letter.jsonl"
    export.write_text("")
    os.chmod(export, 0o644)
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        receiver.fail(400, times=1, body="refused")
        settings = relay_settings(
            engine.docker_host,
            state,
            engine={"filters": {"type": ["volume"], "event": ["create"]}},
            sinks=[{"type": "webhook", "name": "hook", "url": receiver.url()}],
        )
        async with running_relay(settings) as relay:
            for i in range(3):
                await asyncio.to_thread(engine.cli, "volume", "create", f"p-{tag}-{i}")
            await receiver.wait_for_events(2, timeout=60)
            await async_wait_for(lambda: relay.dead_letter.count == 1, 30, message="1 letter")
            files = {p.name: mode(p) for p in state.iterdir()}
            assert mode(state) == 0o700
            assert files["spool.db"] == 0o600
            assert files.get("spool.db-wal") == 0o600, files
            assert files.get("spool.db-shm") == 0o600, files
            assert files["dead-letter.jsonl"] == 0o600
    # Nothing in the directory is open to others, after the relay stopped too.
    assert {p.name: mode(p) & 0o077 for p in state.iterdir()} == dict.fromkeys(
        (p.name for p in state.iterdir()), 0
    )
    assert [line for line in export.read_text().splitlines() if f"p-{tag}-0" in line]


async def test_a_dead_letter_directory_it_creates_is_private(
    engine: PrivateEngine, tmp_path: Path, open_umask: None
) -> None:
    export = tmp_path / "letters" / "nested" / "dead.jsonl"
    tag = uuid.uuid4().hex[:8]
    async with Receiver() as receiver:
        receiver.fail(400, times=1)
        settings = relay_settings(
            engine.docker_host,
            tmp_path / "state",
            engine={"filters": {"type": ["volume"], "event": ["create"]}},
            dead_letter_path=export,
            sinks=[{"type": "webhook", "name": "hook", "url": receiver.url()}],
        )
        async with running_relay(settings) as relay:
            await asyncio.to_thread(engine.cli, "volume", "create", f"q-{tag}")
            await async_wait_for(lambda: relay.dead_letter.count == 1, 30, message="1 letter")
            await async_wait_for(export.exists, 30, message="the export file")
    assert mode(export) == 0o600
    # Each directory it made, not only the last: a writable parent would let others swap it.
    assert mode(export.parent) == 0o700
    assert mode(export.parent.parent) == 0o700
    assert f"q-{tag}" in export.read_text()
