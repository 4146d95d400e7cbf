"""The committed AsyncAPI document is the one the code generates, the real AsyncAPI parser
accepts it, and what the sinks really publish matches its messages."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml

from relay import plugins
from relay.asyncapi import ATTRIBUTES, FIELD_PATHS, document, event_schemas, render
from relay.normalize import Normalizer
from relay.schema import Engine, Event, json_schema
from relay.sink import SinkContext
from relay.template import EVENT_FIELDS, event_fields
from sinks.kafka import KafkaSink, KafkaSinkConfig
from sinks.mqtt import MqttSink, MqttSinkConfig
from sinks.webhook import WebhookSinkConfig, binary_headers
from tests.contract import fixture_lines, rebuilt

REPO = Path(__file__).resolve().parents[2]
ASYNCAPI_FILE = REPO / "schemas" / "asyncapi.yaml"
VALIDATOR_SCRIPT = REPO / "tests" / "asyncapi" / "validate.mjs"
PARSER_DIR = REPO / ".cache" / "asyncapi"
HOSTILE_NAME = "ctl\x01/+#$SYS 50% ~"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ASYNCAPI_FILE.read_text())
    return loaded


def real_events() -> Iterator[Event]:
    """Every recorded engine event of both engine versions, the relay's own gap event, and one
    with a hostile actor name (which is also its subject)."""
    engine = Engine(id="E:1", name="node-a", version="28.5.2", api_version="1.51", node_name="n1")
    normalizer = Normalizer(engine)
    seq = 0
    for line in fixture_lines("engine-28.5.2-events.jsonl") + fixture_lines(
        "engine-20.10.24-events.jsonl"
    ):
        seq += 1
        yield Event(normalizer.normalize(line), seq)
    yield Event(normalizer.gap(1, 2, "restart"), seq + 1)
    container = next(
        Event(normalizer.normalize(line), 0)
        for line in fixture_lines()
        if b'"Type":"container"' in line
    )
    yield rebuilt(container, {"name": HOSTILE_NAME})
    yield rebuilt(
        container,
        {
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "web",
            "com.docker.compose.container-number": "2",
            "io.kubernetes.pod.name": "web-7d4b9",
            "io.kubernetes.pod.namespace": "prod",
            "io.kubernetes.container.name": "app",
        },
    )


EVENTS = list(real_events())


def validator(doc: Mapping[str, Any], pointer: str) -> jsonschema.Draft7Validator:
    """A validator of the schema at `pointer` in the document, its references resolved in the
    document (AsyncAPI Schema is a superset of draft-07)."""
    return jsonschema.Draft7Validator({"$ref": pointer, "components": doc["components"]})


def message(doc: Mapping[str, Any], channel: str, mode: str) -> dict[str, Any]:
    ref = doc["channels"][channel]["messages"][mode]["$ref"]
    found: dict[str, Any] = doc["components"]["messages"][ref.rsplit("/", 1)[1]]
    return found


def value_at(structured: Any, path: str) -> str:
    """The text a template gets from the structured event at `path` ("" when absent)."""
    found: Any = structured
    for part in path.split("."):
        found = found.get(part) if isinstance(found, dict) else None
    return "" if found is None else str(found)


def topic_of(doc: Mapping[str, Any], channel: str, event: Event, escape: Any) -> str:
    """The channel's address with each parameter replaced by the escaped value the
    parameter's description points at in the structured event."""
    structured = msgspec.json.decode(event.json())

    def value(match: re.Match[str]) -> str:
        path = doc["components"]["parameters"][match[1]]["description"].split("`")[1]
        return str(escape(value_at(structured, path)))

    return re.sub(r"\{(\w+)\}", value, doc["channels"][channel]["address"])


# -- generated, committed, parsed ----------------------------------------------------------------


def test_committed_document_matches_the_code() -> None:
    assert ASYNCAPI_FILE.read_text() == render(document(plugins.event_channels())), (
        "schemas/asyncapi.yaml drifted from the code: regenerate it with "
        "`docker-event-relay asyncapi > schemas/asyncapi.yaml`"
    )


def test_cli_prints_the_committed_document() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "asyncapi"], check=True, capture_output=True, text=True
    ).stdout
    assert out == ASYNCAPI_FILE.read_text()


