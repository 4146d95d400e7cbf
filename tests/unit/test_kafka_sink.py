"""Kafka sink logic without a broker: templates, binding headers, error classes, settings."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import hypothesis
import pytest
from aiokafka import errors as kafka_errors
from hypothesis import strategies as st
from pydantic import ValidationError

from relay.errors import ConfigError, PermanentSinkError, RetryableSinkError
from relay.plugins import load as load_settings
from relay.template import Template
from sinks.kafka import KafkaSink, KafkaSinkConfig, topic_problem
from tests.contract import sample_events
from tests.harness.pki import make_pki

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)


def sink(**settings: object) -> KafkaSink:
    return KafkaSink(KafkaSinkConfig(bootstrap_servers="b:9092", **settings))  # type: ignore[arg-type]


# -- templates ----------------------------------------------------------------------------


def test_template_renders_event_fields() -> None:
    event = sample_events(1, engine_id="ENG")[0]
    data = event.ce.data
    t = Template("docker.{type}.{action}-{engine_id}")
    assert t.render(event) == f"docker.{data.type}.{data.action}-ENG"
    assert Template("{engine_id}/{actor_id}").render(event) == f"ENG/{data.actor.id}"
    assert Template("plain").render(event) == "plain"


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ("docker.{typ}", "unknown field {typ}"),
        ("docker.{type", "malformed template"),
        ("docker.{}", "positional placeholder"),
        ("docker.{0}", "positional placeholder"),
        ("docker.{type!r}", "no format spec or conversion"),
        ("docker.{type:>10}", "no format spec or conversion"),
        ("docker.{actor.id}", "unknown field"),
    ],
)
def test_malformed_templates_are_rejected(template: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("{", r"\{").replace("}", r"\}")):
        Template(template)


def test_topic_names_follow_kafka_rules() -> None:
    assert topic_problem("docker.container") is None
    assert topic_problem("a" * 249) is None
    assert topic_problem("a" * 250) is not None
    assert topic_problem("") is not None
    assert topic_problem("..") is not None
    assert topic_problem("docker/events") is not None


def test_invalid_rendered_topic_is_reported_per_event() -> None:
    with pytest.raises(ValidationError, match="fixed text may only hold"):
        KafkaSinkConfig(bootstrap_servers=["b:1"], topic="docker events.{type}")


# -- binding ------------------------------------------------------------------------------


def test_binary_mode_headers() -> None:
    event = sample_events(1)[0]
    topic, key, value, headers = sink(topic="docker.{type}").encode(event)
    h = dict(headers)
    assert topic == f"docker.{event.ce.data.type}"
    assert key == f"{event.ce.data.engine.id}/{event.ce.data.actor.id}".encode()
    assert json.loads(value) == json.loads(event.data_json())
    assert h["content-type"] == b"application/json"
    assert h["ce_specversion"] == b"1.0"
    assert h["ce_id"] == event.id.encode()
    assert h["ce_type"] == event.ce.type.encode()
    assert h["ce_source"] == event.ce.source.encode()
    assert h["ce_time"] == event.ce.time.encode()
    assert "ce_datacontenttype" not in h and "ce_data" not in h
    assert len(headers) == len(h)  # no header twice


def test_structured_mode() -> None:
    event = sample_events(1)[0]
    _, key, value, headers = sink(content_mode="structured", key=None).encode(event)
    assert key is None
    assert headers == [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    assert json.loads(value) == json.loads(event.json())


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (kafka_errors.KafkaTimeoutError(), RetryableSinkError),
        (kafka_errors.UnknownTopicOrPartitionError(), RetryableSinkError),
        (kafka_errors.NodeNotReadyError(), RetryableSinkError),
        (kafka_errors.KafkaConnectionError(), RetryableSinkError),
        (kafka_errors.NotLeaderForPartitionError(), RetryableSinkError),
        (kafka_errors.RequestTimedOutError(), RetryableSinkError),
        (kafka_errors.UnknownError(), RetryableSinkError),
        (kafka_errors.SaslAuthenticationFailed(), RetryableSinkError),
        (kafka_errors.TopicAuthorizationFailedError(), RetryableSinkError),
        # The producer's own size check (with its message); the broker's answers on a batch
        # are RejectedSinkError: tests/unit/test_isolation.py.
        (kafka_errors.MessageSizeTooLargeError("The message is 2000000 bytes"), PermanentSinkError),
        (kafka_errors.RecordTooLargeError(), PermanentSinkError),
        (kafka_errors.InvalidTopicError(), PermanentSinkError),
    ],
)
def test_error_classes(error: Exception, kind: type) -> None:
    translated = sink(name="k1")._translate(error, "topic-x")
    assert type(translated) is kind
    assert translated.sink == "k1"
    assert "topic-x" in str(translated)


# -- settings -----------------------------------------------------------------------------


def test_defaults() -> None:
    c = KafkaSinkConfig(bootstrap_servers="a:9092, b:9093")
    assert c.bootstrap_servers == ["a:9092", "b:9093"]
    assert c.acks == "all" and c.enable_idempotence is True
    assert c.content_mode == "binary"
    assert c.key == "{engine_id}/{actor_id}"
    o = c.producer_options("node1")
    assert o["client_id"] == "docker-event-relay-node1"
    assert o["security_protocol"] == "PLAINTEXT"
    assert o["compression_type"] is None


def test_idempotence_needs_acks_all() -> None:
    with pytest.raises(ValidationError, match="acks"):
        KafkaSinkConfig(bootstrap_servers="a:1", acks=1)
    assert KafkaSinkConfig(bootstrap_servers="a:1", acks=1, enable_idempotence=False).acks == 1


def test_bad_bootstrap_address() -> None:
    with pytest.raises(ValidationError, match="not host:port"):
        KafkaSinkConfig(bootstrap_servers="localhost")


def test_password_from_file_is_secret(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    c = KafkaSinkConfig(
        bootstrap_servers="a:1",
        tls={},
        sasl={"mechanism": "SCRAM-SHA-256", "username": "u", "password_file": tmp_path / "pw"},
    )
    assert c.sasl is not None and c.sasl.password is not None
    assert c.sasl.password.get_secret_value() == "hunter2"
    assert c.security_protocol == "SASL_SSL"
    s = KafkaSink(c)
    for text in (repr(c), str(c), repr(vars(s)), c.model_dump_json()):
        assert "hunter2" not in text


def test_sasl_needs_a_password(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="password or password_file is required"):
        KafkaSinkConfig(bootstrap_servers="a:1", sasl={"username": "u"})
    with pytest.raises(ValidationError, match="password_file: cannot read"):
        KafkaSinkConfig(
            bootstrap_servers="a:1",
            sasl={"username": "u", "password_file": tmp_path / "missing"},
        )
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ValidationError, match="password and password_file: set only one"):
        KafkaSinkConfig(
            bootstrap_servers="a:1",
            sasl={"username": "u", "password": "y", "password_file": tmp_path / "pw"},
        )


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="ca_file: no such file"):
        KafkaSinkConfig(bootstrap_servers="a:1", tls={"ca_file": tmp_path / "x"})
    with pytest.raises(ValidationError, match="cert_file: no such file"):
        KafkaSinkConfig(bootstrap_servers="a:1", tls={"cert_file": tmp_path / "x"})
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(ValidationError, match="key_file: set cert_file too"):
        KafkaSinkConfig(bootstrap_servers="a:1", tls={"key_file": tmp_path / "key.pem"})


def test_tls_is_on_when_given_even_empty() -> None:
    c = KafkaSinkConfig(bootstrap_servers="a:1", tls={})
    assert c.security_protocol == "SSL"
    context = c.producer_options("n")["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert "ssl_context" not in KafkaSinkConfig(bootstrap_servers="a:1").producer_options("n")
    # The former switch is gone: `tls` present means TLS.
    with pytest.raises(ValidationError, match="enabled"):
        KafkaSinkConfig(bootstrap_servers="a:1", tls={"enabled": True})


async def test_a_tls_file_broken_after_the_config_check_is_retried(tmp_path: Path) -> None:
    ca = make_pki(tmp_path / "pki").ca
    sink = KafkaSink(KafkaSinkConfig(bootstrap_servers="a:1", name="k1", tls={"ca_file": ca}))
    ca.write_text("no longer a certificate")
    with pytest.raises(RetryableSinkError, match=r"\[k1\] tls: ca_file: cannot load"):
        await sink.start()
    await sink.aclose()


def test_codec_without_its_library_is_a_config_error() -> None:
    from aiokafka.codec import has_lz4

    if has_lz4():
        pytest.skip("lz4 is installed here")
    with pytest.raises(ValidationError, match="lz4 needs"):
        KafkaSinkConfig(bootstrap_servers="a:1", compression="lz4")


BAD_TEMPLATE = """
sinks:
  - type: kafka
    bootstrap_servers: [kafka:9092]
    topic: "docker.{typo}"
