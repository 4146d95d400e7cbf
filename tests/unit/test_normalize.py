"""Normalization against messages recorded from real engines (Docker 20.10 / API 1.41, 28.5 /
1.51, Podman 4.3.1's Docker-compatible API), and what no engine sends (hostile lines)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from relay.deadletter import DeadLetter
from relay.engine import Connected
from relay.metrics import Metrics
from relay.normalize import (
    ENGINE_KEYS,
    MAX_TIME_NANO,
    MAX_VALUE_DEPTH,
    Flavour,
    MalformedEventError,
    Normalizer,
    event_id,
    format_time,
    since_param,
)
from relay.pipeline import Pipeline
from relay.router import RouteTable
from relay.schema import Engine, Event
from relay.settings import SchemaSettings
from relay.spool import Spool
from tests.contract import fixture_lines

ENGINE = Engine(id="3VLZ:4UVA", name="vm", version="20.10.24", api_version="1.41")
RECORDINGS = ["engine-20.10.24-events.jsonl", "engine-28.5.2-events.jsonl"]
PODMAN = "podman-4.3.1-events.jsonl"
CORPORA: dict[Flavour, list[str]] = {"docker": RECORDINGS, "podman": [PODMAN]}
# The labels the recording scenarios put on their containers and images (`io.buildah.version`
# is the label of Podman's pause image, which its pod's infra container inherits).
RECORDED_LABELS = frozenset({"app", "com.example.owner", "io.buildah.version"})


def norm(line: bytes | str, **kw: object) -> dict:  # type: ignore[type-arg]
    n = Normalizer(ENGINE, **kw)  # type: ignore[arg-type]
    raw = line.encode() if isinstance(line, str) else line
    return msgspec.json.decode(Event(n.normalize(raw)).json())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("recording", "flavour"), [(r, "docker") for r in RECORDINGS] + [(PODMAN, "podman")]
)
def test_every_recorded_message_normalizes(recording: str, flavour: Flavour) -> None:
    lines = fixture_lines(recording)
    n = Normalizer(ENGINE, flavour=flavour)
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


# -- attributes and labels: the engine's own keys per type and action -------------------------


def _engine_keys_seen(flavour: Flavour) -> dict[tuple[str, str], set[str]]:
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for recording in CORPORA[flavour]:
        for line in fixture_lines(recording):
            raw = msgspec.json.decode(line)
            action = raw["Action"].partition(": ")[0]
            keys = set(raw["Actor"]["Attributes"]) - RECORDED_LABELS
            seen[raw["Type"], action] |= keys
    return seen


@pytest.mark.parametrize("flavour", ["docker", "podman"])
def test_the_table_of_engine_keys_is_the_one_the_recordings_show(flavour: Flavour) -> None:
    table = ENGINE_KEYS[flavour]
    seen = _engine_keys_seen(flavour)
    checked = 0
    for (type_, action), keys in sorted(seen.items()):
        if type_ not in table or action == "prune":
            continue
        # Every labelled action the engine was seen sending is in the table, with exactly the
        # keys it set (across the versions recorded), but for the keys later versions add.
        assert action in table[type_], f"{flavour}: {type_} {action} is not in the table"
        allowed = table[type_][action]
        later = {"network", "error"} if flavour == "podman" else set()
        assert allowed - later == keys, f"{flavour}: {type_} {action}"
        checked += 1
    assert checked == {"docker": 25, "podman": 20}[flavour]


@pytest.mark.parametrize(
    ("recording", "flavour", "with_labels"),
    [(RECORDINGS[0], "docker", 40), (RECORDINGS[1], "docker", 42), (PODMAN, "podman", 12)],
)
def test_every_recorded_label_is_a_label_and_nothing_else_is(
    recording: str, flavour: Flavour, with_labels: int
) -> None:
    n = Normalizer(ENGINE, flavour=flavour)
    labelled = 0
    for line in fixture_lines(recording):
        raw = msgspec.json.decode(line)
        actor = n.normalize(line).data.actor
        recorded = raw["Actor"]["Attributes"]
        labels = {k: v for k, v in recorded.items() if k in RECORDED_LABELS}
        if raw["Type"] not in ("container", "image"):
            # Network, volume, daemon... events carry no labels: all is the engine's.
            labels = {}
        assert actor.labels == labels, line
        assert actor.attributes == {k: v for k, v in recorded.items() if k not in labels}, line
        labelled += bool(labels)
    assert labelled == with_labels


def _container(action: str, attributes: dict[str, object]) -> bytes:
    return msgspec.json.encode(
        {
            "Type": "container",
            "Action": action,
            "Actor": {"ID": "c1", "Attributes": {"image": "busybox", "name": "web", **attributes}},
            "scope": "local",
            "timeNano": 1796010617661166882,
        }
    )


def test_a_label_named_like_a_key_of_another_action_is_a_label() -> None:
    # The engine sets exitCode on die only: on start it can only be the container's label.
    actor = norm(_container("start", {"exitCode": "mine", "signal": "x", "app": "web"}))["data"][
        "actor"
    ]
    assert actor["attributes"] == {"image": "busybox", "name": "web"}
    assert actor["labels"] == {"exitCode": "mine", "signal": "x", "app": "web"}
    die = norm(_container("die", {"exitCode": "0", "signal": "x"}))["data"]["actor"]
    assert die["attributes"] == {"image": "busybox", "name": "web", "exitCode": "0"}
    assert die["labels"] == {"signal": "x"}
    # exec_start: the action's detail is cut off before the table is asked.
    exec_start = norm(_container("exec_start: sh -c x", {"execID": "e1", "exitCode": "1"}))
    assert exec_start["data"]["actor"]["attributes"] == {
        "image": "busybox",
        "name": "web",
        "execID": "e1",
    }
    assert exec_start["data"]["actor"]["labels"] == {"exitCode": "1"}


def test_an_action_missing_from_the_table_falls_back_to_every_key_of_its_type() -> None:
    actor = norm(_container("teleport", {"exitCode": "0", "height": "5", "app": "web"}))["data"][
        "actor"
    ]
    assert actor["attributes"] == {
        "image": "busybox",
        "name": "web",
        "exitCode": "0",
        "height": "5",
    }
    assert actor["labels"] == {"app": "web"}


def test_podman_flavour_uses_podmans_keys() -> None:
    line = _container("start", {"containerExitCode": "0", "podId": "", "app": "web"})
    docker = norm(line)["data"]["actor"]
    assert docker["labels"] == {"containerExitCode": "0", "podId": "", "app": "web"}
    podman = norm(line, flavour="podman")["data"]["actor"]
    assert podman["attributes"] == {
        "image": "busybox",
        "name": "web",
        "containerExitCode": "0",
        "podId": "",
    }
    assert podman["labels"] == {"app": "web"}
    # Podman sets exitCode on die only, as Docker does.
    die = norm(_container("die", {"exitCode": "3"}), flavour="podman")["data"]["actor"]
    assert die["attributes"]["exitCode"] == "3"
    assert norm(_container("init", {"exitCode": "3"}), flavour="podman")["data"]["actor"][
        "labels"
    ] == {"exitCode": "3"}


# -- hostile lines: malformed, never a crash -------------------------------------------------


def _message(**fields: object) -> bytes:
    message: dict[str, object] = {
        "Type": "container",
        "Action": "start",
        "Actor": {"ID": "c1", "Attributes": {"name": "web"}},
        "scope": "local",
        "timeNano": 1796010617661166882,
    }
    message.update(fields)
    return msgspec.json.encode(message)


def _malformed(line: bytes, **kw: object) -> str:
    with pytest.raises(MalformedEventError) as info:
        Normalizer(ENGINE, **kw).normalize(line)  # type: ignore[arg-type]
    assert info.value.raw == line
    return str(info.value)


@pytest.mark.parametrize("time_nano", [10**30, MAX_TIME_NANO + 1, 2**64, -5, 0])
def test_a_time_out_of_the_engines_range_is_malformed(time_nano: int) -> None:
    # 10**30 overflowed time.gmtime inside format_time.
    reason = _malformed(_message(timeNano=time_nano))
    assert "timeNano" in reason


def test_the_latest_time_an_engine_can_send_formats() -> None:
    ce = norm(_message(timeNano=MAX_TIME_NANO))
    assert ce["time"] == "2262-04-11T23:47:16.854775807Z"
    assert ce["data"]["time_nano"] == MAX_TIME_NANO


@pytest.mark.parametrize("depth", [MAX_VALUE_DEPTH + 1, 900, 5000, 100_000])
@pytest.mark.parametrize(("open_", "inner", "close"), [("[", "", "]"), ('{"a":', "1", "}")])
def test_attributes_nested_too_deeply_are_malformed(
    depth: int, open_: str, inner: str, close: str
) -> None:
    # 5,000 levels raised RecursionError.
    value = open_ * depth + inner + close * depth
    line = _message().replace(b'"name":"web"', b'"name":"web","deep":' + value.encode())
    reason = _malformed(line)
    assert "nest" in reason


def test_nesting_within_the_limit_is_kept_as_json_text() -> None:
    value = "[" * MAX_VALUE_DEPTH + "]" * MAX_VALUE_DEPTH
    line = _message().replace(b'"name":"web"', b'"name":"web","deep":' + value.encode())
    assert norm(line)["data"]["actor"]["labels"]["deep"] == value


def test_deep_nesting_outside_the_attributes_is_malformed_too() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    _malformed(_message()[:-1] + b',"extra":' + deep + b"}")
    _malformed(_message()[:-1].replace(b'"Type":"container"', b'"Type":' + deep) + b"}")


def test_non_string_attribute_values_are_kept_as_their_json_text() -> None:
    odd = {"n": 7, "big": 10**30, "t": True, "z": None, "f": 1.5, "l": [1, "a"], "o": {"k": "v"}}
    actor = norm(_message(Type="gadget", Actor={"ID": "g", "Attributes": odd}))["data"]["actor"]
    assert actor["attributes"] == {
        "n": "7",
        "big": "1000000000000000000000000000000",
        "t": "true",
        "z": "null",
        "f": "1.5",
        "l": '[1,"a"]',
        "o": '{"k":"v"}',
    }


def test_null_attributes_are_empty() -> None:
    # Go writes a nil map as null.
    ce = norm(_message(Type="gadget", Actor={"ID": "g", "Attributes": None}))
    assert ce["data"]["actor"] == {"id": "g", "attributes": {}, "labels": {}}


def _prune(reclaimed: object) -> bytes:
    return _message(
        Type="image", Action="prune", Actor={"ID": "", "Attributes": {"reclaimed": reclaimed}}
    )


@pytest.mark.parametrize(
    "reclaimed",
    [
        "-5",
        "abc",
        "",
        " 5",
        "5 ",
        "+5",
        "1_000",
        "\u0663",
        "0x10",
        "1e3",
        "5.0",
        "18446744073709551616",
        "9" * 5000,
        -5,
        1.5,
    ],
)
def test_reclaimed_that_is_not_a_byte_count_is_malformed(reclaimed: object) -> None:
    # "-5" made the Prometheus counter raise ValueError later.
    assert "reclaimed" in _malformed(_prune(reclaimed))


@pytest.mark.parametrize(
    ("reclaimed", "expected"),
    [("0", 0), ("007", 7), ("18446744073709551615", 2**64 - 1), (1982256, 1982256)],
)
def test_reclaimed_byte_counts(reclaimed: object, expected: int) -> None:
    assert norm(_prune(reclaimed))["data"]["reclaimed_bytes"] == expected


def test_a_prune_without_reclaimed_has_no_reclaimed_bytes() -> None:
    # Podman's prune events carry no count: absent, not 0 (which would claim nothing was freed).
    ce = norm(
        _message(Type="volume", Action="prune", Actor={"ID": "", "Attributes": {"name": "v2"}})
    )
    assert "reclaimed_bytes" not in ce["data"]


@pytest.mark.parametrize(
    "line",
    [
        _message().replace(b'"web"', b'"w\\ud800b"'),
        _message().replace(b'"c1"', b'"\\udfff"'),
        _message().replace(b'"name"', b'"\\ud800"'),
        _message().replace(b'"web"', b'"w\xed\xa0\x80b"'),
        _message().replace(b'"web"', b'"w\xffb"'),
    ],
)
def test_lone_surrogates_and_invalid_utf8_are_malformed(line: bytes) -> None:
    _malformed(line)


def test_an_escaped_surrogate_pair_is_a_character() -> None:
    ce = norm(_message().replace(b'"web"', b'"w\\ud83d\\ude00b"'))
    assert ce["subject"] == "w\U0001f600b"


def test_metrics_take_any_reclaimed_count() -> None:
    metrics = Metrics()
    for reclaimed in (None, 0, 5, -5, 2**200):
        metrics.read("image", "prune", reclaimed)
    value = metrics.registry.get_sample_value("relay_reclaimed_bytes_total", {"type": "image"})
    assert value == float(5 + 2**64)
    assert (
        metrics.registry.get_sample_value(
            "relay_events_read_total", {"type": "image", "action": "prune"}
        )
        == 5
    )


def test_the_pipeline_dead_letters_a_line_whatever_the_normalizer_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "spool.db", metrics)
    try:
        spool.open([])
        dead = DeadLetter(tmp_path / "dl.jsonl", spool, metrics)
        pipeline = Pipeline(asyncio.Queue(), RouteTable([]), spool, dead, metrics, SchemaSettings())
        pipeline._handle(Connected(ENGINE))
        assert pipeline.normalizer is not None
        lines = fixture_lines()[:3]
        real = pipeline.normalizer.normalize

        def failing(line: bytes) -> object:
            # A bug in the normalizer, which no known input reaches any more.
            if line == lines[1]:
                raise RuntimeError("boom")
            return real(line)

        monkeypatch.setattr(pipeline.normalizer, "normalize", failing)
        pipeline.dispatch(
            [lines[0], lines[1], b'{"Type":"x","Action":"y","timeNano":1e999}', lines[2]]
        )
        assert metrics.registry.get_sample_value("relay_events_malformed_total") == 2
        assert pipeline.seq == 2
        assert pipeline.cursor.time_nano == msgspec.json.decode(lines[2])["timeNano"]
        records = [
            msgspec.json.decode(r) for r in (tmp_path / "dl.jsonl").read_bytes().splitlines()
        ]
        assert [(r["reason"], r["error_type"], r["raw"].encode()) for r in records] == [
            ("malformed", "MalformedEventError", lines[1]),
            ("malformed", "MalformedEventError", b'{"Type":"x","Action":"y","timeNano":1e999}'),
        ]
        assert records[0]["error"] == "the normalizer failed: RuntimeError: boom"
    finally:
        spool.close()
