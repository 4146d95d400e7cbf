"""The spool: what every sink still owes, and where the relay is in the engine's stream, kept
in one SQLite database (`STATE_DIR/spool.db`, WAL) so that both survive any crash together.

One writer group-commits: every `spool.commit_interval` (or sooner, at `spool.commit_max_events`)
one transaction inserts the events dispatched since the last commit that some sink still owes,
clears what the sinks finished since, deletes rows nobody owes any more, and writes the engine
cursor (the position and the ids of the last events read). Cursor and spool therefore never
disagree: after a crash, every event before the cursor is either in the spool or was finished
by every sink that wanted it, and everything after it the engine replays (as far as its replay
reaches; beyond that the pipeline reports a gap).

Delivery does not wait for the commit: an event is handed to the sinks at once, and one that all
its sinks finished before the next commit is never written at all (the cursor still moves over
it). So the disk costs a healthy relay one small transaction per interval, and a backlog costs
rows. A sink that falls behind holds only a window of its events in memory; the rest it reads
back from here (`load`).

Rows: `events(seq, time_nano, owed, body)`, `owed` a bit mask of the sinks (each sink name has a
bit, kept in `sinks`) that still owe the event, `body` the structured CloudEvent JSON.

When the disk fails (full, read-only, I/O error), nothing accepted is dropped: the events stay
in memory, the relay goes on delivering, `/readyz` and `relay_disk_ok` say why, and the commit
is tried again. SQLite keeps a failed transaction out of the file whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec

from relay.cursor import Position
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.schema import Event

log = logging.getLogger("relay.spool")

SCHEMA_VERSION = 1
MAX_SINKS = 62  # bits of a SQLite integer, one kept clear of the sign
_CURSOR_IDS = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sinks (name TEXT PRIMARY KEY, bit INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time_nano INTEGER NOT NULL,
    owed INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    sink TEXT,
    reason TEXT NOT NULL,
    record BLOB NOT NULL,
    replayed REAL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (time);
CREATE TABLE IF NOT EXISTS requeue (
    id INTEGER PRIMARY KEY,
    dead_letter INTEGER NOT NULL,
    sink TEXT NOT NULL,
    body BLOB NOT NULL
);
"""

# SQLite binds at most 32,766 variables per statement.
_ROWS_PER_STATEMENT = 500
_IDS_PER_STATEMENT = 2000


