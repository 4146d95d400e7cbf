"""`type: mqtt`: CloudEvents over MQTT 5 or 3.1.1 (see `sink`), on paho-mqtt driven by the
asyncio loop (see `loop`)."""

from sinks.mqtt.sink import (
    STRUCTURED_CONTENT_TYPE,
    MqttSink,
    MqttSinkConfig,
    PackedProperties,
    topic_level,
    topic_template,
)

__all__ = [
    "STRUCTURED_CONTENT_TYPE",
    "MqttSink",
    "MqttSinkConfig",
    "PackedProperties",
    "topic_level",
    "topic_template",
]
