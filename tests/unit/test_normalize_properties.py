"""Property: for any line at all, the normalizer returns an event that validates against the
committed JSON Schema (as UTF-8 JSON, readable back the way the spool reads it, and countable
by the metrics), or raises `MalformedEventError` carrying the line; never anything else.

Inputs: arbitrary bytes, arbitrary JSON, engine-shaped messages with arbitrary field values
(odd Unicode, huge integers, wrong types), deep nesting, and recorded engine lines with bytes
spliced in. Runs are derandomized and keep no example database, so CI sees the same examples
every time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.metrics import Metrics
from relay.normalize import MAX_RECLAIMED, MAX_TIME_NANO, MalformedEventError, Normalizer
from relay.schema import Engine, Event
from tests.contract import fixture_lines

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "event-v1.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
ENGINE = Engine(id="3VLZ:4UVA", name="vm", version="28.5.2", api_version="1.51", node_name="n")
NORMALIZERS = [
    Normalizer(ENGINE),
    Normalizer(ENGINE, flavour="podman", exec_command="full"),
    Normalizer(ENGINE, type_prefix="x.y.", exec_command="none"),
]
METRICS = Metrics()
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")
RECORDED = [
    line
    for name in (
        "engine-20.10.24-events.jsonl",
        "engine-28.5.2-events.jsonl",
        "podman-4.3.1-events.jsonl",
    )
    for line in fixture_lines(name)
]

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(line: bytes) -> bool:
    """The property, for every normalizer; True when the line made an event."""
    outcomes = set()
    for normalizer in NORMALIZERS:
        try:
            ce = normalizer.normalize(line)
        except MalformedEventError as exc:
            assert exc.raw == line
            assert str(exc).startswith("not an engine event: ")
            outcomes.add(False)
            continue
        body = Event(ce).json()
        doc = json.loads(body.decode("utf-8"))
        VALIDATOR.validate(doc)
        assert Event.from_json(body, 1).ce == ce
        assert RFC3339.fullmatch(ce.time), ce.time
        assert 0 < ce.data.time_nano <= MAX_TIME_NANO
        reclaimed = ce.data.reclaimed_bytes
        assert reclaimed is None or 0 <= reclaimed <= MAX_RECLAIMED
        METRICS.read(ce.data.type, ce.data.action, reclaimed)
        outcomes.add(True)
    # The flavour and the settings decide how an event looks, never whether it is one.
    assert len(outcomes) == 1
    return outcomes.pop()


# -- strategies -------------------------------------------------------------------------------

# Mostly any text; now and then controls, format and private-use characters, and strings
# that are trouble somewhere (a lone surrogate, which json.dumps escapes as \udXXX, spoils the
# whole line: rare enough here that most messages still make events).
odd_text = st.one_of(
    st.text(max_size=20),
    st.text(max_size=20),
    st.text(max_size=20),
    st.text(st.characters(codec=None, categories=["Cc", "Cf", "Co", "Zl", "Zp"]), max_size=6),
    st.sampled_from(
        ["", "\x00", "\x1b[2J", "\u2028", "\ufeff", "\U0001f600", "$SYS", "#/+", "\ud800", "\udfff"]
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
TYPES = ["container", "image", "network", "volume", "daemon", "plugin", "builder", "pod", "relay"]
ACTIONS = [
    "start",
    "die",
    "prune",
    "kill",
    "rename",
    "commit",
    "exec_create",
    "exec_start",
    "exec_die",
    "health_status",
    "create",
    "tag",
    "remove",
]
KEYS = ["name", "image", "exitCode", "execID", "reclaimed", "containerExitCode", "podId", "app"]
reclaimed_texts = st.one_of(
    st.sampled_from(["-5", "0", "5", "", " 5", "1_000", "\u0663", "1e3", "18446744073709551616"]),
    st.integers().map(str),
)
time_nanos = st.one_of(
    st.integers(min_value=1, max_value=MAX_TIME_NANO),
    st.integers(min_value=1, max_value=MAX_TIME_NANO),
    st.integers(),
    st.sampled_from([0, -1, 1, MAX_TIME_NANO, MAX_TIME_NANO + 1, 10**30, 2**64]),
)
names = st.one_of(st.sampled_from(TYPES + ACTIONS), st.text(min_size=1, max_size=20), odd_text)
actions = st.one_of(
    st.sampled_from(ACTIONS),
    names,
    st.tuples(st.sampled_from(ACTIONS), odd_text).map(": ".join),
)
attributes = st.dictionaries(
    st.sampled_from(KEYS) | odd_text,
    st.one_of(odd_text, odd_text, reclaimed_texts, json_values),
    max_size=8,
)
# Engine messages whose fields have the engine's types and arbitrary values.
messages = st.fixed_dictionaries(
    {
        "Type": st.sampled_from(TYPES) | names,
        "Action": actions,
        "Actor": st.fixed_dictionaries(
            {"ID": odd_text}, optional={"Attributes": attributes | st.none()}
        ),
        "timeNano": time_nanos,
    },
    optional={
        "scope": st.sampled_from(["local", "swarm"]) | odd_text,
        "status": odd_text,
        "id": odd_text,
        "from": odd_text,
        "time": st.integers(),
    },
)
prunes = st.fixed_dictionaries(
    {
        "Type": st.sampled_from(TYPES) | names,
        "Action": st.sampled_from(["prune", "prune: x"]),
        "Actor": st.fixed_dictionaries(
            {"ID": st.just("")},
            optional={
                "Attributes": st.fixed_dictionaries(
                    {}, optional={"reclaimed": reclaimed_texts | json_values}
                )
            },
        ),
        "timeNano": time_nanos,
    }
)
# And with one field of any JSON type.
wrong_types = st.tuples(
    messages, st.sampled_from(["Type", "Action", "Actor", "timeNano", "scope"]), json_values
).map(lambda t: {**t[0], t[1]: t[2]})


def as_line(value: Any, how: str) -> bytes:
    if how == "ascii":  # lone surrogates as \udXXX escapes
        return json.dumps(value).encode()
    # Lone surrogates as the bytes no UTF-8 decoder takes.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


encodings = st.sampled_from(["ascii", "raw"])


# -- properties -------------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes(line: bytes) -> None:
    check(line)


@PROPERTY
@given(json_values, encodings)
def test_arbitrary_json(value: Any, how: str) -> None:
    check(as_line(value, how))


@settings(PROPERTY, max_examples=400)
@given(messages, encodings)
def test_engine_shaped_messages_with_arbitrary_values(message: Any, how: str) -> None:
    check(as_line(message, how))


@PROPERTY
@given(prunes)
def test_prune_messages_with_arbitrary_counts(message: Any) -> None:
    check(as_line(message, "ascii"))


@PROPERTY
@given(wrong_types, encodings)
def test_engine_shaped_messages_with_a_field_of_another_type(message: Any, how: str) -> None:
    check(as_line(message, how))


@PROPERTY
@given(
    st.integers(min_value=1, max_value=20_000),
    st.sampled_from(["[", '{"a":']),
    st.sampled_from(["attribute", "unknown field", "Type", "Actor"]),
)
def test_deep_nesting_anywhere(depth: int, opener: str, where: str) -> None:
    closer = "]" if opener == "[" else "}"
    deep = opener * depth + ("" if opener == "[" else "1") + closer * depth
    line = {
        "attribute": '{"Type":"container","Action":"start","Actor":{"ID":"c","Attributes":'
        '{"name":"web","deep":%s}},"timeNano":5}',
        "unknown field": '{"Type":"container","Action":"start","extra":%s,"timeNano":5}',
        "Type": '{"Type":%s,"Action":"start","timeNano":5}',
        "Actor": '{"Type":"container","Action":"start","Actor":%s,"timeNano":5}',
    }[where].replace("%s", deep)
    check(line.encode())


@PROPERTY
@given(
    st.sampled_from(RECORDED),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=8),
    st.binary(max_size=8) | st.sampled_from([b"\\ud800", b"\xed\xa0\x80", b"[" * 3000, b'"', b"-"]),
)
def test_recorded_lines_with_bytes_spliced_in(line: bytes, at: int, cut: int, junk: bytes) -> None:
    check(line[:at] + junk + line[at + cut :])


def test_the_strategies_reach_events_and_not_only_malformed_lines() -> None:
    # A property that only ever saw malformed lines would prove little about built events.
    made = []

    @settings(PROPERTY, max_examples=200)
    @given(messages, encodings)
    def run(message: Any, how: str) -> None:
        made.append(check(as_line(message, how)))

    run()
    assert 0.2 < sum(made) / len(made) < 0.9, sum(made)


def test_every_recorded_line_has_the_property() -> None:
    assert sum(check(line) for line in RECORDED) == len(RECORDED) == 282
    for line in RECORDED:
        raw = msgspec.json.decode(line)
        assert NORMALIZERS[0].normalize(line).data.time_nano == raw["timeNano"]
