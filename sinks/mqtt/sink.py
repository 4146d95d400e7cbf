"""`type: mqtt`: CloudEvents over MQTT 5 or 3.1.1 (paho-mqtt driven by the asyncio loop).

Binding (CloudEvents MQTT protocol binding):
- MQTT 5, binary mode (default): payload = `data` as JSON, the PUBLISH Content Type property =
  `datacontenttype`, every other context attribute = one user property named after it.
- MQTT 5, structured mode: payload = the whole event as JSON, Content Type =
  `application/cloudevents+json`.
- MQTT 3.1.1: structured only (the protocol has no properties), no content type.

Delivery: an event counts as delivered when the broker acknowledged it (PUBACK for QoS 1,
PUBCOMP for QoS 2); at QoS 0 when paho handed it to the socket. A broker refuses some messages
by dropping the connection (Mosquitto: a malformed packet, a packet over `max_packet_size`; a
PUBACK 0x95 for one over `message_size_limit`, which paho itself takes for a malformed packet):
events still unacknowledged when the connection is lost fail with RejectedSinkError, unless the
broker said the loss was not about them (shutting down, session taken over, keepalive...), and
the outbox sends them one at a time to find the one refused. So that paho does not re-send such
a message on its own after the reconnect, forever, its unacknowledged messages are dropped when
the connection is lost: the outbox re-sends what is still owed (at least once: a message whose
PUBACK the loss swallowed arrives twice). QoS 2 messages the broker already took (PUBREC) stay
with paho, which completes them after the reconnect; a retried batch waits for those instead of
publishing them a second time.

Status: a retained `online` on the status topic after every connect, a will of `offline`
(retained) for when the relay dies, and `offline` published on a clean close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from relay.sink import (
    EVENT_FIELDS,
    MQTT_LEVEL_MAX_BYTES,
    MQTT_TOPIC_MAX_BYTES,
    Event,
    EventChannel,
    PermanentSinkError,
    RejectedSinkError,
    RetryableSinkError,
    Sink,
    SinkConfigBase,
    SinkContext,
    SinkError,
    SinkState,
    Template,
    TlsSettings,
    escape_text,
    has_unsafe_chars,
    mqtt_topic_level,
    require_fixed_start,
    resolve_secret_files,
)
from sinks.mqtt.loop import LoopAdapter

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"


def topic_level(value: str) -> str:
    """One placeholder fills exactly one topic level (`relay.names.mqtt_topic_level`):
    separators and wildcards become `_`, control characters `%XX`, a leading `$` `%24`, an
    empty value `-` (so `docker/+/volume/prune` subscriptions keep working for every event)."""
    return mqtt_topic_level(value)


_RELAY_FIELDS = frozenset({"relay_id"})


def _template(template: str, allowed: frozenset[str], setting: str) -> Template:
    try:
        return Template(template, allowed=allowed)
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from exc


def topic_template(template: str) -> Template:
    """An MQTT topic template: each placeholder fills exactly one topic level."""
    return Template(template, escape=mqtt_topic_level)


def _check_topic_literal(template: Template, setting: str) -> None:
    """The fixed text of a topic template is a valid publish topic: no wildcards, nothing a
    broker refuses as malformed UTF-8, not a `$` topic, and short enough that every value
    (each at most MQTT_LEVEL_MAX_BYTES) fits in MQTT's topic length."""
    literal = template.literal_text
    if not template.source:
        raise ValueError(f"{setting}: must not be empty")
    for bad in ("+", "#"):
        if bad in literal:
            raise ValueError(f"{setting}: {bad!r} is a wildcard, invalid in a publish topic")
    if has_unsafe_chars(literal):
        raise ValueError(
            f"{setting}: the fixed text holds a control character, a noncharacter or a lone "
            "surrogate, which brokers refuse in a topic"
        )
    if template.fixed_start.startswith("$"):
        raise ValueError(f"{setting}: topics starting with '$' are reserved to the broker")
    longest = len(literal.encode()) + template.placeholders * MQTT_LEVEL_MAX_BYTES
    if longest > MQTT_TOPIC_MAX_BYTES:
        raise ValueError(
            f"{setting}: topics could reach {longest} bytes (fixed text, plus up to "
            f"{MQTT_LEVEL_MAX_BYTES} per placeholder); MQTT allows {MQTT_TOPIC_MAX_BYTES}"
        )


# -- settings ----------------------------------------------------------------------------------