"""


def test_malformed_template_in_yaml_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(BAD_TEMPLATE)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.setting == "sinks[0].topic"
    assert "unknown field {typo}" in str(info.value)


def check_config(path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "relay", "--config", str(path), "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
    )


def test_check_config_exits_2_on_a_malformed_key_template(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    result = check_config(path, BAD_TEMPLATE.replace('topic: "docker.{typo}"', 'key: "{actor_id"'))
    assert result.returncode == 2, result.stderr
    assert "sinks[0].key" in result.stderr and "malformed template" in result.stderr
    result = check_config(path, BAD_TEMPLATE.replace("{typo}", "{type}"))
    assert result.returncode == 0, result.stderr


# -- partitions ----------------------------------------------------------------------------


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(key=st.binary(max_size=300), partitions=st.integers(min_value=1, max_value=64))
def test_keys_land_on_the_partition_the_java_clients_murmur2_picks(
    key: bytes, partitions: int
) -> None:
    # The sink's word-at-a-time murmur2 against aiokafka's byte-by-byte port of the Java
    # client's: a key must keep its partition whoever produces it, and across relay versions.
    from aiokafka.partitioner import DefaultPartitioner
    from aiokafka.partitioner import murmur2 as reference

    from sinks.kafka import key_partitioner, murmur2

    assert murmur2(key) == reference(key)
    every = list(range(partitions))
    assert key_partitioner(key, every, every) == DefaultPartitioner()(key, every, every)


def test_records_without_a_key_go_to_an_available_partition() -> None:
    from sinks.kafka import key_partitioner

    assert {key_partitioner(None, [0, 1, 2, 3], [2]) for _ in range(50)} == {2}
    assert {key_partitioner(None, [0, 1], []) for _ in range(200)} == {0, 1}
