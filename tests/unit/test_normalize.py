"""Normalization against messages recorded from real engines (20.10 / API 1.41, 28.5 / 1.51)."""

from __future__ import annotations

import msgspec
import pytest

from relay.normalize import MalformedEventError, Normalizer, event_id, format_time, since_param
from relay.schema import Engine, Event
from tests.contract import fixture_lines

ENGINE = Engine(id="3VLZ:4UVA", name="vm", version="20.10.24", api_version="1.41")
RECORDINGS = ["engine-20.10.24-events.jsonl", "engine-28.5.2-events.jsonl"]


def norm(line: bytes | str, **kw: object) -> dict:  # type: ignore[type-arg]
    n = Normalizer(ENGINE, **kw)  # type: ignore[arg-type]
    raw = line.encode() if isinstance(line, str) else line
    return msgspec.json.decode(Event(n.normalize(raw)).json())  # type: ignore[no-any-return]


@pytest.mark.parametrize("recording", RECORDINGS)
def test_every_recorded_message_normalizes(recording: str) -> None:
    lines = fixture_lines(recording)
    n = Normalizer(ENGINE)
    out = [msgspec.json.decode(Event(n.normalize(line)).json()) for line in lines]
    assert len(out) == len(lines)
    for raw_line, ce in zip(lines, out, strict=True):
        raw = msgspec.json.decode(raw_line)
        assert ce["specversion"] == "1.0"
        assert ce["data"]["time_nano"] == raw["timeNano"]
        assert ce["data"]["type"] == raw["Type"]
        assert raw["Action"].startswith(ce["data"]["action"])
        assert ce["type"] == f"dev.docker-event-relay.{raw['Type']}.{ce['data']['action']}"
        assert ce["source"] == "urn:docker:engine:3VLZ:4UVA"
        # Nothing of the engine's attributes is lost: attributes + labels == the original.
        merged = {**ce["data"]["actor"]["attributes"], **ce["data"]["actor"]["labels"]}
        assert merged == raw["Actor"]["Attributes"]
    # Ids are unique within a recording.
    assert len({ce["id"] for ce in out}) == len(out)


@pytest.mark.parametrize(
    ("recording", "expected"),
    [
        (
            "engine-20.10.24-events.jsonl",
            {"container": 0, "network": 0, "volume": 0, "image": 1982256, "builder": 0},
        ),
        (
            "engine-28.5.2-events.jsonl",
            {"container": 0, "network": 0, "volume": 0, "image": 1982256, "builder": 0},
        ),
    ],
)
def test_prune_events_carry_reclaimed_bytes_as_integers(
    recording: str, expected: dict[str, int]
) -> None:
    n = Normalizer(ENGINE)
    prunes = {}
    for line in fixture_lines(recording):
        ce = n.normalize(line)
        if ce.data.action == "prune":
            raw = msgspec.json.decode(line)
            assert ce.data.reclaimed_bytes == int(raw["Actor"]["Attributes"]["reclaimed"])
            assert ce.data.actor.labels == {}
            assert ce.subject is None
            prunes[ce.data.type] = ce.data.reclaimed_bytes
    assert set(prunes) == set(expected)
    assert prunes["image"] == expected["image"]


def test_reclaimed_bytes_from_the_measured_scenario() -> None:
    line = (
        '{"Type":"volume","Action":"prune","Actor":{"ID":"","Attributes":'
        '{"reclaimed":"5242880"}},"scope":"local","time":1,"timeNano":1000000001}'
    )
    ce = norm(line)
    assert ce["data"]["reclaimed_bytes"] == 5242880
    assert ce["data"]["action"] == "prune"
    assert "subject" not in ce


def test_labels_are_kept_apart_from_attributes() -> None:
    line = next(
        line
        for line in fixture_lines("engine-28.5.2-events.jsonl")
        if b'"Action":"die"' in line and b"com.example.owner" in line
    )
    ce = norm(line)
    actor = ce["data"]["actor"]
    assert actor["labels"] == {"app": "web", "com.example.owner": "ops"}
    assert set(actor["attributes"]) == {"exitCode", "execDuration", "image", "name"}
    assert ce["subject"] == actor["name"] == actor["attributes"]["name"]


def test_health_status_detail_is_split() -> None:
    line = next(line for line in fixture_lines() if b"health_status: healthy" in line)
    ce = norm(line)
    assert ce["data"]["action"] == "health_status"
    assert ce["data"]["action_detail"] == "healthy"
    assert ce["type"].endswith(".container.health_status")


@pytest.mark.parametrize(
    ("mode", "detail"), [("full", "sh -c echo hi"), ("program", "sh"), ("none", None)]
)
def test_exec_command_line_is_kept_per_setting(mode: str, detail: str | None) -> None:
    line = next(line for line in fixture_lines() if b'"exec_start: sh -c echo hi"' in line)
    ce = norm(line, exec_command=mode)
    assert ce["data"]["action"] == "exec_start"
    assert ce["data"].get("action_detail") == detail
    # The id hashes the engine's full action whatever is kept.
    raw = msgspec.json.decode(line)
    assert ce["id"] == event_id(
        ENGINE.id, raw["timeNano"], "container", raw["Action"], raw["Actor"]["ID"]
    )