class MqttSinkConfig(SinkConfigBase):
    type: Literal["mqtt"] = "mqtt"
    host: str = Field(default="localhost", min_length=1, description="Broker host name or IP.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port; default 1883, or 8883 with TLS."
    )
    client_id: str | None = Field(
        default=None,
        description="MQTT client id, stable across restarts (the persistent session and the "
        "broker's takeover rule depend on it); may use {relay_id}. Default: "
        "docker-event-relay-{relay_id}, plus -NAME when the sink has a name.",
    )
    topic: str = Field(
        default="docker/{engine_name}/{type}/{action}",
        description="Topic template; placeholders: " + ", ".join(sorted(EVENT_FIELDS)) + ".",
    )
    qos: Literal[0, 1, 2] = Field(default=1, description="QoS of event messages.")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    mode: Literal["binary", "structured"] | None = Field(
        default=None,
        description="CloudEvents content mode; default binary on MQTT 5. MQTT 3.1.1 is always "
        "structured.",
    )
    retain: bool = Field(default=False, description="Publish events as retained messages.")
    keepalive: int = Field(default=60, ge=5, le=65535, description="Keepalive interval (s).")
    persistent_session: bool = Field(
        default=True,
        description="clean_start=false (MQTT 5) / clean_session=false (3.1.1), so the broker "
        "keeps the session (QoS 2 state) across reconnects.",
    )
    session_expiry: int = Field(
        default=3600,
        ge=0,
        description="MQTT 5: seconds the broker keeps the session after a disconnect.",
    )
    status_topic: str | None = Field(
        default="docker/{relay_id}/status",
        description="Retained online/offline status (and the will); may use {relay_id}; "
        "empty to disable.",
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Connect + CONNACK (s).")
    ack_timeout: float = Field(
        default=30.0, gt=0, description="Longest wait for the acknowledgements of a batch (s)."
    )
    max_inflight: int = Field(
        default=100, ge=1, le=65535, description="QoS 1/2 messages unacknowledged at once."
    )
    tls: TlsSettings | None = Field(
        default=None,
        description="Connect with TLS (default port 8883); `tls: {}` trusts the system CAs.",
    )
    username: str | None = Field(default=None, description="MQTT user name.")
    password: SecretStr | None = Field(default=None, description="MQTT password.")
    password_file: Path | None = Field(
        default=None, description="File holding the password (instead of `password`)."
    )
    max_batch: int = Field(default=100, ge=1, description="Events handed to one send call.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML and JSON readers turn `5` into an int; the setting is a version name.
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    @field_validator("topic", "status_topic")
    @classmethod
    def _valid_topic(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.field_name == "status_topic" and not value:
            return None
        assert value is not None and info.field_name is not None
        allowed = EVENT_FIELDS if info.field_name == "topic" else _RELAY_FIELDS
        template = _template(value, allowed, info.field_name)
        _check_topic_literal(template, info.field_name)
        if info.field_name == "topic":
            # The status topic is exempt: its one field, relay_id, is the operator's own.
            require_fixed_start(template, info.field_name)
        return value

    @field_validator("client_id")
    @classmethod
    def _valid_client_id(cls, value: str | None) -> str | None:
        if value is not None:
            _template(value, _RELAY_FIELDS, "client_id")
            if not value:
                raise ValueError("client_id: must not be empty (a persistent session needs one)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttSinkConfig:
        if self.protocol == "3.1.1" and self.mode == "binary":
            raise ValueError(
                "mode: binary mode needs MQTT 5 (3.1.1 has no user properties); "
                "use mode: structured or protocol: 5"
            )
        resolve_secret_files(self, ("password", "password_file"))
        if self.password is not None and self.username is None:
            raise ValueError("username: a password needs a username")
        return self

    @property
    def effective_mode(self) -> Literal["binary", "structured"]:
        if self.protocol == "3.1.1":
            return "structured"
        return self.mode or "binary"

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls is not None else 1883)

    def build(self, context: SinkContext) -> Sink:
        return MqttSink(self, context)

    @classmethod
    def event_channel(cls) -> EventChannel:
        fields = cls.model_fields
        # The will and the keepalive are the defaults of the sink's settings.
        session = {
            "cleanSession": not fields["persistent_session"].default,
            "keepAlive": fields["keepalive"].default,
            "sessionExpiryInterval": fields["session_expiry"].default,
            "lastWill": {
                "topic": fields["status_topic"].default,
                "qos": 1,
                "message": "offline",
                "retain": True,
            },
            "bindingVersion": "0.2.0",
        }
        return EventChannel(
            title="MQTT sink",
            protocol="mqtt",
            server={
                "host": "{host}:{port}",
                "protocol": "mqtt",
                "protocolVersion": fields["protocol"].default,
                "description": "The broker of the sink's `host` and `port`, MQTT 5 (`protocol: "
                "3.1.1` publishes structured events only). The relay publishes a retained "
                "`online` on `status_topic` after each connect and `offline` on a clean close; "
                "its will is a retained `offline` there.",
                "variables": {
                    "host": {"default": fields["host"].default},
                    "port": {"default": "1883", "description": "8883 with `tls`."},
                },
                "bindings": {"mqtt": session},
            },
            address=fields["topic"].default,
            description="The topic is the sink's `topic` template (default "
            f"`{fields['topic'].default}`) over the event fields. Each field fills exactly one "
            "topic level: `/`, `+`, `#` become `_`, control characters `%XX`, a leading `$` "
            "`%24`, an empty value `-`. The content type is the PUBLISH Content Type "
            "property.",
            modes=("binary", "structured"),
            default_mode="binary",
            mode_setting="mode",
            attribute_header="{name}",
            attribute_escape="a user property, with control characters, noncharacters, lone "
            "surrogates and `%` percent-encoded",
            content_type_header=None,
            structured_content_type=STRUCTURED_CONTENT_TYPE,
            operation_bindings={
                "mqtt": {
                    "qos": fields["qos"].default,
                    "retain": fields["retain"].default,
                    "bindingVersion": "0.2.0",
                }
            },
        )


# -- the sink ----------------------------------------------------------------------------------

# MQTT 5 PUBACK/PUBREC reason codes after which the same message can never succeed: Not
# authorized, Topic Name invalid, Packet too large, Payload format invalid.
_PERMANENT_PUBLISH_CODES = frozenset({0x87, 0x90, 0x95, 0x99})
# A refusal of this message that names no cause (Unspecified error, Implementation specific
# error): sent alone again, and dead-lettered if refused again (the outbox's isolation), not
# retried forever.
_REJECTED_PUBLISH_CODES = frozenset({0x80, 0x83})
# MQTT 5 DISCONNECT reason codes (the broker's, or paho's own keepalive timeout) that say why the
# connection ended, and it was not a message of ours: Normal disconnection, Server busy, Server
# shutting down, Keep alive timeout, Session taken over, Quota exceeded, Administrative action,
# Use another server, Server moved, Connection rate exceeded, Maximum connect time. Any other
# loss (a malformed packet, Packet too large, Protocol error, or the socket simply closing, which
# is all MQTT 3.1.1 and Mosquitto 2.0's restarts show) may be a message refused.
_NOT_ABOUT_A_MESSAGE = frozenset({0x00, 0x89, 0x8B, 0x8D, 0x8E, 0x97, 0x98, 0x9C, 0x9D, 0x9F, 0xA0})
# Not an MQTT reason code (those are 0-255): the future of a message dropped with the connection.
_LOST = -2
# CONNACK reason codes of a refusal that is about who we are, not about the broker's health.
_AUTH_CONNACK_CODES = frozenset({0x84, 0x85, 0x86, 0x87, 0x8C, 4, 5})


class MqttSink(Sink):
    def __init__(self, config: MqttSinkConfig, context: SinkContext) -> None:
        super().__init__(config.sink_name, config.max_batch)
        self.config = config
        self.context = context
        default_id = "docker-event-relay-{relay_id}" + (f"-{config.name}" if config.name else "")
        self.client_id = (config.client_id or default_id).format(relay_id=context.relay_id)
        self.status_topic = (
            config.status_topic.format(relay_id=topic_level(context.relay_id))
            if config.status_topic
            else None
        )
        self.mode = config.effective_mode
        self._topic = topic_template(config.topic)
        self._structured_properties = PackedProperties(STRUCTURED_CONTENT_TYPE, [])
        self.address = f"{config.host}:{config.effective_port}"
        self.connects = 0
        """Successful connects so far (a reconnect after a loss counts again)."""
        self._connected = False
        self._client: mqtt.Client | None = None
        self._io: LoopAdapter | None = None
        self._connack: asyncio.Future[tuple[int, str]] | None = None
        self._lost: asyncio.Future[_Loss] | None = None
        self._connect_lock = asyncio.Lock()
        # mid -> future of its acknowledgement (the reason code); event id -> that future,
        # for QoS 1/2 messages still in paho's session.
        self._by_mid: dict[int, asyncio.Future[int]] = {}
        self._inflight: dict[str, asyncio.Future[int]] = {}
        self._last_refusal: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        await self._connect()

    async def send(self, batch: Sequence[Event]) -> None:
        if self._client is None:
            self._client = self._make_client()
        if not self._connected:
            await self._connect()
        if not batch:
            return
        client = self._client
        lost = self._lost
        assert lost is not None
        loop = asyncio.get_running_loop()
        qos = self.config.qos
        # Published while the connection is up: a loss from now on finds them in flight.
        up = not lost.done()
        waits: dict[int, asyncio.Future[int]] = {}
        failures: dict[int, SinkError] = {}
        for index, event in enumerate(batch):
            fut = self._inflight.get(event.id) if qos else None
            if fut is None:
                try:
                    fut = self._publish_event(client, loop, event)
                except SinkError as exc:
                    failures[index] = exc
                    continue
            waits[index] = fut
        if self._io is not None:
            self._io.flush()
        await self._wait_acks(list(waits.values()), lost)
        for index, fut in waits.items():
            code = fut.result() if fut.done() else None
            if code is None or code == _LOST:
                failures[index] = self._unacknowledged(lost, in_flight=up)
                continue
            if code >= 0x80:
                text = f"broker refused the message: {_reason_name(code)} (reason code {code})"
                if code in _PERMANENT_PUBLISH_CODES:
                    failures[index] = PermanentSinkError(text, sink=self.name)
                elif code in _REJECTED_PUBLISH_CODES:
                    failures[index] = RejectedSinkError(text, sink=self.name)
                else:
                    failures[index] = RetryableSinkError(text, sink=self.name)
        self.fail(failures, len(batch))

    def _unacknowledged(self, lost: asyncio.Future[_Loss], *, in_flight: bool) -> SinkError:
        """The error of a message left without its acknowledgement."""
        if not lost.done():
            return RetryableSinkError(
                f"no acknowledgement within {self.config.ack_timeout:g}s", sink=self.name
            )
        loss = lost.result()
        if in_flight and loss.suspect:
            return RejectedSinkError(f"{loss.text}, with the message in flight", sink=self.name)
        return RetryableSinkError(loss.text, sink=self.name)

    async def aclose(self) -> None:
        was_connected = self._connected
        self._connected = False
        client = self._client
        if client is None:
            return
        if was_connected and self.status_topic is not None:
            # A clean close does not fire the will: say `offline` ourselves.
            with contextlib.suppress(Exception):
                lost = self._lost
                assert lost is not None
                fut = self._publish_status(client, "offline")
                await self._wait_acks([fut], lost, wait_s=min(5.0, self.config.ack_timeout))
        if was_connected:
            lost = self._lost
            with contextlib.suppress(Exception):
                client.disconnect()
                if lost is not None:
                    await asyncio.wait_for(asyncio.shield(lost), timeout=5.0)
        if self._io is not None:
            self._io.detach()
        for fut in self._by_mid.values():
            fut.cancel()
        self._by_mid.clear()
        self._inflight.clear()

    # -- connection ----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = self.config
        v5 = c.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not c.persistent_session,
            reconnect_on_failure=False,
        )
        client.connect_timeout = c.connect_timeout
        client.max_inflight_messages_set(c.max_inflight)
        if c.username is not None:
            client.username_pw_set(
                c.username, c.password.get_secret_value() if c.password is not None else None
            )
        if c.tls is not None:
            client.tls_set_context(c.tls.sink_ssl_context(self.name))
            client.tls_insecure_set(not c.tls.verify)
        if self.status_topic is not None:
            client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        connect_properties: Properties | None = None
        if v5:
            # paho's Properties constructor carries no annotations.
            connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if c.persistent_session:
                connect_properties.SessionExpiryInterval = c.session_expiry
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        # Stores the address and options only; the blocking connect runs in `_connect`.
        client.connect_async(
            c.host,
            c.effective_port,
            keepalive=c.keepalive,
            clean_start=(not c.persistent_session) if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_properties,
        )
        self._io = LoopAdapter(client)
        return client

    async def _connect(self) -> None:
        async with self._connect_lock:
            if self._connected or self.state is SinkState.CLOSED:
                return
            client = self._client
            assert client is not None
            io = self._io
            assert io is not None
            loop = asyncio.get_running_loop()
            self._connack = loop.create_future()
            self._lost = loop.create_future()
            try:
                async with asyncio.timeout(self.config.connect_timeout + 1):
                    await io.connect()
                    code, reason = await self._connack
            except TimeoutError as exc:
                io.abandon()
                raise RetryableSinkError(
                    f"broker {self.address}: no CONNACK within {self.config.connect_timeout:g}s",
                    sink=self.name,
                ) from exc
            except ssl.SSLError as exc:
                io.abandon()
                raise RetryableSinkError(
                    f"broker {self.address}: TLS handshake failed: {exc}", sink=self.name
                ) from exc
            except OSError as exc:
                io.abandon()
                raise RetryableSinkError(
                    f"broker {self.address} unreachable: {exc.strerror or exc}", sink=self.name
                ) from exc
            if code == _CLOSED_BEFORE_CONNACK:
                # Not a refusal (a broker restarting, a proxy dropping us): an ordinary
                # retryable failure, which the outbox reports once per burst.
                io.abandon()
                raise RetryableSinkError(
                    f"broker {self.address} closed the connection before CONNACK: {reason}",
                    sink=self.name,
                )
            if code != 0:
                io.abandon()
                message = (
                    f"broker {self.address} refused the connection: {reason} "
                    f"(CONNACK reason code {code})"
                )
                if code in _AUTH_CONNACK_CODES:
                    message += "; check username/password/certificate"
                if message != self._last_refusal:
                    # Once per distinct refusal; the outbox keeps retrying with backoff.
                    self.log.error("sink %s: %s; retrying", self.name, message)
                    self._last_refusal = message
                raise RetryableSinkError(message, sink=self.name)
            self._last_refusal = None
            self._connected = True
            self.connects += 1
            io.connected()
            if self.connects > 1:
                self.log.info("sink %s: reconnected to %s", self.name, self.address)
            if self.status_topic is not None:
                status = self._publish_status(client, "online")
                await self._wait_acks([status], self._lost)
                if not status.done() or status.result() == _LOST:
                    raise RetryableSinkError(
                        f"broker {self.address}: status message not acknowledged", sink=self.name
                    )

    # -- publishing ----------------------------------------------------------------------------

    def _publish_event(
        self, client: mqtt.Client, loop: asyncio.AbstractEventLoop, event: Event
    ) -> asyncio.Future[int]:
        import paho.mqtt.client as mqtt

        c = self.config
        try:
            topic = self._topic.render(event)
            payload, properties = self._encode(event)
            # paho only calls pack() on a PUBLISH's properties: PackedProperties stands in.
            info = client.publish(topic, payload, c.qos, c.retain, properties)  # type: ignore[arg-type]
        except ValueError as exc:
            raise PermanentSinkError(f"cannot publish {event!r}: {exc}", sink=self.name) from exc
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise RetryableSinkError("paho's message queue is full", sink=self.name)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RetryableSinkError(
                f"publish failed: {mqtt.error_string(info.rc)}", sink=self.name
            )
        fut: asyncio.Future[int] = loop.create_future()
        if c.qos == 0:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RetryableSinkError("connection lost while publishing", sink=self.name)
            if info.is_published():
                fut.set_result(0)
                return fut
        else:
            # NO_CONN at QoS 1/2: paho keeps the message and sends it after the reconnect.
            self._inflight[event.id] = fut
            fut.add_done_callback(functools.partial(self._settled, event.id))
        self._by_mid[info.mid] = fut
        return fut

    def _settled(self, event_id: str, _fut: asyncio.Future[int]) -> None:
        self._inflight.pop(event_id, None)

    def _publish_status(self, client: mqtt.Client, status: str) -> asyncio.Future[int]:
        assert self.status_topic is not None
        info = client.publish(self.status_topic, status.encode(), qos=1, retain=True)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._by_mid[info.mid] = fut
        return fut

    def _encode(self, event: Event) -> tuple[bytes, PackedProperties | None]:
        if self.config.protocol == "3.1.1":
            return event.json(), None
        if self.mode == "structured":
            return event.json(), self._structured_properties
        # A user property is a UTF-8 string a broker checks: the subject can be any name.
        user = [(name, escape_text(value)) for name, value in event.attributes().items()]
        properties = PackedProperties(event.ce.datacontenttype, user)
        return event.data_json(), properties

    async def _wait_acks(
        self,
        futures: list[asyncio.Future[int]],
        lost: asyncio.Future[_Loss],
        wait_s: float | None = None,
    ) -> None:
        """Until every future is done, the connection is lost, or the deadline passes."""
        remaining = sum(1 for f in futures if not f.done())
        if not remaining:
            return
        loop = asyncio.get_running_loop()
        all_done: asyncio.Future[None] = loop.create_future()

        def one_done(_fut: asyncio.Future[int]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not all_done.done():
                all_done.set_result(None)

        pending = [f for f in futures if not f.done()]
        for fut in pending:
            fut.add_done_callback(one_done)
        watched: list[asyncio.Future[Any]] = [all_done, lost]
        try:
            await asyncio.wait(
                watched,
                timeout=self.config.ack_timeout if wait_s is None else wait_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for fut in pending:
                fut.remove_done_callback(one_done)
            all_done.cancel()

    # -- paho callbacks (all on the event loop's thread, except socket ones during connect) ----

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connack = self._connack
        if connack is not None and not connack.done():
            connack.set_result((reason_code.value, reason_code.getName()))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        loss = _loss(
            self.address,
            reason_code.value,
            reason_code.getName(),
            from_broker=bool(getattr(flags, "is_disconnect_packet_from_server", False)),
        )
        if self._connected:
            self.log.warning("sink %s: %s; reconnecting at the next send", self.name, loss.text)
            self._connected = False
        connack = self._connack
        if connack is not None and not connack.done():
            connack.set_result((_CLOSED_BEFORE_CONNACK, loss.text))
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(loss)
        self._forget_unacknowledged(client)
        if self._io is not None:
            self._io.stop_keepalive()

    def _forget_unacknowledged(self, client: mqtt.Client) -> None:
        """The connection is gone: drop the messages paho would re-send on its own after the
        reconnect (the broker may have dropped the connection over one of them, and would again,
        forever), except QoS 2 ones the broker already took (PUBREC), which paho completes with
        PUBREL. Their futures end with _LOST; the outbox re-sends the events still owed."""
        import paho.mqtt.client as mqtt

        taken = (mqtt.mqtt_ms_wait_for_pubcomp, mqtt.mqtt_ms_resend_pubrel)
        # paho's lock of its message store (reentrant): drop_out_messages takes it too.
        with client._out_message_mutex:
            keep = [m for m in client.drop_out_messages() if m.qos == 2 and m.state in taken]
            for message in keep:
                # paho can only drop them all: the broker's go back, in their order.
                client._out_messages[message.mid] = message
        kept = {m.mid for m in keep}
        for mid in [mid for mid in self._by_mid if mid not in kept]:
            fut = self._by_mid.pop(mid)
            if not fut.done():
                fut.set_result(_LOST)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._by_mid.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_code.value)


# Not an MQTT reason code (those are 0-255): the connection closed before any CONNACK.
_CLOSED_BEFORE_CONNACK = -1


class _Loss(NamedTuple):
    """How a connection ended."""

    text: str
    suspect: bool
    """The broker may have dropped it over a message in flight."""


def _loss(address: str, code: int, name: str, *, from_broker: bool) -> _Loss:
    """A lost connection, from paho's DISCONNECT reason code (the broker's, when it sent a
    DISCONNECT; else paho's own: Unspecified error for a closed socket, Protocol error for a
    packet it could not accept, Keep alive timeout)."""
    if from_broker:
        text = f"broker {address} closed the connection: {name} (reason code {code})"
    else:
        text = f"connection to {address} lost: {name}"
    return _Loss(text, code not in _NOT_ABOUT_A_MESSAGE)


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class PackedProperties:
    """MQTT 5 PUBLISH properties (content type and user properties), packed once.

    paho's `Properties` builds a table of every property on each instantiation and looks names
    up by scanning it: that cost more than the rest of a publish together. paho only calls
    `pack()` on the properties of a PUBLISH, so this stand-in packs them directly (MQTT 5.0
    section 2.2.2: a variable byte integer length, then identifier + value per property);
    a unit test checks the bytes against paho's own packing.
    """

    __slots__ = ("ContentType", "UserProperty", "_packed")

    def __init__(self, content_type: str, user: list[tuple[str, str]]) -> None:
        # Kept under paho's attribute names, for whoever inspects a message's properties.
        self.ContentType = content_type
        self.UserProperty = user
        body = bytearray(b"\x03")  # Content Type
        body += _utf8(content_type)
        for key, value in user:
            body += b"\x26"  # User Property: a UTF-8 string pair
            body += _utf8(key)
            body += _utf8(value)
        self._packed = _varint(len(body)) + bytes(body)

    def pack(self) -> bytes:
        return self._packed


def _reason_name(code: int) -> str:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    try:
        return ReasonCode(PacketTypes.PUBACK, identifier=code).getName()
    except Exception:
        return "unknown"
