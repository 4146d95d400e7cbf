"""The spool's bookkeeping against a real SQLite file: what a commit writes, what a reopen finds,
a disk that refuses writes, a corrupt file, and a backlog written in parts."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import spool as spool_module
from relay.cursor import Position
from relay.metrics import Metrics
from relay.schema import Event
from relay.spool import Spool
from tests.contract import sample_events

_open: list[Spool] = []


@pytest.fixture(autouse=True)
def _close() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def spool_at(path: Path, sinks: list[str], cursor: Position | None = None) -> Spool:
    spool = Spool(path / "spool.db", Metrics())
    _open.append(spool)
    spool.recovered = spool.open(sinks)  # type: ignore[attr-defined]
    if cursor is not None:
        spool.follow(lambda: ("ENGINE", cursor))
    return spool


def rows(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(path / "spool.db") as db:
        return [
            (int(s), int(o)) for s, o in db.execute("SELECT seq, owed FROM events ORDER BY seq")
        ]


def numbered(count: int, start: int = 1) -> list[Event]:
    events = sample_events(count)
    for offset, event in enumerate(events):
        event.seq = start + offset
    return events


async def test_a_commit_writes_what_is_owed_with_the_cursor(tmp_path: Path) -> None:
    cursor = Position()
    spool = spool_at(tmp_path, ["a", "b"], cursor)
    a, b = spool.bits["a"], spool.bits["b"]
    events = numbered(4)
    for event in events:
        spool.add(event, a | b)
        cursor.advance(event.time_nano, event.id)
    spool.done(a, 1)
    spool.done(b, 1)  # finished by both before the commit: never written
    spool.done(a, 2)
    assert await spool.commit()
    assert rows(tmp_path) == [(2, b), (3, a | b), (4, a | b)]
    spool.done(b, 2)
    spool.done(a, 3)
    assert await spool.commit()
    assert rows(tmp_path) == [(3, b), (4, a | b)]
    spool.close()

    again = spool_at(tmp_path, ["a", "b"])
    found = again.recovered  # type: ignore[attr-defined]
    assert found.engine_id == "ENGINE" and found.position == cursor
    assert found.next_seq == 5
    assert (found.backlog["a"].events, found.backlog["a"].first_seq) == (1, 4)
    assert (found.backlog["b"].events, found.backlog["b"].first_seq) == (2, 3)
    loaded = await again.load(again.bits["b"], 3, 10)
    assert [e.id for e in loaded] == [events[2].id, events[3].id]
    assert loaded[0].json() == events[2].json()


async def test_a_sink_no_longer_configured_owes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = spool_at(tmp_path, ["keep", "gone"])
    for event in numbered(3):
        spool.add(event, spool.bits["keep"] | spool.bits["gone"])
    spool.add(numbered(1, start=4)[0], spool.bits["gone"])
    assert await spool.commit()
    spool.close()
    again = spool_at(tmp_path, ["keep", "new"])
    assert again.recovered.backlog["keep"].events == 3  # type: ignore[attr-defined]
    assert again.recovered.backlog["new"].events == 0  # type: ignore[attr-defined]
    assert [seq for seq, _ in rows(tmp_path)] == [1, 2, 3]
    assert "sink gone is no longer configured: 4 event(s)" in caplog.text
    assert again.bits["new"] not in (again.bits["keep"],)


async def test_a_disk_that_refuses_writes_loses_nothing_and_recovers(tmp_path: Path) -> None:
    cursor = Position()
    spool = spool_at(tmp_path, ["a"], cursor)
    bit = spool.bits["a"]
    events = numbered(5)
    assert spool._db is not None
    spool._db.execute("PRAGMA query_only = 1")  # every write now fails, as on a read-only disk
    for event in events[:3]:
        spool.add(event, bit)
        cursor.advance(event.time_nano, event.id)
    assert not await spool.commit()
    assert spool.disk_error is not None and "readonly" in spool.disk_error
    assert spool.metrics.registry.get_sample_value("relay_disk_ok") == 0
    # Still held, in order, with what came after; a sink finishing one meanwhile counts.
    for event in events[3:]:
        spool.add(event, bit)
    spool.done(bit, 2)
    assert [e.seq for e in spool.held(bit, 0)] == [1, 3, 4, 5]
    spool._db.execute("PRAGMA query_only = 0")
    assert await spool.commit()
    assert spool.disk_error is None
    assert rows(tmp_path) == [(1, bit), (3, bit), (4, bit), (5, bit)]


async def test_a_backlog_is_written_in_parts_and_the_cursor_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_MAX_ROWS_PER_COMMIT", 4)
    cursor = Position()
    spool = spool_at(tmp_path, ["a"], cursor)
    for event in numbered(10):
        spool.add(event, spool.bits["a"])
        cursor.advance(event.time_nano, event.id)
    assert await spool.commit()
    assert len(rows(tmp_path)) == 4
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone() is None
    assert await spool.commit() and await spool.commit()
    assert len(rows(tmp_path)) == 10
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone() is not None


@pytest.mark.parametrize("content", [b"", b"garbage " * 100])
def test_an_unusable_file_is_moved_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "spool.db").write_bytes(content)
    spool = spool_at(tmp_path, ["a"])
    found = spool.recovered  # type: ignore[attr-defined]
    assert found.corrupt is not None and "moved aside" in found.corrupt
    (kept,) = tmp_path.glob("spool.db.corrupt-*")
    assert kept.read_bytes() == content
    assert found.position is None and found.next_seq == 1


def test_dead_letters_and_the_file_mode(tmp_path: Path) -> None:
    spool = spool_at(tmp_path, ["a"])
    spool.add_dead_letter(1.5, "a", "permanent", b'{"reason":"permanent"}')
    assert spool.commit_now()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT time, sink, reason FROM dead_letters").fetchall() == [
            (1.5, "a", "permanent")
        ]
    # Private whatever the umask: the events carry labels, attributes, exec commands.
    assert (tmp_path / "spool.db").stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_mode & 0o777 == 0o700


async def test_checkpoints_run_in_the_spool_thread_the_final_commit_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_CHECKPOINT_AT", 64 * 1024)
    cursor = Position()
    spool = spool_at(tmp_path, ["a"], cursor)
    for event in numbered(600):
        spool.add(event, spool.bits["a"])
        cursor.advance(event.time_nano, event.id)
        if event.seq % 100 == 0:
            assert await spool.commit(), spool.disk_error
    spool.add(numbered(1, start=601)[0], spool.bits["a"])
    assert spool.commit_now(), spool.disk_error
    assert len(rows(tmp_path)) == 601
