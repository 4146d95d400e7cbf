"""What a consumer reads from a real tansu and a real Mosquitto matches the AsyncAPI document's
messages: the headers and user properties it names, the content type it gives, the payload
schema, and for MQTT the topic its channel address makes of the event's fields."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import msgspec
import pytest
import yaml

from relay.schema import Event
from relay.sink import SinkContext
from sinks.kafka import KafkaSink, KafkaSinkConfig
from sinks.mqtt import MqttSink, MqttSinkConfig, topic_level
from tests.contract import rebuilt, sample_events, send_until_delivered
from tests.harness import Mosquitto, Tansu, async_wait_for
from tests.integration.test_kafka_sink import consume, has_ids, kafka_settings, unique
from tests.integration.test_mqtt_sink import Received, Subscriber
from tests.unit.test_asyncapi import ASYNCAPI_FILE, HOSTILE_NAME, message, topic_of, validator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ASYNCAPI_FILE.read_text())
    return loaded


def events() -> list[Event]:
    """Recorded engine events, one of them renamed to a hostile name (its subject too)."""
    batch = sample_events(13)
    # Same engine message, same id: it takes the place of the original.
    batch[-1] = rebuilt(batch[-1], {"name": HOSTILE_NAME})
    return batch


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_kafka_records_match_the_documented_messages(
    doc: dict[str, Any], tansu: Tansu, mode: str
) -> None:
    topic = unique("asyncapi")
    config = KafkaSinkConfig(**kafka_settings(tansu.bootstrap, topic=topic, content_mode=mode))
    sent = events()
    async with KafkaSink(config, SinkContext("test")) as sink:
        await send_until_delivered(sink, sent, deadline=60)
    records = await consume(tansu.bootstrap, [topic], has_ids([e.id for e in sent]))
    assert sorted(r.id for r in records) == sorted(e.id for e in sent)

    expected = message(doc, "kafka", mode)
    headers = validator(doc, f"#/components/messages/kafka-{mode}/headers")
    payload = validator(doc, f"#/components/messages/kafka-{mode}/payload")
    named = set(expected["headers"]["properties"])
    for record in records:
        as_text = {name: value.decode() for name, value in record.headers.items()}
        assert set(expected["headers"]["required"]) <= set(as_text) <= named
        headers.validate(as_text)
        assert as_text["content-type"] == expected["contentType"]
        payload.validate(json.loads(record.value))
        assert record.key is not None
    hostile = next(r for r in records if r.id == sent[-1].id)
    assert hostile.structured["data"]["actor"]["name"] == HOSTILE_NAME


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_mqtt_messages_match_the_documented_messages(
    doc: dict[str, Any], mosquitto: Mosquitto, mode: str
) -> None:
    sent = events()
    wanted = {e.id for e in sent}
    # The default topic template: the channel's address is what the sink publishes to.
    config = MqttSinkConfig.model_validate(
        {"host": "127.0.0.1", "port": mosquitto.port, "mode": mode, "status_topic": ""}
    )
    subscriber = Subscriber(mosquitto.port, "docker/contract/#")
    try:
        sink = config.build(SinkContext(relay_id="asyncapi"))
        assert isinstance(sink, MqttSink)
        async with sink:
            await send_until_delivered(sink, sent, deadline=60)

        def arrived() -> list[Received] | None:
            mine = [m for m in subscriber.snapshot() if m.structured()["id"] in wanted]
            return mine if {m.structured()["id"] for m in mine} == wanted else None

        received = await async_wait_for(arrived, 30, message=f"{len(sent)} events")
    finally:
        subscriber.close()
    assert received is not None and len(received) == len(sent)

    expected = message(doc, "mqtt", mode)
    payload = validator(doc, f"#/components/messages/mqtt-{mode}/payload")
    by_id = {e.id: e for e in sent}
    for got in received:
        assert got.content_type == expected["contentType"]
        payload.validate(json.loads(got.payload))
        if mode == "binary":
            properties = dict(got.user_properties)
            assert len(properties) == len(got.user_properties)
            assert set(expected["headers"]["required"]) <= set(properties)
            assert set(properties) <= set(expected["headers"]["properties"])
            validator(doc, "#/components/messages/mqtt-binary/headers").validate(properties)
            # Escaped as the document says: percent-decoding gives the exact attributes back.
            event = by_id[unquote(properties["id"])]
            assert {k: unquote(v, errors="surrogatepass") for k, v in properties.items()} == (
                event.attributes()
            )
            assert json.loads(got.payload) == msgspec.json.decode(event.data_json())
        else:
            assert "headers" not in expected and got.user_properties == []
            event = by_id[got.structured()["id"]]
            assert json.loads(got.payload) == msgspec.json.decode(event.json())
        assert got.topic == topic_of(doc, "mqtt", event, topic_level)