def private_dir(path: Path) -> None:
    """Create `path` and the missing directories above it as 0700, whatever the umask: a
    directory others may write in would let them swap what is below it."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)


T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Rows one commit writes at most (a few tens of ms on the event loop).
_MAX_ROWS_PER_COMMIT = 5000

# WAL bytes after which a commit is followed by a checkpoint.
_CHECKPOINT_AT = 8 * 1024**2

# Seconds between looks at the `requeue` table (filled by `dead-letter replay`).
_REQUEUE_EVERY = 1.0


class _Cursor(msgspec.Struct):
    engine_id: str
    time_nano: int
    ids: list[str]


@dataclass
class Backlog:
    """What one sink owed when the spool was opened."""

    events: int = 0
    bytes: int = 0
    first_seq: int | None = None


@dataclass
class Recovered:
    engine_id: str | None = None
    position: Position | None = None
    next_seq: int = 1
    backlog: dict[str, Backlog] = field(default_factory=dict)
    corrupt: str | None = None
    """Set when the database could not be used: what was wrong, and where it was moved."""


@dataclass(slots=True)
class _Held:
    event: Event
    owed: int


class Spool:
    def __init__(
        self,
        path: Path,
        metrics: Metrics,
        *,
        fsync: bool = True,
        commit_interval: float = 0.05,
        commit_max_events: int = 500,
    ) -> None:
        self.path = path
        # No file: a spool in memory (`spool.durable: false`), the same code without the disk.
        self.durable = path.name != ":memory:"
        self.metrics = metrics
        self.fsync = fsync
        self.commit_interval = commit_interval
        self.commit_max_events = commit_max_events
        self.bits: dict[str, int] = {}
        self.disk_error: str | None = None
        # The fsync and the checkpoints: off the event loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._wal_fd: int | None = None
        # Dispatched since the last commit; being written by the commit under way.
        self._pending: dict[int, _Held] = {}
        self._committing: dict[int, _Held] = {}
        self._acks: list[tuple[int, int]] = []
        self._dead: list[tuple[float, str | None, str, bytes]] = []
        self._requeued: list[int] = []
        # Replayed dead letters, handed to the relay: (sink, structured event JSON) -> taken.
        self._requeue_to: Callable[[str, bytes], bool] = lambda sink, body: False
        self._next_requeue_look = 0.0
        self.on_tick: list[Callable[[], None]] = []
        self._in_commit_dead: list[tuple[float, str | None, str, bytes]] = []
        self._in_commit_requeued: list[int] = []
        self._cursor_source: Callable[[], tuple[str, Position] | None] = lambda: None
        self._written_cursor: tuple[str, int, str | None] | None = None
        self._cursor_key: tuple[str, int, str | None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        # One commit at a time: a snapshot must not take rows another commit is writing.
        self._commit_lock = asyncio.Lock()
        self._committed = asyncio.Event()
        self._failures = 0

    # -- opening (before the components run) --------------------------------------------------

    def open(self, sinks: Iterable[str]) -> Recovered:
        """Open (or create) the database, give each sink a bit, and say what was in it. A file
        that is not a usable spool is moved aside, kept for inspection, and a fresh one made.
        Raises sqlite3.OperationalError / OSError when the file cannot be opened or written at
        all (the caller names the setting)."""
        corrupt: str | None = None
        if self.durable:
            # The state directory is the relay's alone: the events carry labels and commands.
            private_dir(self.path.parent)
            os.chmod(self.path.parent, 0o700)
        if self.durable and self.path.exists() and self.path.stat().st_size == 0:
            # The spool is created with its schema in one go: an empty file is a broken one.
            corrupt = self._move_aside("the file is empty")
        try:
            recovered = self._open(list(sinks))
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            corrupt = self._move_aside(f"{type(exc).__name__}: {exc}")
            recovered = self._open(list(sinks))
        recovered.corrupt = corrupt
        return recovered

    def _open(self, sinks: list[str]) -> Recovered:
        target = str(self.path) if self.durable else ":memory:"
        db = sqlite3.connect(target, isolation_level=None)
        try:
            if self.durable:
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            # Commits run on the event loop: SQLite writes the WAL (page cache, fast), and the
            # fsync (`spool.fsync`) and checkpoints run in the spool's thread, which needs the
            # GIL only at their start and end. NORMAL in WAL mode keeps the database whole on a
            # power loss; what it gives up, the fsync after each commit takes back.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else '?'}")
            db.executescript(_SCHEMA)
            version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(version[0]) != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version[0]}, not {SCHEMA_VERSION}")
            recovered = Recovered()
            self.bits = self._assign_bits(db, sinks)
            row = db.execute("SELECT value FROM meta WHERE key='cursor'").fetchone()
            if row is not None:
                cursor = msgspec.json.decode(row[0], type=_Cursor)
                recovered.engine_id = cursor.engine_id
                recovered.position = Position(cursor.time_nano, cursor.ids)
            top = db.execute("SELECT max(seq) FROM events").fetchone()[0]
            recovered.next_seq = int(top or 0) + 1
            for name, bit in self.bits.items():
                count, size, first = db.execute(
                    "SELECT count(*), coalesce(sum(length(body)), 0), min(seq) FROM events "
                    "WHERE owed & ? != 0",
                    (bit,),
                ).fetchone()
                recovered.backlog[name] = Backlog(int(count), int(size), first)
        except BaseException:
            db.close()
            raise
        self._db = db
        return recovered

    def _assign_bits(self, db: sqlite3.Connection, sinks: list[str]) -> dict[str, int]:
        known = dict(db.execute("SELECT name, bit FROM sinks").fetchall())
        gone = {name: bit for name, bit in known.items() if name not in sinks}
        db.execute("BEGIN IMMEDIATE")
        for name, bit in gone.items():
            # A sink no longer configured: what it still owed goes nowhere now. Said loudly;
            # the events stay in the engine's history, not here.
            owed = db.execute("SELECT count(*) FROM events WHERE owed & ? != 0", (bit,)).fetchone()
            if owed[0]:
                log.warning(
                    "sink %s is no longer configured: %d event(s) it still owed are dropped",
                    name,
                    owed[0],
                )
            db.execute("UPDATE events SET owed = owed & ~? WHERE owed & ? != 0", (bit, bit))
            db.execute("DELETE FROM sinks WHERE name = ?", (name,))
        db.execute("DELETE FROM events WHERE owed = 0")
        used = {bit for name, bit in known.items() if name in sinks}
        free = (1 << i for i in range(MAX_SINKS) if (1 << i) not in used)
        bits = {name: known[name] for name in sinks if name in known}
        for name in sinks:
            if name not in bits:
                bits[name] = next(free)
                db.execute("INSERT INTO sinks VALUES (?, ?)", (name, bits[name]))
        db.execute("COMMIT")
        return bits

    def _move_aside(self, why: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(Path(f"{target}{suffix}"))
        what = f"{why}; moved aside to {target}"
        log.error("the spool %s could not be used (%s); starting a fresh one", self.path, what)
        return what

    # -- the event loop's side ----------------------------------------------------------------

    def follow(self, cursor: Callable[[], tuple[str, Position] | None]) -> None:
        """Where the cursor written with each commit comes from (the pipeline)."""
        self._cursor_source = cursor

    def add(self, event: Event, owed: int) -> None:
        """`event` was dispatched to the sinks of the bit mask `owed`."""
        self._pending[event.seq] = _Held(event, owed)
        self._changed.set()
        if len(self._pending) >= self.commit_max_events:
            self._wake.set()

    def add_dead_letter(self, at: float, sink: str | None, reason: str, record: bytes) -> None:
        """Kept with the next commit, the same one that says the sink is done with the event."""
        self._dead.append((at, sink, reason, record))
        self._changed.set()

    def replay_into(self, take: Callable[[str, bytes], bool]) -> None:
        """Where replayed dead letters go: `take(sink, body)` queues the event for that sink
        (False: no such sink any more)."""
        self._requeue_to = take

    def done(self, bit: int, seq: int) -> None:
        """The sink of `bit` finished with event `seq` (delivered, dead-lettered or dropped)."""
        held = self._pending.get(seq)
        if held is not None:
            held.owed &= ~bit
            return
        held = self._committing.get(seq)
        if held is not None:
            # Its row is being written with the old mask: cleared by the next commit.
            held.owed &= ~bit
        self._acks.append((bit, seq))
        self._changed.set()

    def held(self, bit: int, after: int, limit: int | None = None) -> list[Event]:
        """Uncommitted events the sink of `bit` owes, from seq `after` on, in order, at most
        `limit` (for `load`)."""
        out: list[Event] = []
        if limit is not None and limit <= 0:
            return out
        # Both maps are in seq order (a commit takes the oldest pending first), the committing
        # ones before the pending ones: the scan can stop at the limit.
        for part in (self._committing, self._pending):
            if not part or next(reversed(part)) < after:
                continue
            for s, h in part.items():
                if s >= after and h.owed & bit:
                    out.append(h.event)
                    if len(out) == limit:
                        return out
        return out

    async def load(self, bit: int, after: int, limit: int) -> list[Event]:
        """Up to `limit` events the sink of `bit` owes, from seq `after` on, in order: rows on
        disk and events not committed yet alike."""
        try:
            rows = self._load(bit, after, limit)
        except sqlite3.Error as exc:
            self._disk_failed(exc)
            rows = []
        # Rows on disk are older than any event held in memory, except those of a commit under
        # way, which are in both: memory is read from past the last row.
        events = [Event.from_json(body, seq) for seq, body in rows]
        if len(events) < limit:
            start = rows[-1][0] + 1 if rows else after
            events.extend(self.held(bit, max(after, start), limit - len(events)))
        return events

    def _load(self, bit: int, after: int, limit: int) -> list[tuple[int, bytes]]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT seq, body FROM events WHERE seq >= ? AND owed & ? != 0 ORDER BY seq LIMIT ?",
            (after, bit, limit),
        ).fetchall()
        return [(int(seq), bytes(body)) for seq, body in rows]

    # -- the writer component -------------------------------------------------------------------

    async def run(self, task_status: TaskStatus) -> None:
        task_status.started()
        while True:
            # Idle, the writer sleeps until something changes (a look for replays and a retry
            # of a failed disk at most once a second); then it gathers changes for one
            # interval, or until a batch is full, and commits them together.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_wait()):
                    await self._changed.wait()
            if self._changed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._next_wait()):
                        await self._wake.wait()
            self._changed.clear()
            self._wake.clear()
            for tick in self.on_tick:
                tick()
            await self._look_for_replays()
            await self.commit()

    def changed(self) -> None:
        """Something to write (the pipeline read events; the cursor moved)."""
        self._changed.set()

    def _idle_wait(self) -> float:
        return self._next_wait() if self._failures else _REQUEUE_EVERY

    def stop_replays(self) -> None:
        """Shutting down: replayed dead letters wait in the spool for the next start."""
        self._next_requeue_look = float("inf")

    async def _look_for_replays(self) -> None:
        loop = asyncio.get_running_loop()
        if self._failures or loop.time() < self._next_requeue_look:
            return
        self._next_requeue_look = loop.time() + _REQUEUE_EVERY
        try:
            rows = self._read_requeue()
        except sqlite3.Error as exc:
            self._disk_failed(exc)
            return
        taken = set(self._requeued)
        for row_id, sink, body in rows:
            if row_id in taken:
                continue
            if not self._requeue_to(sink, body):
                log.warning("a replayed dead letter is for sink %s, which is not configured", sink)
            self._requeued.append(row_id)

    def _read_requeue(self) -> list[tuple[int, str, bytes]]:
        assert self._db is not None
        rows = self._db.execute("SELECT id, sink, body FROM requeue ORDER BY id LIMIT 1000")
        return [(int(i), str(sink), bytes(body)) for i, sink, body in rows.fetchall()]

    def _next_wait(self) -> float:
        if self._failures:
            # The disk failed: try again, less and less often (at most every 5 s).
            return float(min(5.0, self.commit_interval * 2**self._failures))
        return self.commit_interval

    async def commit(self) -> bool:
        """One group commit now; False when the disk refused it (everything stays held)."""
        async with self._commit_lock:
            return await self._commit()

    async def _commit(self) -> bool:
        batch = self._snapshot()
        if batch is None:
            return True
        inserts, acks, cursor = batch
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            self._write(inserts, acks, cursor)
        except sqlite3.Error as exc:
            self._acks[:0] = acks
            self._restore_side_rows()
            self._disk_failed(exc)
            return False
        try:
            await loop.run_in_executor(self._executor, self._settle)
        except (OSError, sqlite3.Error) as exc:
            # Committed, but perhaps not on the disk: nothing to undo; said, and tried again.
            self._disk_failed(exc)
        self._committed_ok(inserts, cursor, time.perf_counter() - started)
        return True

    def commit_now(self) -> bool:
        """The final commit, synchronous (teardown, after every component finished)."""
        batch = self._snapshot()
        if batch is None:
            return True
        inserts, acks, cursor = batch
        started = time.perf_counter()
        try:
            self._write(inserts, acks, cursor)
            # In the spool's thread, where its checkpoint connection lives.
            self._executor.submit(self._settle).result()
        except (OSError, sqlite3.Error) as exc:
            self._acks[:0] = acks
            self._restore_side_rows()
            self._disk_failed(exc)
            return False
        self._committed_ok(inserts, cursor, time.perf_counter() - started)
        return True

    def _settle(self) -> None:
        """In the spool's thread: the fsync of what was committed, and a checkpoint (moving the
        WAL into the database) when the WAL has grown."""
        if not self.durable:
            return
        if self._wal_fd is None:
            self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        if self.fsync:
            os.fsync(self._wal_fd)
        if os.fstat(self._wal_fd).st_size >= _CHECKPOINT_AT:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, isolation_level=None)
                self._checkpointer.execute("PRAGMA synchronous=NORMAL")
            # PASSIVE: never waits for the writer; the WAL is reused from its start once all
            # of it is in the database.
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _snapshot(
        self,
    ) -> tuple[list[tuple[int, int, int, bytes]], list[tuple[int, int]], _Cursor | None] | None:
        source = self._cursor_source()
        cursor = None
        if source is not None:
            engine_id, position = source
            key = (engine_id, position.time_nano, position.last_id)
            if key != self._written_cursor:
                # Ids of the events a resume can replay: more than the engine's ring of 256.
                ids = position.last_ids(_CURSOR_IDS)
                cursor = _Cursor(engine_id, position.time_nano, ids)
                self._cursor_key = key
        if (
            not self._pending
            and not self._acks
            and not self._dead
            and not self._requeued
            and cursor is None
        ):
            return None
        if len(self._pending) > _MAX_ROWS_PER_COMMIT:
            # A backlog held in memory (the disk failed for a while): written in parts, so the
            # event loop, which writes them, never stalls the reader for long. The cursor waits
            # for the last part: it may only cover what is written.
            cursor = None
            items = iter(self._pending.items())
            self._committing = dict(itertools.islice(items, _MAX_ROWS_PER_COMMIT))
            self._pending = dict(items)
            self._changed.set()
            self._wake.set()
        else:
            self._committing, self._pending = self._pending, {}
        inserts = [
            (seq, h.event.time_nano, h.owed, h.event.json())
            for seq, h in self._committing.items()
            if h.owed
        ]
        acks, self._acks = self._acks, []
        self._in_commit_dead, self._dead = self._dead, []
        self._in_commit_requeued, self._requeued = self._requeued, []
        return inserts, acks, cursor

    def _write(
        self,
        inserts: list[tuple[int, int, int, bytes]],
        acks: list[tuple[int, int]],
        cursor: _Cursor | None,
    ) -> None:
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            # Many rows per statement, not one statement per row: each statement hands the GIL
            # back and forth once, and an event loop busy reading would make every hand-back
            # wait out a switch interval (measured: 2,000 rows took 1.3 s row by row).
            for chunk in _chunks(inserts, _ROWS_PER_STATEMENT):
                db.execute(
                    "INSERT OR REPLACE INTO events VALUES " + ",".join(["(?,?,?,?)"] * len(chunk)),
                    [value for row in chunk for value in row],
                )
            by_bit: dict[int, list[int]] = {}
            for bit, seq in acks:
                by_bit.setdefault(bit, []).append(seq)
            for bit, seqs in by_bit.items():
                for part in _chunks(seqs, _IDS_PER_STATEMENT):
                    marks = ",".join("?" * len(part))
                    db.execute(
                        f"UPDATE events SET owed = owed & ~? WHERE seq IN ({marks})", [bit, *part]
                    )
            for part in _chunks(sorted({seq for _, seq in acks}), _IDS_PER_STATEMENT):
                marks = ",".join("?" * len(part))
                db.execute(f"DELETE FROM events WHERE owed = 0 AND seq IN ({marks})", part)
            if cursor is not None:
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('cursor', ?)",
                    (msgspec.json.encode(cursor).decode(),),
                )
            if self._in_commit_dead:
                db.executemany(
                    "INSERT INTO dead_letters (time, sink, reason, record) VALUES (?, ?, ?, ?)",
                    self._in_commit_dead,
                )
            if self._in_commit_requeued:
                db.executemany(
                    "DELETE FROM requeue WHERE id = ?", [(i,) for i in self._in_commit_requeued]
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _restore_side_rows(self) -> None:
        # Not written: held again, in order, ahead of what came meanwhile.
        self._committing.update(self._pending)
        self._pending, self._committing = self._committing, {}
        self._dead[:0] = self._in_commit_dead
        self._requeued[:0] = self._in_commit_requeued
        self._in_commit_dead, self._in_commit_requeued = [], []

    def _committed_ok(
        self, inserts: list[tuple[int, int, int, bytes]], cursor: _Cursor | None, took: float
    ) -> None:
        self._committing = {}
        self._in_commit_dead, self._in_commit_requeued = [], []
        if cursor is not None:
            self._written_cursor = self._cursor_key
        self.metrics.spool_commits.inc()
        self.metrics.spool_commit_seconds.observe(took)
        if self.disk_error is not None:
            log.warning(
                "spool %s: writing again after %d failed commit(s)", self.path, self._failures
            )
        self.disk_error = None
        self._failures = 0
        self.metrics.disk_ok.set(1)

    def _disk_failed(self, exc: BaseException) -> None:
        self._failures += 1
        self.metrics.disk_errors.labels("spool").inc()
        self.metrics.disk_ok.set(0)
        text = f"{type(exc).__name__}: {exc}"
        if self.disk_error is None:
            log.error(
                "spool %s: cannot write (%s); the events stay in memory and it is tried again",
                self.path,
                text,
            )
        self.disk_error = text

    def close(self) -> None:
        """After the final commit: close the database (teardown)."""
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            with contextlib.suppress(Exception):
                self._executor.submit(checkpointer.close).result()
        fd, self._wal_fd = self._wal_fd, None
        if fd is not None:
            os.close(fd)
        self._executor.shutdown(wait=True)