def parse(path: Path) -> tuple[int, list[dict[str, Any]], str]:
    assert (PARSER_DIR / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        "@asyncapi/parser is missing from .cache/asyncapi: run scripts/setup.sh"
    )
    result = subprocess.run(
        ["node", str(VALIDATOR_SCRIPT), str(path), str(PARSER_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    diagnostics = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, diagnostics, result.stderr


def test_the_asyncapi_parser_accepts_the_document() -> None:
    code, diagnostics, stderr = parse(ASYNCAPI_FILE)
    assert code == 0, f"{stderr}\n{diagnostics}"
    # Neither errors nor warnings; what is left is advice (a newer AsyncAPI version exists).
    assert [d for d in diagnostics if d["severity"] <= 1] == []
    assert "valid AsyncAPI 3.0.0" in stderr


@pytest.mark.parametrize(
    ("breakage", "code"),
    [
        ("parameter", "asyncapi3-channel-parameters"),
        ("message", "asyncapi3-operation-messages-from-referred-channel"),
        ("binding", "asyncapi-document-resolved"),
    ],
)
def test_the_parser_check_can_fail(
    doc: dict[str, Any], tmp_path: Path, breakage: str, code: str
) -> None:
    broken = copy.deepcopy(doc)
    if breakage == "parameter":
        del broken["channels"]["mqtt"]["parameters"]["action"]
    elif breakage == "message":
        broken["operations"]["send-mqtt"]["messages"].append(
            {"$ref": "#/channels/kafka/messages/binary"}
        )
    else:
        broken["operations"]["send-mqtt"]["bindings"]["mqtt"]["qos"] = 3
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    status, diagnostics, _ = parse(path)
    assert status == 1
    assert code in {d["code"] for d in diagnostics if d["severity"] == 0}


def test_the_document_is_self_contained(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and all(ref.startswith("#/") for ref in refs)
    for ref in refs:
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
    # The embedded schemas are the v1 event schema's definitions, references rewritten.
    defs = json.loads(
        json.dumps(json_schema()["$defs"]).replace('"#/$defs/', '"#/components/schemas/')
    )
    embedded = copy.deepcopy(event_schemas())
    assert (
        embedded["CloudEvent"].pop("description").startswith(defs["CloudEvent"].pop("description"))
    )
    assert embedded == defs
    assert doc["components"]["schemas"] == event_schemas()


def test_the_channels_are_the_bundled_publishing_sinks(doc: dict[str, Any]) -> None:
    assert list(doc["channels"]) == ["kafka", "mqtt", "webhook"]
    assert doc["channels"]["kafka"]["address"] == KafkaSinkConfig.model_fields["topic"].default
    assert doc["channels"]["mqtt"]["address"] == MqttSinkConfig.model_fields["topic"].default
    assert doc["channels"]["webhook"]["address"] is None
    assert list(doc["channels"]["mqtt"]["parameters"]) == ["engine_name", "type", "action"]
    assert {s["protocol"] for s in doc["servers"].values()} == {"kafka", "mqtt", "http"}
    assert doc["operations"]["send-mqtt"]["bindings"]["mqtt"]["qos"] == 1


def test_every_template_field_is_a_parameter_that_says_where_its_value_is(
    doc: dict[str, Any],
) -> None:
    parameters = doc["components"]["parameters"]
    assert set(parameters) == EVENT_FIELDS == set(FIELD_PATHS)
    seen: set[str] = set()
    for event in EVENTS:
        structured = msgspec.json.decode(event.json())
        for field, values in event_fields(event).items():
            path = parameters[field]["description"].split("`")[1]
            assert value_at(structured, path) == values, (field, path)
            if values:
                seen.add(field)
    # Each path was checked against a value that is there, not only against absences.
    assert seen == EVENT_FIELDS


# -- what the sinks publish matches the messages ------------------------------------------------


def test_events_validate_against_the_payload_schemas(doc: dict[str, Any]) -> None:
    binary = validator(doc, "#/components/messages/kafka-binary/payload")
    structured = validator(doc, "#/components/messages/kafka-structured/payload")
    assert len(EVENTS) == 156
    for event in EVENTS:
        binary.validate(msgspec.json.decode(event.data_json()))
        structured.validate(msgspec.json.decode(event.json()))
    # And a payload missing what the schema requires does not.
    broken = msgspec.json.decode(EVENTS[0].json())
    del broken["data"]["actor"]
    assert not structured.is_valid(broken)
    assert not binary.is_valid(broken["data"])


def test_kafka_binary_records_match_the_message(doc: dict[str, Any]) -> None:
    sink = KafkaSink(KafkaSinkConfig(bootstrap_servers=["localhost:9092"]))
    expected = message(doc, "kafka", "binary")
    headers_schema = validator(doc, "#/components/messages/kafka-binary/headers")
    payload = validator(doc, "#/components/messages/kafka-binary/payload")
    named = set(expected["headers"]["properties"])
    for event in EVENTS:
        topic, key, value, headers = sink.encode(event)
        as_text = {name: raw.decode() for name, raw in headers}
        assert len(as_text) == len(headers)
        assert set(expected["headers"]["required"]) <= set(as_text) <= named
        assert {f"ce_{name}" for name in event.attributes()} == set(as_text) - {"content-type"}
        headers_schema.validate(as_text)
        assert as_text["content-type"] == expected["contentType"]
        payload.validate(msgspec.json.decode(value))
        assert topic == topic_of(doc, "kafka", event, str)
        assert key is not None
    assert ATTRIBUTES == ("specversion", "id", "source", "type", "subject", "time", "dataschema")


def test_kafka_structured_records_match_the_message(doc: dict[str, Any]) -> None:
    config = KafkaSinkConfig(bootstrap_servers=["localhost:9092"], content_mode="structured")
    sink = KafkaSink(config)
    expected = message(doc, "kafka", "structured")
    payload = validator(doc, "#/components/messages/kafka-structured/payload")
    for event in EVENTS:
        _, _, value, headers = sink.encode(event)
        assert {name: raw.decode() for name, raw in headers} == {
            "content-type": expected["contentType"]
        }
        payload.validate(msgspec.json.decode(value))


def mqtt_sink(**settings: Any) -> MqttSink:
    sink = MqttSinkConfig(**settings).build(SinkContext(relay_id="node-1"))
    assert isinstance(sink, MqttSink)
    return sink


def test_mqtt5_binary_messages_match_the_message(doc: dict[str, Any]) -> None:
    from sinks.mqtt import topic_level

    sink = mqtt_sink()
    expected = message(doc, "mqtt", "binary")
    headers_schema = validator(doc, "#/components/messages/mqtt-binary/headers")
    payload = validator(doc, "#/components/messages/mqtt-binary/payload")
    topics = set()
    for event in EVENTS:
        body, properties = sink._encode(event)
        assert properties is not None
        user = dict(properties.UserProperty)
        assert len(user) == len(properties.UserProperty)
        assert set(expected["headers"]["required"]) <= set(user)
        assert set(user) <= set(expected["headers"]["properties"])
        headers_schema.validate(user)
        assert properties.ContentType == expected["contentType"]
        payload.validate(msgspec.json.decode(body))
        topic = sink._topic.render(event)
        assert topic == topic_of(doc, "mqtt", event, topic_level)
        topics.add(topic)
    assert "docker/node-a/container/die" in topics


def test_mqtt_structured_messages_match_the_message(doc: dict[str, Any]) -> None:
    expected = message(doc, "mqtt", "structured")
    payload = validator(doc, "#/components/messages/mqtt-structured/payload")
    assert "headers" not in expected
    for settings in ({"mode": "structured"}, {"protocol": "3.1.1"}):
        sink = mqtt_sink(**settings)
        for event in EVENTS:
            body, properties = sink._encode(event)
            if properties is not None:
                assert properties.ContentType == expected["contentType"]
                assert not properties.UserProperty
            payload.validate(msgspec.json.decode(body))


def test_webhook_binary_headers_are_the_documented_ones(doc: dict[str, Any]) -> None:
    expected = message(doc, "webhook", "binary")
    headers_schema = validator(doc, "#/components/messages/webhook-binary/headers")
    for event in EVENTS:
        headers = binary_headers(event)
        assert set(expected["headers"]["required"]) <= set(headers)
        assert set(headers) <= set(expected["headers"]["properties"])
        headers_schema.validate(headers)
    signature = WebhookSinkConfig.model_fields["signature_header"].default
    assert signature in expected["headers"]["properties"]
    batch = validator(doc, "#/components/messages/webhook-batch/payload")
    batch.validate([msgspec.json.decode(event.json()) for event in EVENTS[:10]])