def test_image_create_of_api_151_and_daemon_reload() -> None:
    lines = fixture_lines("engine-28.5.2-events.jsonl")
    create = next(line for line in lines if b'"Type":"image","Action":"create"' in line)
    ce = norm(create)
    assert ce["data"]["actor"]["labels"] == {"app": "web", "com.example.owner": "ops"}
    reload = norm(next(line for line in lines if b'"Action":"reload"' in line))
    assert reload["data"]["type"] == "daemon"
    assert reload["data"]["actor"]["labels"] == {}
    assert "registry-mirrors" in reload["data"]["actor"]["attributes"]


def test_unknown_types_and_actions_pass_through() -> None:
    line = (
        '{"Type":"gadget","Action":"teleport: far","Actor":{"ID":"g1","Attributes":'
        '{"name":"g","weird":7}},"scope":"swarm","time":1,"timeNano":1700000000123456789}'
    )
    ce = norm(line)
    assert ce["type"] == "dev.docker-event-relay.gadget.teleport"
    assert ce["data"]["action_detail"] == "far"
    assert ce["data"]["scope"] == "swarm"
    assert ce["data"]["actor"]["attributes"] == {"name": "g", "weird": "7"}
    assert ce["time"] == "2023-11-14T22:13:20.123456789Z"


def test_legacy_fields_are_ignored_and_ids_are_deterministic() -> None:
    base = (
        '{"Type":"container","Action":"start","Actor":{"ID":"c1","Attributes":'
        '{"name":"web"}},"scope":"local","time":1,"timeNano":5}'
    )
    legacy = base[:-1] + ',"status":"start","id":"c1","from":"busybox"}'
    assert norm(base) == norm(legacy)
    assert norm(base)["id"] == norm(base)["id"]
    other_engine = Normalizer(Engine(id="X", name="", version="", api_version=""))
    assert Event(other_engine.normalize(base.encode())).id != norm(base)["id"]


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"{",
        b"[]",
        b"42",
        b'{"Type":"container"}',
        b'{"Action":"x","timeNano":1}',
        b'{"Type":"x","Action":"y","timeNano":"soon"}',
        b"\xff\xfe",
    ],
)
def test_malformed_lines_raise_one_error_type_with_the_raw_line(line: bytes) -> None:
    with pytest.raises(MalformedEventError) as info:
        Normalizer(ENGINE).normalize(line)
    assert info.value.raw == line


def test_time_formatting_and_since_parameter() -> None:
    assert format_time(1796010617661166882) == "2026-11-30T03:50:17.661166882Z"
    assert format_time(5) == "1970-01-01T00:00:00.000000005Z"
    # Built from the integer: a float would round the nanoseconds away.
    assert since_param(1796010617661166882) == "1796010617.661166882"
    assert since_param(1796010617000000001) == "1796010617.000000001"


def test_gap_marker_fits_the_schema() -> None:
    n = Normalizer(ENGINE)
    ce = msgspec.json.decode(Event(n.gap(10, 20, "why")).json())
    assert ce["type"] == "dev.docker-event-relay.relay.gap"
    assert ce["data"]["actor"]["attributes"] == {
        "since_nano": "10",
        "resumed_at_nano": "20",
        "reason": "why",
    }
    assert ce["data"]["time_nano"] == 20


def test_line_framing_whatever_the_read_sizes() -> None:
    from relay.engine import LineFramer

    lines = fixture_lines()
    stream = b"".join(line + b"\n" for line in lines)
    for size in (1, 7, 100, 333, 4096, len(stream)):
        framer = LineFramer()
        out: list[bytes] = []
        for i in range(0, len(stream), size):
            out += framer.feed(stream[i : i + size])
        assert out == lines, f"read size {size}"


@pytest.mark.parametrize(
    ("system_time", "expected"),
    [
        ("2026-11-30T04:54:02.123456789Z", 1796014442123456789),
        ("2026-11-30T04:54:02.5Z", 1796014442500000000),
        ("2026-11-30T04:54:02Z", 1796014442000000000),
        ("2026-11-30T05:54:02.000000001+01:00", 1796014442000000001),
    ],
)
def test_engine_clock_from_system_time(system_time: str, expected: int) -> None:
    from relay.engine import engine_now

    assert engine_now({"SystemTime": system_time}) == expected


def test_engine_clock_falls_back_to_ours() -> None:
    import time

    from relay.engine import engine_now

    before = time.time_ns()
    assert before <= engine_now({"SystemTime": "yesterday"}) <= time.time_ns()
    assert before <= engine_now({}) <= time.time_ns()
