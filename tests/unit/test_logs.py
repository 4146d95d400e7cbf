"""Log formatting: JSON lines by default, a console format for people, the level setting."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from relay.errors import PermanentSinkError
from relay.logs import MAX_KEYS, BurstFilter, BurstLog, JsonFormatter, Summary, setup_logging
from relay.outbox import DEAD_LETTER_LOG_INTERVAL, DeadLetterLog
from tests.contract import sample_events
from tests.harness.wait import wait_for
from tests.unit.test_pipeline import (  # the worker as the pipeline tests build it
    ScriptedSink,
    _close_spools,  # noqa: F401 (an autouse fixture: closes the workers' spools)
    dead_letters,
    drain,
    feed,
    make_worker,
)


class Stderr:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    """What setup_logging's handler writes (it takes sys.stderr when called, in the test)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield Stderr(capsys)
    for handler in root.handlers:
        for f in handler.filters:
            if isinstance(f, BurstFilter):
                f.bursts.due(everything=True)  # owed to a stream that is gone after the test
    root.handlers[:], level = saved
    root.setLevel(level)


def test_json_lines_with_time_level_logger_message_and_extras(stderr: Stderr) -> None:
    setup_logging("INFO", "json")
    log = logging.getLogger("relay.test")
    log.info("sink %s: %d event(s)", "kafka", 3, extra={"sink": "kafka", "count": 3})
    log.warning('quote " and newline \n inside', extra={"obj": ValueError("odd")})
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2  # the newline in the message stays inside one JSON line
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info" and first["logger"] == "relay.test"
    assert first["message"] == "sink kafka: 3 event(s)"
    assert first["sink"] == "kafka" and first["count"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["message"] == 'quote " and newline \n inside'
    assert second["obj"] == "odd"  # anything else is stringified, never fails


def test_exceptions_are_one_json_line(stderr: Stderr) -> None:
    setup_logging("INFO", "json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("relay.test").exception("failed")
    (line,) = stderr.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert entry["exception"].startswith("Traceback") and "RuntimeError: boom" in entry["exception"]


def test_console_format_is_readable_not_json(stderr: Stderr) -> None:
    setup_logging("INFO", "console")
    logging.getLogger("relay.app").info("starting: %s", "engine")
    (line,) = stderr.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    relay\.app: starting: engine", line), line


def test_level_hides_lower_records_and_quiets_client_libraries(stderr: Stderr) -> None:
    setup_logging("WARNING", "json")
    logging.getLogger("relay.x").info("hidden")
    logging.getLogger("relay.x").warning("shown")
    assert [json.loads(ln)["message"] for ln in stderr.getvalue().splitlines()] == ["shown"]

    setup_logging("DEBUG", "json")
    logging.getLogger("relay.x").debug("relay debug")
    logging.getLogger("aiokafka.conn").info("client chatter")
    messages = [json.loads(ln)["message"] for ln in stderr.getvalue().splitlines()]
    assert "relay debug" in messages and "client chatter" not in messages


def test_secret_values_stay_masked_when_logged(stderr: Stderr) -> None:
    """A SecretStr that reaches a log call by mistake prints as stars."""
    setup_logging("DEBUG", "json")
    secret = SecretStr("s3cr3t-value")
    logging.getLogger("relay.x").debug("config %s", {"password": secret}, extra={"pw": secret})
    assert "s3cr3t-value" not in stderr.getvalue()


def test_formatter_without_setup() -> None:
    record = logging.makeLogRecord(
        {"name": "n", "levelname": "INFO", "msg": "m %s", "args": ("x",)}
    )
    assert json.loads(JsonFormatter().format(record))["message"] == "m x"


def test_console_format_escapes_control_characters(stderr: Stderr) -> None:
    """A name an engine user chose, inside an error, cannot forge a second console line."""
    setup_logging("INFO", "console")
    logging.getLogger("relay.x").warning("bad name %r: %s", "n", "net\nwork\x1b[31m\tred\x85")
    (line,) = stderr.getvalue().splitlines()
    assert line.endswith("relay.x: bad name 'n': net\\nwork\\x1b[31m\tred\\x85"), line


# -- bursts: the pure logic, on a scripted clock ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def burst_log(clock: Clock, interval: float = 60.0) -> tuple[BurstLog[str], list[Summary[str]]]:
    summaries: list[Summary[str]] = []
    return BurstLog(interval, summaries.append, clock=clock, timer=False), summaries


def test_first_of_a_burst_is_written_repeats_are_counted_into_one_summary() -> None:
    clock = Clock()
    bursts, summaries = burst_log(clock)
    assert bursts.hit("a", detail="a1")
    clock.now += 1
    assert [bursts.hit("a", detail=f"a{i}") for i in range(2, 7)] == [False] * 5
    assert bursts.hit("b", detail="b1")  # another kind of line: its own burst
    assert bursts.seconds_to_due() == 59.0
    clock.now += 58.9
    bursts.flush()
    assert summaries == []  # not before the interval is over
    clock.now += 0.1
    bursts.flush()
    assert summaries == [Summary("a", 5, 60.0, "a6")]
    assert bursts.seconds_to_due() is None


def test_a_burst_ends_after_a_quiet_interval_and_the_next_one_is_written_at_once() -> None:
    clock = Clock()
    bursts, summaries = burst_log(clock, interval=10)
    assert bursts.hit("a")
    clock.now += 9.9
    assert not bursts.hit("a")  # within the interval: the same burst
    clock.now += 0.1
    bursts.flush()
    assert [s.count for s in summaries] == [1]
    clock.now += 5
    assert not bursts.hit("a")  # less than an interval after the summary: still the burst
    clock.now += 5
    bursts.flush()
    assert [s.count for s in summaries] == [1, 1]
    clock.now += 10  # a whole interval without a repeat: the burst is over
    bursts.flush()
    assert bursts.hit("a", detail="again")
    assert [s.count for s in summaries] == [1, 1]


def test_a_long_burst_writes_one_line_per_interval_with_every_repeat_counted() -> None:
    clock = Clock()
    bursts, summaries = burst_log(clock, interval=60)
    written = 0
    for _ in range(3600):  # one repeat a second for an hour
        written += bursts.hit("a")
        clock.now += 1
        bursts.flush()
    clock.now += 60
    bursts.flush()
    assert written == 1
    assert len(summaries) == 60
    assert written + sum(s.count for s in summaries) == 3600
    assert all(s.seconds == 60 for s in summaries)


def test_counts_weigh_each_hit_and_everything_owed_is_flushed_on_demand() -> None:
    clock = Clock()
    bursts, summaries = burst_log(clock)
    assert bursts.hit("a", 100)
    assert not bursts.hit("a", 250, "x") and not bursts.hit("a", 1, "y")
    clock.now += 3
    bursts.flush(everything=True)
    assert summaries == [Summary("a", 251, 3.0, "y")]
    bursts.flush(everything=True)
    assert len(summaries) == 1


def test_beyond_the_tracked_kinds_lines_pass_rather_than_evict_a_counted_burst() -> None:
    clock = Clock()
    bursts, summaries = burst_log(clock)
    assert bursts.hit("held") and not bursts.hit("held")
    assert all(bursts.hit(f"k{i}") for i in range(MAX_KEYS - 1))
    assert bursts.hit("k-new") and bursts.hit("k-new")  # untracked: every one written
    clock.now += 60  # the idle kinds can go now; the held one is summarized
    assert bursts.hit("k-newer") and not bursts.hit("k-newer")
    bursts.flush(everything=True)
    assert sorted(s.key for s in summaries) == ["held", "k-newer"]


def test_the_timer_writes_a_due_summary_by_itself() -> None:
    """The background thread, for real: a short interval so the wait is brief."""
    summaries: list[Summary[str]] = []
    bursts: BurstLog[str] = BurstLog(0.2, summaries.append)
    assert bursts.hit("a") and not bursts.hit("a", 3)
    wait_for(lambda: summaries, 10, interval=0.01, message="the summary")
    assert [(s.key, s.count) for s in summaries] == [("a", 3)]
    assert 0.2 <= summaries[0].seconds < 5


# -- client libraries' lines through setup_logging -----------------------------------------------


def aiokafka_refused(log: logging.Logger, port: int) -> None:
    # The template aiokafka logs on every failed connect.
    log.error(
        'Unable connect to "%s": %s',
        f"127.0.0.1:{port}",
        ConnectionRefusedError(111, "Connection refused"),
    )


def burst_filter() -> BurstFilter:
    (handler,) = logging.getLogger().handlers
    (bursts,) = [f for f in handler.filters if isinstance(f, BurstFilter)]
    return bursts


def test_client_library_lines_are_one_per_burst_with_the_count(stderr: Stderr) -> None:
    setup_logging("INFO", "json")
    kafka = logging.getLogger("aiokafka")
    for port in (9092, 9092, 9093, 9092, 9092, 9092):
        aiokafka_refused(kafka, port)
    logging.getLogger("aiokafka.conn").error("Unable connect to %s", "x")  # another logger
    for _ in range(3):
        logging.getLogger("relay.sink.kafka").error("the relay's own: %s", "never held back")
    lines = [json.loads(ln) for ln in stderr.getvalue().splitlines()]
    assert [(ln["logger"], ln["message"]) for ln in lines] == [
        ("aiokafka", 'Unable connect to "127.0.0.1:9092": [Errno 111] Connection refused'),
        ("aiokafka.conn", "Unable connect to x"),
    ] + [("relay.sink.kafka", "the relay's own: never held back")] * 3

    burst_filter().flush(everything=True)  # what the exit (or the interval's end) writes
    (summary,) = [json.loads(ln) for ln in stderr.getvalue().splitlines()[len(lines) :]]
    assert summary["logger"] == "aiokafka" and summary["level"] == "error"
    assert summary["suppressed"] == 5
    assert re.fullmatch(
        r"5 more like this in the last \d+s, suppressed; the last: Unable connect to "
        r'"127\.0\.0\.1:9092": \[Errno 111\] Connection refused',
        summary["message"],
    ), summary["message"]


def test_the_relays_own_lines_marked_burst_are_one_per_burst_too(stderr: Stderr) -> None:
    # A hostile engine can send a flood of malformed lines: one line, then a count.
    setup_logging("INFO", "json")
    pipeline = logging.getLogger("relay.pipeline")
    for i in range(4):
        pipeline.warning("malformed line from the engine: %s", f"#{i}", extra={"burst": True})
    pipeline.warning("not marked: %s", "always written")
    lines = [json.loads(ln) for ln in stderr.getvalue().splitlines()]
    assert [ln["message"] for ln in lines] == [
        "malformed line from the engine: #0",
        "not marked: always written",
    ]
    burst_filter().flush(everything=True)
    (summary,) = [json.loads(ln) for ln in stderr.getvalue().splitlines()[len(lines) :]]
    assert summary["logger"] == "relay.pipeline" and summary["suppressed"] == 3
    assert summary["message"].endswith("the last: malformed line from the engine: #3")


def test_held_back_lines_of_a_replaced_set_up_are_written_before_it_goes(
    stderr: Stderr,
) -> None:
    setup_logging("WARNING", "console")
    for _ in range(4):
        logging.getLogger("paho").warning("Caught exception in %s", "on_connect")
    setup_logging("INFO", "json")  # the CLI sets up twice: before and after reading settings
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("paho: Caught exception in on_connect")
    assert "paho: 3 more like this in the last 0s, suppressed; the last: Caught" in lines[1]


def test_a_record_with_bad_arguments_is_held_back_like_any_other(stderr: Stderr) -> None:
    setup_logging("INFO", "json")
    for _ in range(3):
        logging.getLogger("kafka").error("wrong %d", "not a number")
    burst_filter().flush(everything=True)
    # The first goes to the handler (which reports the bad call); the rest are one summary.
    assert "Logging error" in stderr.getvalue()
    summaries = [json.loads(ln) for ln in stderr.getvalue().splitlines() if '"suppressed":2' in ln]
    assert [s["logger"] for s in summaries] == ["kafka"]


# -- dead letters: one line per burst per sink and reason ---------------------------------------


def dead_letter_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.outbox"]
    caplog.clear()
    return lines


def test_an_overflow_burst_is_one_line_then_one_count_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    events = sample_events(1902)
    room = sum(len(e.json()) for e in events[:3])
    worker, spool, dl, _ = make_worker(ScriptedSink(), tmp_path, max_bytes=room)
    worker._dead_letter_log = DeadLetterLog(worker.name, clock=clock, timer=False)
    feed(worker, spool, events)
    assert worker.held_events == 3
    assert dead_letter_lines(caplog) == [
        f"sink scripted: event {events[3].id} dead-lettered (overflow): spool full"
    ]
    clock.now += DEAD_LETTER_LOG_INTERVAL
    worker._dead_letter_log.bursts.flush()
    assert dead_letter_lines(caplog) == [
        "sink scripted: 1898 more event(s) dead-lettered (overflow: spool full) in the last 10s"
    ]
    clock.now += DEAD_LETTER_LOG_INTERVAL  # an interval without one: the burst is over
    worker._dead_letter_log.bursts.flush()
    assert dead_letter_lines(caplog) == []
    more = sample_events(2)
    feed(worker, spool, more)
    assert dead_letter_lines(caplog) == [
        f"sink scripted: event {more[0].id} dead-lettered (overflow): spool full"
    ]
    assert len(dead_letters(dl.path)) == 1901  # the file has every one


async def test_permanent_dead_letters_are_logged_per_reason_once_per_burst(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    # Every send refused, however the worker splits its batches: all 30 are dead-lettered.
    sink = ScriptedSink([PermanentSinkError("HTTP 422", sink="scripted")] * 100)
    events = sample_events(35)
    room = sum(len(e.json()) for e in events[:30])
    worker, spool, dl, _ = make_worker(sink, tmp_path, max_bytes=room)
    worker._dead_letter_log = DeadLetterLog(worker.name, clock=clock, timer=False)
    feed(worker, spool, events)
    await drain(worker)
    overflow, permanent = dead_letter_lines(caplog)
    assert overflow == f"sink scripted: event {events[30].id} dead-lettered (overflow): spool full"
    # The first refused, at once: one event or the batch it was sent in.
    first = re.fullmatch(
        rf"sink scripted: (?:event {events[0].id}|(\d+) events) dead-lettered \(permanent\)"
        rf"(?:, the first {events[0].id})?: \[scripted\] HTTP 422",
        permanent,
    )
    assert first, permanent
    in_first = int(first.group(1) or 1)
    clock.now += 4
    worker._dead_letter_log.bursts.flush(everything=True)
    assert sorted(dead_letter_lines(caplog)) == [
        f"sink scripted: {30 - in_first} more event(s) dead-lettered (permanent: [scripted] "
        "HTTP 422) in the last 4s",
        "sink scripted: 4 more event(s) dead-lettered (overflow: spool full) in the last 4s",
    ]
    assert len(dead_letters(dl.path)) == 35
