"""`type: kafka`: CloudEvents over the Kafka protocol binding, on aiokafka.

Binary mode (default): the context attributes go into `ce_*` headers, `datacontenttype` into
`content-type`, `data` is the record value. Structured mode: the whole event is the value, with
`content-type: application/cloudevents+json; charset=UTF-8`. The record key comes from a
template (default: engine id + actor id), so one actor's events land on one partition, in order.

A batch counts as delivered only when the broker acknowledged every record of it (the send
futures of the whole batch are awaited); each future's outcome is mapped back to its index in
the batch, so one bad record (too large, unroutable topic) is dead-lettered alone.

Failure classes, decided here once:
- broker unreachable, timeouts (`KafkaTimeoutError`: the broker did not confirm in
  `request_timeout`; the record may still have been written, a retry may duplicate it, which
  at-least-once delivery allows), leader changes, unknown topic (an operator may create it;
  until then the outbox keeps the events), authentication failures (credentials can be fixed
  on the broker side): retryable;
- the broker refusing records (MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE, CORRUPT_MESSAGE,
  INVALID_RECORD: a topic's size limit, a schema it validates): rejected. The broker answers
  for a partition's whole batch of records, and aiokafka fails every record of it, so the
  outbox sends them again one at a time: the record refused again alone is dead-lettered, the
  others go through;
- a record over `max_request_size` (the producer's own check, one record), invalid topic name,
  other errors aiokafka marks non-retriable: permanent for that record.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import ssl
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from relay.sink import (
    KAFKA_TOPIC_MAX,
    Event,
    EventChannel,
    PermanentSinkError,
    RejectedSinkError,
    RetryableSinkError,
    Sink,
    SinkConfigBase,
    SinkContext,
    SinkError,
    Template,
    TlsSettings,
    escape_text,
    has_unsafe_chars,
    kafka_topic,
    kafka_topic_part,
    require_fixed_start,
    resolve_secret_files,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

# Kafka's own rule for topic names (kafka.common.internals.Topic).
_TOPIC_RE: Final = re.compile(rf"[a-zA-Z0-9._-]{{1,{KAFKA_TOPIC_MAX}}}")
_TOPIC_CHARS: Final = re.compile(r"[a-zA-Z0-9._-]*")


def topic_problem(topic: str) -> str | None:
    if topic in {".", ".."}:
        return f"topic {topic!r} is not allowed"
    if not _TOPIC_RE.fullmatch(topic):
        return (
            f"topic {topic!r} is not a valid Kafka topic name "
            f"(1 to {KAFKA_TOPIC_MAX} characters of a-z A-Z 0-9 . _ -)"
        )
    return None


def topic_template(template: str) -> Template:
    """A Kafka topic template: each value keeps only Kafka's characters, and the whole topic
    is bounded to a valid name (`relay.names`)."""
    return Template(template, escape=kafka_topic_part, finish=kafka_topic)


# --- partitions ---------------------------------------------------------------------------

_M32: Final = 0xFFFFFFFF
_MURMUR_M: Final = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's `Utils.murmur2`, which aiokafka's default partitioner
    uses), so a key lands on the partition any Kafka producer picks for it. Read four bytes at a
    time: aiokafka's byte-by-byte version cost ~50 µs a record, the most of any one function in
    the relay's profile at 500 events/s."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length & ~3
    for (k,) in _WORDS.iter_unpack(data[:whole]):
        k = (k * _MURMUR_M) & _M32
        k ^= k >> 24
        h = ((h * _MURMUR_M) & _M32) ^ ((k * _MURMUR_M) & _M32)
    tail = length & 3
    if tail:
        if tail == 3:
            h ^= data[whole + 2] << 16
        if tail >= 2:
            h ^= data[whole + 1] << 8
        h = ((h ^ data[whole]) * _MURMUR_M) & _M32
    h ^= h >> 13
    h = (h * _MURMUR_M) & _M32
    return h ^ (h >> 15)


_WORDS: Final = struct.Struct("<I")


@functools.lru_cache(maxsize=4096)
def _key_hash(key: bytes) -> int:
    # An actor's events share a key (its id): most keys recur.
    return murmur2(key) & 0x7FFFFFFF


def key_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's partitioner contract, with its default partitioner's choices: a keyed record
    goes to murmur2(key) modulo the partition count; one without a key to a random available
    partition."""
    if key is None:
        return random.choice(available or all_partitions)
    if len(all_partitions) == 1:
        # Any hash modulo 1 is 0: a topic of one partition needs no hash.
        return all_partitions[0]
    return all_partitions[_key_hash(key) % len(all_partitions)]


