"""Names in every binding (relay/names.py): property tests over any text, the topic-template
rules of each sink's configuration, and what the sinks put in topics, keys, headers and user
properties for hostile names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from relay.errors import ConfigError
from relay.names import (
    KAFKA_TOPIC_MAX,
    MQTT_LEVEL_MAX_BYTES,
    MQTT_TOPIC_MAX_BYTES,
    encode_header_value,
    escape_text,
    has_unsafe_chars,
    kafka_topic,
    kafka_topic_part,
    mqtt_topic_level,
    unescape,
)
from relay.plugins import load as load_settings
from relay.schema import Event
from relay.sink import SinkContext
from relay.template import EVENT_FIELDS, Template
from sinks.kafka import KafkaSink, KafkaSinkConfig
from sinks.mqtt import MqttSink, MqttSinkConfig, topic_template
from sinks.webhook import binary_headers
from tests.contract import sample_events

REPO = Path(__file__).resolve().parents[2]

# What engine users type, what MQTT and Kafka give meaning to, what brokers refuse.
SPECIAL = [
    *"/+#$%._- \"'\\:@",
    "\x00",
    "\x01",
    "\n",
    "\r",
    "\t",
    "\x1f",
    "\x7f",
    "\x80",
    "\x85",
    "\x9f",
    "\u00a0",
    "é",
    "\u2028",
    "\ud800",
    "\udfff",
    "\ufdd0",
    "\ufdef",
    "\ufffe",
    "\uffff",
    "\U0001fffe",
    "\U0010ffff",
    "\U0001f600",
]
# Every code point, surrogates included (Python strings can hold them; UTF-8 cannot).
any_char = st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL))
any_text = st.text(any_char)
KAFKA_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def refused_by_mqtt_brokers(data: bytes) -> str | None:
    """Why an MQTT 5 broker refuses `data` as a UTF-8 string (MQTT 5.0 section 1.5.4, as
    Mosquitto enforces it: mosquitto_validate_utf8), or None. Written from the spec, apart from
    relay/names.py, so that the two can disagree."""
    try:
        text = data.decode("utf-8")  # strict: no surrogates, no overlong forms
    except UnicodeDecodeError as exc:
        return f"not UTF-8: {exc}"
    for ch in text:
        c = ord(ch)
        if c <= 0x1F or 0x7F <= c <= 0x9F:
            return f"control character U+{c:04X}"
        if 0xFDD0 <= c <= 0xFDEF or (c & 0xFFFF) in (0xFFFE, 0xFFFF):
            return f"noncharacter U+{c:04X}"
    if len(data) > 65_535:
        return "longer than 65,535 bytes"
    return None


# -- properties of each binding ---------------------------------------------------------------


@given(any_text)
@example("ctl\x01name")
@example("new\nline")
@example("$SYS")
@example("+/#")
@example("")
@example("$")
@example("\ud800")
def test_an_mqtt_level_is_one_safe_level(value: str) -> None:
    level = mqtt_topic_level(value)
    assert level
    assert not {"/", "+", "#", "\x00"} & set(level)
    assert not level.startswith("$")
    assert refused_by_mqtt_brokers(level.encode()) is None
    assert not has_unsafe_chars(level)
    assert len(level.encode()) <= MQTT_LEVEL_MAX_BYTES


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_an_mqtt_level_keeps_ordinary_names(value: str) -> None:
    if value and not value.startswith("$") and not {"/", "+", "#"} & set(value):
        assert mqtt_topic_level(value) == value


def test_mqtt_level_examples() -> None:
    assert mqtt_topic_level("ctl\x01name") == "ctl%01name"
    assert mqtt_topic_level("new\nline") == "new%0Aline"
    assert mqtt_topic_level("$SYS") == "%24SYS"
    assert mqtt_topic_level("a$b") == "a$b"
    assert mqtt_topic_level("+/#") == "___"
    assert mqtt_topic_level("registry.local/team/app:1.0") == "registry.local_team_app:1.0"
    assert mqtt_topic_level("") == "-"
    assert mqtt_topic_level("\x00") == "%00"
    assert mqtt_topic_level("c1\x85\ufdd0") == "c1%C2%85%EF%B7%90"
    assert mqtt_topic_level("\ud800") == "%ED%A0%80"


@given(st.text(any_char, min_size=1, max_size=50), any_text, any_text)
def test_long_mqtt_levels_are_cut_and_stay_distinct(common: str, tail_a: str, tail_b: str) -> None:
    prefix = "x" * MQTT_LEVEL_MAX_BYTES + common
    a, b = prefix + tail_a, prefix + tail_b
    level_a, level_b = mqtt_topic_level(a), mqtt_topic_level(b)
    assert len(level_a.encode()) <= MQTT_LEVEL_MAX_BYTES
    assert re.search(r"~[0-9a-f]{12}$", level_a)
    assert (level_a == level_b) == (a == b)


@given(any_text)
@example("ctl\x01name")
@example("50%")
@example("%01")
@example("\ud800\udc00")
def test_text_properties_are_valid_utf8_and_reversible(value: str) -> None:
    escaped = escape_text(value)
    assert refused_by_mqtt_brokers(escaped.encode()) is None or len(escaped.encode()) > 65_535
    assert unescape(escaped) == value


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_text_without_percent_or_controls_is_unchanged(value: str) -> None:
    if "%" not in value:
        assert escape_text(value) == value


def test_text_examples() -> None:
    assert escape_text("ctl\x01name") == "ctl%01name"
    assert escape_text("new\nline") == "new%0Aline"
    assert escape_text("$SYS") == "$SYS"
    assert escape_text("+/# é\u2028") == "+/# é\u2028"
    assert escape_text("50%") == "50%25"


@given(any_text)
@example('a b"c%d')
@example("\ud800")
def test_header_values_are_visible_ascii_and_reversible(value: str) -> None:
    encoded = encode_header_value(value)
    assert all("\x21" <= ch <= "\x7e" and ch != '"' for ch in encoded)
    assert unescape(encoded) == value


def test_header_examples() -> None:
    # CloudEvents HTTP binding 3.1.3.2.
    assert encode_header_value("plain-ASCII_1.2") == "plain-ASCII_1.2"
    assert encode_header_value('a b"c%d') == "a%20b%22c%25d"
    assert encode_header_value("é€") == "%C3%A9%E2%82%AC"
    assert encode_header_value("ctl\x01name") == "ctl%01name"
    assert encode_header_value("$SYS") == "$SYS"


@given(any_text)
def test_a_kafka_topic_part_holds_only_kafka_characters(value: str) -> None:
    part = kafka_topic_part(value)
    assert re.fullmatch(r"[a-zA-Z0-9._-]*", part)
    assert len(part) == len(value)


@given(st.from_regex(r"[a-zA-Z0-9._-]{1,20}", fullmatch=True), st.lists(any_text, max_size=4))
@example("docker.", ["x" * 500])
@example(".", ["."])
@example(".", [""])
def test_a_rendered_kafka_topic_is_always_valid(fixed: str, values: list[str]) -> None:
    topic = kafka_topic(fixed + ".".join(kafka_topic_part(v) for v in values))
    assert KAFKA_TOPIC.fullmatch(topic) and topic not in {".", ".."}
    assert topic.startswith(fixed) or topic in {"_", "__"}


@given(st.from_regex(r"[a-zA-Z0-9._-]{1,400}", fullmatch=True))
def test_valid_kafka_topics_are_kept_and_long_ones_stay_distinct(topic: str) -> None:
    bounded = kafka_topic(topic)
    if len(topic) <= KAFKA_TOPIC_MAX and topic not in {".", ".."}:
        assert bounded == topic
    else:
        assert KAFKA_TOPIC.fullmatch(bounded)
    longer = kafka_topic(topic + "x" * KAFKA_TOPIC_MAX)
    other = kafka_topic(topic + "y" * KAFKA_TOPIC_MAX)
    assert len(longer) == len(other) == KAFKA_TOPIC_MAX
    assert longer != other


def test_kafka_examples() -> None:
    assert kafka_topic_part("ctl\x01name") == "ctl_name"
    assert kafka_topic_part("$SYS") == "_SYS"
    assert kafka_topic_part("+/#") == "___"
    assert kafka_topic_part("busybox:latest") == "busybox_latest"
    assert kafka_topic("..") == "__"
    long = kafka_topic("docker." + "n" * 300)
    assert len(long) == 249 and re.fullmatch(r"docker\.n{229}-[0-9a-f]{12}", long)


# -- topic templates: fixed text first, valid for the destination ---------------------------


def mqtt_error(**settings: Any) -> str:
    with pytest.raises(ValidationError) as info:
        MqttSinkConfig(**settings)
    return str(info.value)


def kafka_error(**settings: Any) -> str:
    with pytest.raises(ValidationError) as info:
        KafkaSinkConfig(bootstrap_servers=["b:9092"], **settings)
    return str(info.value)


@pytest.mark.parametrize("topic", ["{actor_name}", "{actor_name}/x", "{type}/{action}"])
def test_an_mqtt_topic_must_start_with_fixed_text(topic: str) -> None:
    message = mqtt_error(topic=topic)
    assert "topic: template" in message and "starts with a placeholder" in message


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("$SYS/{type}", "reserved to the broker"),
        ("$share/g/{type}", "reserved to the broker"),
        ("docker\x01/{type}", "control character"),
        ("docker\ufffe/{type}", "noncharacter"),
        ("docker/\x00/{type}", "control character"),
        ("docker/+/{type}", "wildcard"),
        ("docker/#", "wildcard"),
        ("docker/" + "{type}/" * 64, "MQTT allows 65535"),
        ("d" * 65_536, "MQTT allows 65535"),
    ],
)
def test_mqtt_topic_fixed_text_must_be_a_valid_publish_topic(topic: str, needle: str) -> None:
    message = mqtt_error(topic=topic)
    assert "topic:" in message and needle in message


def test_mqtt_status_topic_may_start_with_the_relay_id() -> None:
    # The relay id is the operator's node name, no event field: the rule does not apply.
    sink = MqttSinkConfig(status_topic="{relay_id}/status").build(SinkContext("$node/a+b"))
    assert isinstance(sink, MqttSink)
    assert sink.status_topic == "%24node_a_b/status"
    assert "reserved to the broker" in mqtt_error(status_topic="$SYS/{relay_id}")


@pytest.mark.parametrize("topic", ["{actor_name}", "{actor_name}.x", "{type}-{action}"])
def test_a_kafka_topic_must_start_with_fixed_text(topic: str) -> None:
    message = kafka_error(topic=topic)
    assert "topic: template" in message and "starts with a placeholder" in message


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("docker/{type}", "fixed text may only hold"),
        ("docker events.{type}", "fixed text may only hold"),
        ("d\x01.{type}", "fixed text may only hold"),
        ("d" * 250 + ".{type}", "longer than a Kafka topic"),
        ("d" * 250, "not a valid Kafka topic name"),
        ("..", "not allowed"),
    ],
)
def test_kafka_topic_fixed_text_must_be_kafka_characters(topic: str, needle: str) -> None:
    assert needle in kafka_error(topic=topic)


def test_a_kafka_key_may_start_with_a_placeholder() -> None:
    # A key picks a partition within the topic, never a destination; the default starts so.
    assert KafkaSinkConfig(bootstrap_servers=["b:9092"]).key == "{engine_id}/{actor_id}"
    assert KafkaSinkConfig(bootstrap_servers=["b:9092"], key="{actor_name}").key == "{actor_name}"
    assert "control character" in kafka_error(key="{actor_name}\x01")
    assert "lone surrogate" in kafka_error(key="\ud800{actor_name}")


def test_the_rule_names_the_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)
    for sink in (
        {"type": "kafka", "bootstrap_servers": "b:9092", "topic": "{actor_name}"},
        {"type": "mqtt", "topic": "{actor_name}/{type}"},
    ):
        monkeypatch.setenv("RELAY_SINKS", json.dumps([sink]))
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert info.value.setting == "sinks[0].topic"
        assert "starts with a placeholder" in str(info.value)


def test_defaults_and_readme_examples_pass_the_rules() -> None:
    MqttSinkConfig()
    KafkaSinkConfig(bootstrap_servers=["b:9092"])
    readme = (REPO / "README.md").read_text()
    checked = 0
    for block in re.findall(r"```yaml\n(.*?)```", readme, re.S):
        document = yaml.safe_load(block)
        if not isinstance(document, dict):
            continue
        for sink in document.get("sinks") or []:
            names = {k: sink[k] for k in ("topic", "key", "status_topic") if k in sink}
            if sink.get("type") == "mqtt":
                MqttSinkConfig(**names)
                checked += 1
            elif sink.get("type") == "kafka":
                KafkaSinkConfig(bootstrap_servers=["b:9092"], **names)
                checked += 1
    # The deploy/ configurations are loaded whole by tests/unit/test_deploy.py.
    assert checked >= 2


# -- what the sinks send for a hostile name ----------------------------------------------------

# No lone surrogate: no event holds one (the normalizer refuses a line with one, and JSON
# cannot encode it); the properties above cover them.
HOSTILE = ["ctl\x01name", "new\nline", "$SYS", "+/#", "50%", "c1\x85\uffff"]


def named(name: str) -> Event:
    """A real recorded network event whose network is called `name`."""
    event = next(e for e in sample_events(80) if e.ce.data.type == "network")
    data = event.ce.data
    actor = msgspec.structs.replace(data.actor, name=name, attributes={"name": name})
    ce = msgspec.structs.replace(
        event.ce, subject=name, data=msgspec.structs.replace(data, actor=actor)
    )
    return Event(ce, event.seq)


@pytest.mark.parametrize("name", HOSTILE)
def test_mqtt_sink_topic_and_user_properties(name: str) -> None:
    event = named(name)
    template = topic_template("docker/{engine_name}/{type}/{actor_name}/{action}")
    topic = template.render(event)
    assert topic.split("/") == ["docker", "contract", "network", mqtt_topic_level(name), "create"]
    assert refused_by_mqtt_brokers(topic.encode()) is None
    sink = MqttSinkConfig().build(SinkContext("n"))
    assert isinstance(sink, MqttSink)
    _, properties = sink._encode(event)
    assert properties is not None
    user = dict(properties.UserProperty)
    assert user["subject"] == escape_text(name) and unescape(user["subject"]) == name
    for value in (properties.ContentType, *user.values()):
        assert refused_by_mqtt_brokers(value.encode()) is None
    properties.pack()  # every string encodes


@pytest.mark.parametrize("name", HOSTILE)
def test_kafka_sink_topic_key_and_headers(name: str) -> None:
    event = named(name)
    sink = KafkaSink(
        KafkaSinkConfig(
            bootstrap_servers=["b:9092"], topic="docker.{type}.{actor_name}", key="{actor_name}"
        )
    )
    topic, key, _, headers = sink.encode(event)
    assert topic == "docker.network." + kafka_topic_part(name)
    assert KAFKA_TOPIC.fullmatch(topic)
    assert key == escape_text(name).encode()
    subject = dict(headers)["ce_subject"].decode()  # strict UTF-8
    assert unescape(subject) == name
    assert not has_unsafe_chars(subject)


@pytest.mark.parametrize("name", HOSTILE)
def test_webhook_binary_headers(name: str) -> None:
    headers = binary_headers(named(name))
    assert unescape(headers["ce-subject"]) == name
    for value in headers.values():
        assert all("\x21" <= ch <= "\x7e" for ch in value.replace(" ", "!"))


@given(any_text)
def test_every_mqtt_template_field_renders_a_valid_topic(value: str) -> None:
    fields = sorted(EVENT_FIELDS)
    template = topic_template("d/" + "/".join("{" + f + "}" for f in fields))
    topic = template.render_values(dict.fromkeys(fields, value))
    assert len(topic.split("/")) == len(fields) + 1
    assert refused_by_mqtt_brokers(topic.encode()) is None
    assert "+" not in topic and "#" not in topic


def test_templates_without_escape_render_as_written() -> None:
    assert Template("x.{type}").render_values({"type": "a/b"}) == "x.a/b"
    assert Template("x.{type}", finish=str.upper).render_values({"type": "a"}) == "X.A"
    assert Template("x.{type}/{type}").placeholders == 2
    assert Template("x.{type}").fixed_start == "x."
    assert Template("{type}.x").fixed_start == ""
    assert MQTT_TOPIC_MAX_BYTES == 65_535
