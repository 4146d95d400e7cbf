"""MQTT sink: settings validation, topic templates and the CloudEvents binding (pure logic)."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from relay.errors import ConfigError
from relay.plugins import load as load_settings
from relay.sink import SinkContext
from sinks.mqtt import (
    STRUCTURED_CONTENT_TYPE,
    MqttSink,
    MqttSinkConfig,
    topic_level,
    topic_template,
)
from tests.contract import sample_events


def build(**settings: Any) -> MqttSink:
    sink = MqttSinkConfig(**settings).build(SinkContext(relay_id="node-1"))
    assert isinstance(sink, MqttSink)
    return sink


def error_of(**settings: Any) -> str:
    with pytest.raises(ValidationError) as info:
        MqttSinkConfig(**settings)
    return str(info.value)


# -- settings ------------------------------------------------------------------------------------


def test_defaults() -> None:
    c = MqttSinkConfig()
    assert (c.host, c.effective_port, c.qos, c.protocol, c.effective_mode, c.retain) == (
        "localhost",
        1883,
        1,
        "5",
        "binary",
        False,
    )
    assert c.persistent_session and c.topic == "docker/{engine_name}/{type}/{action}"
    sink = build()
    assert sink.client_id == "docker-event-relay-node-1"
    assert sink.status_topic == "docker/node-1/status"


def test_named_sink_gets_its_own_client_id() -> None:
    assert build(name="alerts").client_id == "docker-event-relay-node-1-alerts"
    assert build(client_id="relay-{relay_id}").client_id == "relay-node-1"


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("docker/{nope}", "unknown field {nope}"),
        ("docker/{type", "malformed template"),
        ("docker/{type!r}", "no format spec"),
        ("docker/{actor.id}", "unknown field"),
        ("docker/+/{type}", "wildcard"),
        ("docker/#", "wildcard"),
        ("", "must not be empty"),
    ],
)
def test_bad_topic_template_names_the_setting(topic: str, needle: str) -> None:
    message = error_of(topic=topic)
    assert "topic" in message and needle in message


def test_status_topic_only_knows_relay_id() -> None:
    assert "unknown field {type}" in error_of(status_topic="x/{type}/status")
    assert build(status_topic="").status_topic is None
    assert build(status_topic=None).status_topic is None


def test_binary_mode_needs_mqtt5() -> None:
    assert "mode: binary mode needs MQTT 5" in error_of(protocol="3.1.1", mode="binary")
    assert MqttSinkConfig(protocol="3.1.1").effective_mode == "structured"
    assert MqttSinkConfig(mode="structured").effective_mode == "structured"


def test_protocol_accepts_a_yaml_number() -> None:
    assert MqttSinkConfig(protocol=5).protocol == "5"  # type: ignore[arg-type]
    assert "protocol" in error_of(protocol="4")


def test_qos_is_0_1_or_2() -> None:
    assert "qos" in error_of(qos=3)


def test_tls_settings_turn_tls_on_and_files_must_load(tmp_path: Path) -> None:
    assert MqttSinkConfig().tls is None and MqttSinkConfig().effective_port == 1883
    c = MqttSinkConfig(tls={})
    assert c.tls is not None and c.effective_port == 8883
    assert c.tls.ssl_context().verify_mode == ssl.CERT_REQUIRED
    assert MqttSinkConfig(tls={}, port=1884).effective_port == 1884
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("x")
    assert "ca_file: no such file" in error_of(tls={"ca_file": tmp_path / "missing.pem"})
    assert "ca_file: cannot load" in error_of(tls={"ca_file": not_pem})
    assert "key_file: set cert_file too" in error_of(tls={"key_file": not_pem})
    # The flat settings of earlier versions are refused by name, not ignored.
    assert "tls_ca_file" in error_of(tls_ca_file=not_pem)
    assert "tls" in error_of(tls=True)


def test_password_from_file_is_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("hunter2-from-file\n")
    c = MqttSinkConfig(username="relay", password_file=secret_file)
    assert c.password is not None and c.password.get_secret_value() == "hunter2-from-file"
    sink = c.build(SinkContext("n"))
    for text in (repr(c), str(c.model_dump()), repr(sink), repr(vars(sink))):
        assert "hunter2" not in text


def test_password_settings_conflicts(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("a")
    assert "password and password_file: set only one" in error_of(
        username="u", password="b", password_file=secret_file
    )
    assert "username: a password needs a username" in error_of(password="b")
    assert "password_file: cannot read" in error_of(
        username="u", password_file=tmp_path / "missing"
    )


def test_config_error_from_env_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SINKS", json.dumps([{"type": "mqtt", "topic": "d/{bogus}"}]))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == "sinks[0].topic"
    assert "{bogus}" in str(info.value) and "RELAY_SINKS" in str(info.value)


def test_env_config_builds_a_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RELAY_SINKS",
        json.dumps([{"type": "mqtt", "host": "broker", "protocol": "3.1.1", "qos": 2}]),
    )
    (sink_config,) = load_settings().sinks
    assert isinstance(sink_config, MqttSinkConfig)
    assert (sink_config.host, sink_config.protocol, sink_config.qos) == ("broker", "3.1.1", 2)


# -- templates -----------------------------------------------------------------------------------


def test_topic_template_fields() -> None:
    assert topic_template("a/{type}/{action}").fields == {"type", "action"}
    with pytest.raises(ValidationError, match=re.escape("topic: template 'a/{typo}': unknown")):
        MqttSinkConfig(topic="a/{typo}")


def test_topic_rendering_keeps_one_level_per_placeholder() -> None:
    assert topic_level("registry.local/team/app:1.0") == "registry.local_team_app:1.0"
    assert topic_level("a+b#c") == "a_b_c" and topic_level("") == "-"
    events = sample_events(80)
    prune = next(e for e in events if e.ce.data.action == "prune")
    assert topic_template("d/{actor_id}/{action}").render(prune) == "d/-/prune"


def test_default_topic() -> None:
    event = next(e for e in sample_events(10) if e.ce.data.type == "volume")
    assert topic_template(MqttSinkConfig().topic).render(event) == (
        f"docker/contract/volume/{event.ce.data.action}"
    )


# -- binding -------------------------------------------------------------------------------------


def test_mqtt5_binary_mode_puts_attributes_in_user_properties() -> None:
    event = sample_events(1)[0]
    payload, props = build()._encode(event)
    assert props is not None
    assert props.ContentType == "application/json"
    assert dict(props.UserProperty) == event.attributes()
    assert json.loads(payload) == json.loads(event.json())["data"]


def test_mqtt5_structured_mode() -> None:
    event = sample_events(1)[0]
    payload, props = build(mode="structured")._encode(event)
    assert props is not None
    assert props.ContentType == STRUCTURED_CONTENT_TYPE
    assert not getattr(props, "UserProperty", None)
    assert payload == event.json()


def test_mqtt311_is_structured_without_properties() -> None:
    event = sample_events(1)[0]
    payload, props = build(protocol="3.1.1")._encode(event)
    assert props is None and payload == event.json()


def test_packed_properties_equal_pahos_own_packing() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from sinks.mqtt import PackedProperties

    for event in sample_events(80):
        user = list(event.attributes().items())
        reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        reference.ContentType = "application/json"
        reference.UserProperty = user
        assert PackedProperties("application/json", user).pack() == reference.pack()
    # Long enough for a two-byte length prefix, and non-ASCII values.
    user = [("k" * 100, "välue ✓" * 20)] * 3
    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.ContentType = "application/cloudevents+json; charset=utf-8"
    reference.UserProperty = user
    packed = PackedProperties("application/cloudevents+json; charset=utf-8", user).pack()
    assert packed == reference.pack()
    assert packed[0] & 0x80  # the length took more than one byte