# --- settings -----------------------------------------------------------------------------

STRUCTURED_CONTENT_TYPE: Final = b"application/cloudevents+json; charset=UTF-8"


class KafkaSaslSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    username: str = Field(min_length=1, description="SASL user name.")
    password: SecretStr | None = Field(default=None, description="SASL password.")
    password_file: Path | None = Field(
        default=None, description="File holding the password (a mounted secret)."
    )

    @model_validator(mode="after")
    def _password(self) -> KafkaSaslSettings:
        resolve_secret_files(self, ("password", "password_file"))
        if self.password is None:
            raise ValueError("password or password_file is required")
        return self


class KafkaSinkConfig(SinkConfigBase):
    type: Literal["kafka"] = "kafka"
    bootstrap_servers: list[str] = Field(
        min_length=1, description='host:port of the brokers; a list or "h1:9092,h2:9092".'
    )
    topic: str = Field(
        default="docker-events",
        description="Topic template over event fields, e.g. docker.{type}.",
    )
    key: str | None = Field(
        default="{engine_id}/{actor_id}",
        description="Record key template; one key keeps an actor's events on one partition, "
        "in order. Empty or null: no key (records spread over partitions).",
    )
    content_mode: Literal["binary", "structured"] = Field(
        default="binary", description="CloudEvents Kafka binding mode."
    )
    acks: Literal["all", 0, 1] = Field(
        default="all", description="Broker acknowledgement a record needs to count as delivered."
    )
    enable_idempotence: bool = Field(
        default=True, description="Idempotent producer: no duplicates from producer retries."
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    linger_ms: int = Field(default=5, ge=0, description="Wait to fill a batch (ms).")
    batch_bytes: int = Field(
        default=16384, ge=1024, description="Bytes per partition batch (Kafka's batch.size)."
    )
    max_request_size: int = Field(
        default=1048576, ge=1024, description="Largest request (and record) the client sends."
    )
    request_timeout: float = Field(
        default=30.0, gt=0, description="Seconds for the broker to acknowledge a send."
    )
    client_id: str | None = Field(
        default=None, description="Client id; default docker-event-relay-<relay id>."
    )
    tls: TlsSettings | None = Field(
        default=None,
        description="Connect with TLS (SSL / SASL_SSL); `tls: {}` trusts the system CAs.",
    )
    sasl: KafkaSaslSettings | None = None
    max_batch: int = Field(default=500, ge=1, description="Events handed to one send call.")

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        for server in value:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return value

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        template = Template(value)
        literal = template.literal_text
        if not template.fields:
            problem = topic_problem(value)
            if problem:
                raise ValueError(problem)
            return value
        require_fixed_start(template, "topic")
        if not _TOPIC_CHARS.fullmatch(literal):
            raise ValueError(f"template {value!r}: the fixed text may only hold a-z A-Z 0-9 . _ -")
        if len(literal) > KAFKA_TOPIC_MAX:
            raise ValueError(
                f"template {value!r}: the fixed text alone is longer than a Kafka topic "
                f"({KAFKA_TOPIC_MAX} characters)"
            )
        return value

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        # A key may start with a placeholder (the default does): it picks a partition of the
        # topic, never a destination.
        if value and has_unsafe_chars(Template(value).literal_text):
            raise ValueError(
                f"template {value!r}: the fixed text holds a control character, a noncharacter "
                "or a lone surrogate"
            )
        return value or None

    @field_validator("compression")
    @classmethod
    def _check_codec(cls, value: str) -> str:
        if value in ("none", "gzip"):
            return value
        from aiokafka import codec

        present = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
        if not present[value]():
            raise ValueError(f"{value} needs its Python library installed (aiokafka[{value}])")
        return value

    @model_validator(mode="after")
    def _check_acks(self) -> KafkaSinkConfig:
        if self.enable_idempotence and self.acks != "all":
            raise ValueError(
                f"acks: the idempotent producer needs acks=all (got {self.acks!r}); "
                "set enable_idempotence: false to use it"
            )
        return self

    @property
    def security_protocol(self) -> str:
        if self.sasl is not None:
            return "SASL_SSL" if self.tls is not None else "SASL_PLAINTEXT"
        return "SSL" if self.tls is not None else "PLAINTEXT"

    def producer_options(self, relay_id: str) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer (holds the secret: never log this).
        RetryableSinkError when a TLS file no longer loads."""
        options: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id or f"docker-event-relay-{relay_id}",
            "acks": self.acks,
            "enable_idempotence": self.enable_idempotence,
            "compression_type": None if self.compression == "none" else self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.batch_bytes,
            "max_request_size": self.max_request_size,
            "request_timeout_ms": int(self.request_timeout * 1000),
            "security_protocol": self.security_protocol,
            "partitioner": key_partitioner,
        }
        if self.tls is not None:
            options["ssl_context"] = self.tls.sink_ssl_context(self.sink_name)
        if self.sasl is not None:
            assert self.sasl.password is not None  # the validator guarantees it
            options["sasl_mechanism"] = self.sasl.mechanism
            options["sasl_plain_username"] = self.sasl.username
            options["sasl_plain_password"] = self.sasl.password.get_secret_value()
        return options

    def build(self, context: SinkContext) -> Sink:
        return KafkaSink(self, context)

    @classmethod
    def event_channel(cls) -> EventChannel:
        fields = cls.model_fields
        key = {
            "type": "string",
            "description": f"The record key: the `key` template (default `{fields['key'].default}`"
            "), so one actor's events share a partition, in order; absent when `key` is empty.",
        }
        return EventChannel(
            title="Kafka sink",
            protocol="kafka",
            server={
                "host": "{bootstrap_server}",
                "protocol": "kafka",
                "description": "The brokers of the sink's `bootstrap_servers`; with `tls` the "
                "connection is TLS (kafka-secure), with `sasl` it authenticates.",
                "variables": {
                    "bootstrap_server": {
                        "description": "host:port of one of `bootstrap_servers`.",
                        "examples": ["localhost:9092"],
                    }
                },
            },
            address=fields["topic"].default,
            description="The topic is the sink's `topic` template (default "
            f"`{fields['topic'].default}`) over the event fields. A field's value keeps only "
            "a-z A-Z 0-9 . _ - (others become `_`); a topic over 249 characters is cut and "
            "ends in a hash.",
            modes=("binary", "structured"),
            default_mode=fields["content_mode"].default,
            mode_setting="content_mode",
            attribute_header="ce_{name}",
            attribute_escape="UTF-8, with control characters, noncharacters, lone surrogates "
            "and `%` percent-encoded",
            content_type_header="content-type",
            structured_content_type=STRUCTURED_CONTENT_TYPE.decode(),
            message_bindings={
                mode: {"kafka": {"key": key, "bindingVersion": "0.5.0"}}
                for mode in ("binary", "structured")
            },
        )


# --- the sink -----------------------------------------------------------------------------


class KafkaSink(Sink):
    def __init__(self, config: KafkaSinkConfig, context: SinkContext | None = None) -> None:
        super().__init__(config.sink_name, config.max_batch)
        self.config = config
        self._context = context or SinkContext()
        self._topic = topic_template(config.topic)
        # A key is a UTF-8 string like the headers: the same escape (control characters...).
        self._key = Template(config.key, escape=escape_text) if config.key else None
        self._binary = config.content_mode == "binary"
        self._producer: AIOKafkaProducer | None = None
        self._reconnect = False

    async def start(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        _know_invalid_record()
        producer = AIOKafkaProducer(**self.config.producer_options(self._context.relay_id))
        try:
            await producer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            # A failed start leaves tasks and sockets behind; a fresh producer is built next time.
            await _stop_quietly(producer)
            # aiokafka only logs why a bootstrap failed; find out again, for the one line that
            # names this sink.
            detail = await self._diagnose() if _is_connection_error(exc) else None
            raise RetryableSinkError(
                f"cannot connect to {','.join(self.config.bootstrap_servers)} "
                f"({self.config.security_protocol}): {detail or _describe(exc)}",
                sink=self.name,
            ) from exc
        except BaseException:
            await _stop_quietly(producer)
            raise
        self._producer = producer

    async def send(self, batch: Sequence[Event]) -> None:
        if self._reconnect:
            # After a failed attempt, start over with a fresh client: its first send asks the
            # broker for the topic's metadata again. A broker that came back empty (tansu in
            # memory; a recreated cluster) would otherwise take records for a topic it no
            # longer has and keep none of them.
            self._reconnect = False
            producer, self._producer = self._producer, None
            if producer is not None:
                await _stop_quietly(producer)
        if self._producer is None:
            await self._connect()
        producer = self._producer
        assert producer is not None
        from aiokafka.errors import KafkaError

        failures: dict[int, SinkError] = {}
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        stalled: RetryableSinkError | None = None
        for index, event in enumerate(batch):
            if stalled is not None:
                # The client is stuck (no metadata, buffer full): the rest would wait as long
                # again; keep them for the retry, in order.
                failures[index] = stalled
                continue
            topic, key, value, headers = self.encode(event)
            try:
                future = await producer.send(
                    topic,
                    value,
                    key=key,
                    headers=headers,
                    timestamp_ms=event.time_nano // 1_000_000,
                )
            except KafkaError as exc:
                error = self._translate(exc, topic)
                failures[index] = error
                if isinstance(error, RetryableSinkError):
                    stalled = error
                continue
            pending.append((index, future))

        if pending:
            results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
            for (index, _), result in zip(pending, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, KafkaError):
                    failures[index] = self._translate(result, self._topic.render(batch[index]))
                elif isinstance(result, BaseException):
                    failures[index] = RetryableSinkError(
                        f"unexpected error from the producer: {result!r}", sink=self.name
                    )
        if any(isinstance(err, RetryableSinkError) for err in failures.values()):
            self._reconnect = True
        self.fail(failures, len(batch))

    def encode(self, event: Event) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        """Topic, key, value and headers of the record for `event` (CloudEvents Kafka binding)."""
        topic = self._topic.render(event)
        key = self._key.render(event).encode() if self._key is not None else None
        if self._binary:
            # Header values are UTF-8 strings (CloudEvents Kafka binding); the subject can be
            # any name, so they get the escape of every text binding.
            headers = [("ce_" + k, escape_text(v).encode()) for k, v in event.attributes().items()]
            headers.append(("content-type", event.ce.datacontenttype.encode()))
            return topic, key, event.data_json(), headers
        return topic, key, event.json(), [("content-type", STRUCTURED_CONTENT_TYPE)]

    def _translate(self, exc: BaseException, topic: str) -> SinkError:
        from aiokafka import errors as e

        text = _describe(exc)
        if isinstance(exc, e.UnknownTopicOrPartitionError):
            return RetryableSinkError(
                f"topic {topic!r} unknown to the broker after {self.config.request_timeout:g}s "
                "(not created and auto-creation off, or the broker is unreachable)",
                sink=self.name,
            )
        if isinstance(exc, e.KafkaTimeoutError):
            return RetryableSinkError(
                f"no acknowledgement from the broker within {self.config.request_timeout:g}s "
                f"(topic {topic!r}): {text}",
                sink=self.name,
            )
        if isinstance(exc, e.MessageSizeTooLargeError) and exc.args:
            # The producer's own check of this one record, which raises with its message
            # (a broker's answer carries none: see below).
            return PermanentSinkError(
                f"record too large for topic {topic!r} "
                f"(max_request_size {self.config.max_request_size}): {text}",
                sink=self.name,
            )
        if isinstance(
            exc, (e.MessageSizeTooLargeError, e.RecordListTooLargeError, e.CorruptRecordException)
        ) or (isinstance(exc, e.BrokerResponseError) and exc.errno == _INVALID_RECORD):
            # The broker's verdict on a partition's whole batch: aiokafka fails every record of
            # it with the same error, though one record may be the cause. The outbox sends them
            # again one at a time; the one refused again alone is dead-lettered.
            return RejectedSinkError(
                f"broker refused the records to topic {topic!r} sent with this one: {text}",
                sink=self.name,
            )
        if isinstance(exc, e.UnknownError):
            # UNKNOWN_SERVER_ERROR says the broker failed, not that the record is bad (tansu
            # answers it while it comes back up): keep the event; `retry.attempts`/`timeout`
            # bound how long.
            return RetryableSinkError(f"broker error for topic {topic!r}: {text}", sink=self.name)
        if isinstance(exc, e.InvalidTopicError):
            return PermanentSinkError(f"invalid topic {topic!r}: {text}", sink=self.name)
        if isinstance(
            exc,
            (
                e.AuthenticationFailedError,
                e.SaslAuthenticationFailed,
                e.TopicAuthorizationFailedError,
                e.ClusterAuthorizationFailedError,
            ),
        ):
            # Fixable on the broker side without touching the relay: keep the events.
            return RetryableSinkError(f"not authorized for {topic!r}: {text}", sink=self.name)
        if getattr(exc, "retriable", False):
            return RetryableSinkError(f"topic {topic!r}: {text}", sink=self.name)
        return PermanentSinkError(f"topic {topic!r}: {text}", sink=self.name)

    async def _diagnose(self) -> str | None:
        """Why the bootstrap failed, which aiokafka only logs: a refused port, a TLS handshake
        that fails (wrong CA, plaintext peer)..."""
        tls = self.config.tls
        ctx = tls.sink_ssl_context(self.name) if tls is not None else None
        for server in self.config.bootstrap_servers:
            host, _, port = server.rpartition(":")
            try:
                async with asyncio.timeout(min(self.config.request_timeout, 5.0)):
                    _, writer = await asyncio.open_connection(host.strip("[]"), int(port), ssl=ctx)
            except ssl.SSLCertVerificationError as exc:
                return f"TLS handshake with {server} failed: {exc.verify_message or exc}"
            except ssl.SSLError as exc:
                return f"TLS handshake with {server} failed: {exc.reason or exc}"
            except TimeoutError:
                return f"{server}: connect timed out"
            except OSError as exc:
                return f"{server}: {exc.strerror or exc}"
            writer.close()
        return None

    async def aclose(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)


def _is_connection_error(exc: BaseException) -> bool:
    from aiokafka.errors import KafkaConnectionError, NoBrokersAvailable

    return isinstance(exc, (KafkaConnectionError, NoBrokersAvailable, OSError, TimeoutError))


# Kafka's INVALID_RECORD: the broker validated a record and refused it (a schema, a compacted
# topic's record without a key).
_INVALID_RECORD: Final = 87


def _know_invalid_record() -> None:
    """Teach aiokafka (0.14 has no class for it) the INVALID_RECORD error code. Unknown to it,
    the code arrives as UnknownError, which a broker also answers while it comes back up (tansu
    does) and which is therefore retried: one refused record would hold its sink forever."""
    from aiokafka import errors

    if _INVALID_RECORD in errors.kafka_errors:
        return

    # aiokafka ships no type information: its base class is Any to mypy.
    class InvalidRecordError(errors.BrokerResponseError):  # type: ignore[misc]
        errno = _INVALID_RECORD
        message = "INVALID_RECORD"
        description = "The broker validated the record and refused it."

    errors.kafka_errors[_INVALID_RECORD] = InvalidRecordError


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    if not text or text == name:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except Exception as exc:  # closing is best effort; the error is no longer actionable
        import logging

        logging.getLogger("relay.sink.kafka").debug("producer stop failed: %r", exc)
