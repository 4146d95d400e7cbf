"""Every sink type, as one pydantic union discriminated on `type`.

Importing this module imports the sink modules' config classes only; each sink imports its
client library (aiokafka, paho-mqtt...) when it is built, so an unused sink costs no memory.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from sinks.kafka import KafkaSinkConfig
from sinks.mqtt import MqttSinkConfig
from sinks.stdout import StdoutSinkConfig
from sinks.webhook import WebhookSinkConfig

SinkConfig = Annotated[
    StdoutSinkConfig | KafkaSinkConfig | MqttSinkConfig | WebhookSinkConfig,
    Field(discriminator="type"),
]

SINK_TYPES = ("stdout", "kafka", "mqtt", "webhook")
