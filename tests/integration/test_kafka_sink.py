"""The Kafka sink against tansu (a real Kafka-protocol broker) and the real engine."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from cloudevents.http import CloudEvent
from cloudevents.kafka import KafkaMessage, from_binary, from_structured

from relay.errors import PartialDeliveryError, PermanentSinkError, RetryableSinkError
from relay.router import RouteFilter
from relay.schema import Event
from relay.sink import Sink, SinkContext
from sinks.kafka import STRUCTURED_CONTENT_TYPE, KafkaSink, KafkaSinkConfig
from tests.contract import SinkContract, rebuilt, sample_events, structured
from tests.harness import DelayProxy, PrivateEngine, Tansu, async_wait_for, free_port
from tests.harness.brokers import HOST, BrokerProcess
from tests.harness.pki import Pki, pki_fixture
from tests.relay_harness import Recorder, relay_settings, running_relay, started
from tests.scenarios import (
    PRUNED_TYPES,
    engine_events,
    engine_id,
    engine_time,
    prune_scenario,
)

pytestmark = pytest.mark.integration

LABEL = "com.example.kafka-test"


def kafka_settings(bootstrap: str, **settings: Any) -> dict[str, Any]:
    """A Kafka sink's settings for tansu, whose memory storage cannot do InitProducerId
    (DESIGN.md section 5): no idempotent producer."""
    return {
        "type": "kafka",
        "bootstrap_servers": bootstrap,
        "enable_idempotence": False,
        **settings,
    }


def kafka_sink(bootstrap: str, **settings: Any) -> KafkaSink:
    values = kafka_settings(bootstrap, **{"request_timeout": 5.0, **settings})
    return KafkaSink(KafkaSinkConfig(**values), SinkContext("test"))


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def labelled_container(engine: PrivateEngine, verb: str, name: str, run: str, *labels: str) -> None:
    """`docker create` or `run` of a busybox `true` named `name`, labelled for this test run."""
    label_args = [arg for label in (f"{LABEL}={run}", *labels) for arg in ("--label", label)]
    engine.cli(verb, "--name", name, *label_args, "--network", "none", "busybox:latest", "true")


# -- reading back ---------------------------------------------------------------------------


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]

    @property
    def structured(self) -> dict[str, Any]:
        """The CloudEvent in structured form, whatever mode it was written in."""
        if "ce_id" not in self.headers:
            assert self.headers["content-type"] == STRUCTURED_CONTENT_TYPE
            result: dict[str, Any] = json.loads(self.value)
            return result
        event: dict[str, Any] = {
            name.removeprefix("ce_"): value.decode()
            for name, value in self.headers.items()
            if name.startswith("ce_")
        }
        event["datacontenttype"] = self.headers["content-type"].decode()
        event["data"] = json.loads(self.value)
        return event

    @property
    def id(self) -> str:
        return str(self.structured["id"])


async def consume(
    bootstrap: str,
    topics: Sequence[str],
    done: Any,
    timeout: float = 30.0,  # noqa: ASYNC109 - the deadline is checked inside the poll loop
    ssl_context: ssl.SSLContext | None = None,
) -> list[Record]:
    """Every record of `topics` from the beginning, until `done(records)` holds or the deadline.

    Records come in partition order per partition; across partitions in the order fetched."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        security_protocol="SSL" if ssl_context else "PLAINTEXT",
        ssl_context=ssl_context,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done(records):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s reading {topics}: {len(records)} record(s)"
                )
            batches = await consumer.getmany(timeout_ms=200)
            for messages in batches.values():
                for m in messages:
                    records.append(
                        Record(
                            m.topic,
                            m.partition,
                            m.offset,
                            m.key,
                            m.value,
                            {k: bytes(v) for k, v in m.headers},
                        )
                    )
    finally:
        await consumer.stop()
    return records


def has_ids(ids: Sequence[str]) -> Any:
    wanted = set(ids)
    return lambda records: wanted <= {r.id for r in records}


# -- the shared contract --------------------------------------------------------------------

# A record the client refuses to send: the default max_request_size, plus room to spare.
_TOO_LARGE = KafkaSinkConfig.model_fields["max_request_size"].default + 64 * 1024


class TestKafkaContract(SinkContract):
    """Against tansu on S3 storage, so that a restart keeps what the broker acknowledged (in
    memory it forgets its topics yet still acknowledges records sent to them)."""

    content_mode = "binary"

    @pytest.fixture(autouse=True)
    def _broker(self, tansu_s3: Tansu, tmp_path: Path) -> Iterator[None]:
        self.broker = tansu_s3
        self.bootstrap = tansu_s3.bootstrap
        self.topic = unique("contract")
        self.tmp_path = tmp_path
        self.cleanups: list[Callable[[], None]] = []
        yield
        for cleanup in reversed(self.cleanups):
            cleanup()

    def make_sink(self, bootstrap: str | None = None, **settings: Any) -> Sink:
        # The sink's own timeouts. One key: one partition, so "arrival order" is the
        # broker's order, well defined.
        values = kafka_settings(
            bootstrap or self.bootstrap,
            topic=self.topic,
            key="contract",
            content_mode=self.content_mode,
            **settings,
        )
        return KafkaSink(KafkaSinkConfig(**values), SinkContext("test"))

    async def _records(self, ids: list[str], timeout: float) -> list[Record]:  # noqa: ASYNC109
        return await consume(self.bootstrap, [self.topic], has_ids(ids), timeout)

    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's signature
    ) -> list[dict[str, Any]]:
        return [r.structured for r in await self._records(ids, timeout)]

    async def read_back_sdk(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's signature
    ) -> list[CloudEvent]:
        parsed: list[CloudEvent] = []
        for r in await self._records(ids, timeout):
            message = KafkaMessage(headers=r.headers, key=r.key, value=r.value)
            if "ce_id" in r.headers:
                parsed.append(from_binary(message))
            else:
                parsed.append(from_structured(message))
        return parsed

    def make_unreachable_sink(self) -> Sink:
        return self.make_sink(f"{HOST}:{free_port()}")

    def make_undeliverable(self, event: Event) -> Event:
        return rebuilt(event, {"com.example.blob": "x" * _TOO_LARGE})

    async def restart_destination(self) -> None:
        await asyncio.to_thread(self.broker.restart)

    async def make_slow_sink(self, delay: float) -> Sink:
        # tansu tells clients to use the proxy (as the TLS setup below advertises stunnel), so
        # every request of the sink, and of the reading consumer, crosses it.
        proxy_port = free_port()
        broker = Tansu(self.tmp_path / "slow-tansu", advertised_port=proxy_port)
        broker.start()
        self.cleanups.append(broker.stop)
        proxy = DelayProxy(broker.port, delay, port=proxy_port)
        proxy.start()
        self.cleanups.append(proxy.stop)
        self.bootstrap = proxy.address
        return self.make_sink()

    def make_secret_sink(self) -> tuple[Sink, list[str]]:
        # No SASL server runs here (DESIGN.md section 5): the secret goes to an address where
        # nothing listens, through the start and send paths that fail there.
        secret = f"sasl-{uuid.uuid4().hex}"
        sasl = {"mechanism": "SCRAM-SHA-512", "username": "relay", "password": secret}
        return self.make_sink(f"{HOST}:{free_port()}", sasl=sasl), [secret]


class TestKafkaContractStructured(TestKafkaContract):
    content_mode = "structured"


# -- events from the real engine ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_engine_events_follow_the_kafka_binding(
    engine: PrivateEngine, tansu: Tansu, tmp_path: Path, mode: str
) -> None:
    run = unique("k")
    prefix = unique("eng")
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[
            kafka_settings(
                tansu.bootstrap,
                name="kafka-main",
                topic=prefix + ".{type}",
                content_mode=mode,
                filter={"labels": {LABEL: run}},
            )
        ],
    )
    async with running_relay(settings):
        since = engine_time(engine)
        for n in range(3):
            labelled_container(engine, "run", f"{run}-c{n}", run)
        for n in range(3):
            engine.cli("rm", f"{run}-c{n}")
        until = engine_time(engine)
        emitted = engine_events(engine, since, until, f"label={LABEL}={run}")
        # Labels travel on container (and image) events only: create/attach?/start/die/destroy.
        assert len(emitted) >= 3 * 4
        topics = [f"{prefix}.container"]
        records = await consume(
            tansu.bootstrap, topics, lambda rs: len(rs) >= len(emitted), timeout=30
        )
    # Exactly what the engine reported, nothing more.
    assert len(records) == len(emitted)
    eid = engine_id(engine)
    for r in records:
        event = r.structured
        data = event["data"]
        assert event["specversion"] == "1.0"
        assert event["source"].endswith(eid) or eid in event["source"]
        assert event["type"].endswith(f".{data['type']}.{data['action']}")
        assert r.topic == f"{prefix}.{data['type']}"
        assert data["actor"]["labels"][LABEL] == run
        assert r.key == f"{eid}/{data['actor']['id']}".encode()
        assert event["datacontenttype"] == "application/json"
        if mode == "binary":
            # Binding: every context attribute as a ce_ header, datacontenttype as content-type.
            assert r.headers["content-type"] == b"application/json"
            assert "ce_datacontenttype" not in r.headers
            assert {"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time"} <= set(r.headers)
            assert json.loads(r.value) == data
        else:
            assert r.headers == {"content-type": b"application/cloudevents+json; charset=UTF-8"}
    # One actor: one key, one partition, and the engine's order within it.
    by_actor: dict[str, list[Record]] = {}
    for r in records:
        by_actor.setdefault(r.structured["data"]["actor"]["id"], []).append(r)
    engine_order: dict[str, list[str]] = {}
    for e in emitted:
        engine_order.setdefault(e["Actor"]["ID"], []).append(e["Action"])
    assert set(by_actor) == set(engine_order)
    for actor, rs in by_actor.items():
        assert len({r.partition for r in rs}) == 1
        rs.sort(key=lambda r: r.offset)
        assert [r.structured["data"]["action"] for r in rs] == engine_order[actor]
    container_actions = [
        r.structured["data"]["action"]
        for r in sorted(by_actor[emitted[1]["Actor"]["ID"]], key=lambda r: r.offset)
    ]
    assert container_actions[0] == "create" and container_actions[-1] == "destroy"


async def test_prune_events_arrive_with_reclaimed_bytes(
    engine: PrivateEngine, tansu: Tansu, tmp_path: Path
) -> None:
    topic = unique("prune")
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[kafka_settings(tansu.bootstrap, topic=topic, filter={"actions": ["prune"]})],
    )
    async with running_relay(settings):
        reported = prune_scenario(engine)
        records = await consume(tansu.bootstrap, [topic], lambda rs: len(rs) >= len(reported))
    assert len(records) == len(PRUNED_TYPES)
    got = {r.structured["data"]["type"]: r.structured["data"] for r in records}
    assert {t: d["reclaimed_bytes"] for t, d in got.items()} == reported
    assert all(d["action"] == "prune" for d in got.values())
    five_mib = 5 * 1024 * 1024
    assert reported["container"] >= five_mib
    assert reported["volume"] >= five_mib
    assert reported["network"] == 0


async def test_broker_down_then_back_loses_nothing(
    engine: PrivateEngine, tansu_fresh: Tansu, tmp_path: Path
) -> None:
    run = unique("d")
    topic = unique("down")
    label_filter = RouteFilter(labels={LABEL: run})
    sink = kafka_sink(tansu_fresh.bootstrap, topic=topic, request_timeout=1.0)
    recorder = Recorder()
    settings = relay_settings(engine.docker_host, tmp_path)
    async with running_relay(
        settings, sinks=[(sink, label_filter), (recorder, label_filter)]
    ) as relay:
        worker = relay.workers[0]
        since = engine_time(engine)

        def containers(tag: str, n: int) -> None:
            for i in range(n):
                labelled_container(engine, "create", f"{run}-{tag}{i}", run)

        containers("a", 3)
        await async_wait_for(lambda: len(recorder.events) == 3, 20, message="phase a read")
        await consume(tansu_fresh.bootstrap, [topic], has_ids([e.id for e in recorder.events]))

        tansu_fresh.stop()
        containers("b", 20)
        await async_wait_for(lambda: len(recorder.events) == 23, 20, message="phase b read")
        # The sink has noticed: the outbox holds phase b and retries.
        await async_wait_for(lambda: worker.failing_since is not None, 20, message="failing")
        assert len(worker.outbox) > 0 or worker.failing_since is not None
        tansu_fresh.start()
        containers("c", 5)
        await async_wait_for(lambda: len(recorder.events) == 28, 20, message="phase c read")
        after_restart = [e.id for e in recorder.events[3:]]
        records = await consume(tansu_fresh.bootstrap, [topic], has_ids(after_restart), 60)
        await async_wait_for(lambda: worker.failing_since is None, 20, message="recovered")
    # tansu keeps nothing across a restart: the topic holds what came after it, all of it.
    assert relay.dead_letter.count == 0
    held = [r.id for r in records]
    assert sorted(set(held)) == sorted(after_restart)
    names = {r.structured["data"]["actor"]["name"] for r in records}
    assert names == {f"{run}-{t}{i}" for t, k in (("b", 20), ("c", 5)) for i in range(k)}
    # Against the engine's own record: 28 creations; the 25 after the stop are all in the topic.
    emitted = engine_events(engine, since, engine_time(engine), f"label={LABEL}={run}")
    assert [e["Action"] for e in emitted] == ["create"] * 28
    assert {e["Actor"]["Attributes"]["name"] for e in emitted[3:]} == names


# -- failures -------------------------------------------------------------------------------


def _big_event(event: Event, size: int) -> Event:
    data = event.ce.data
    actor = msgspec.structs.replace(data.actor, labels={**data.actor.labels, "big": "x" * size})
    ce = msgspec.structs.replace(event.ce, data=msgspec.structs.replace(data, actor=actor))
    return Event(ce, event.seq)


async def test_record_too_large_fails_alone_and_is_dead_lettered(
    tansu: Tansu, tmp_path: Path
) -> None:
    topic = unique("big")
    events = sample_events(3)
    batch = [events[0], _big_event(events[1], 4096), events[2]]
    sink = kafka_sink(tansu.bootstrap, topic=topic, max_request_size=2048, key="one")
    async with started(sink):
        with pytest.raises(PartialDeliveryError) as info:
            await sink.send(batch)
    assert list(info.value.failures) == [1]
    error = info.value.failures[1]
    assert isinstance(error, PermanentSinkError)
    assert "too large" in str(error) and "[kafka]" in str(error)
    records = await consume(tansu.bootstrap, [topic], lambda rs: len(rs) >= 2)
    assert [r.id for r in records] == [events[0].id, events[2].id]


async def test_record_too_large_from_the_engine_goes_to_the_dead_letter_file(
    engine: PrivateEngine, tansu: Tansu, tmp_path: Path
) -> None:
    run = unique("L")
    topic = unique("dl")
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[
            kafka_settings(
                tansu.bootstrap,
                topic=topic,
                max_request_size=4096,
                filter={"labels": {LABEL: run}},
            )
        ],
    )
    async with running_relay(settings) as relay:
        labelled_container(engine, "create", f"{run}-big", run, "blob=" + "y" * 6000)
        labelled_container(engine, "create", f"{run}-small", run)
        await async_wait_for(lambda: relay.dead_letter.count == 1, 20, message="dead-lettered")
        records = await consume(tansu.bootstrap, [topic], lambda rs: len(rs) >= 1)
    assert [r.structured["data"]["actor"]["name"] for r in records] == [f"{run}-small"]
    lines = settings.dead_letter_file.read_text().splitlines()
    assert len(lines) == 1
    dead = json.loads(lines[0])
    assert dead["reason"] == "permanent" and dead["sink"] == "kafka"
    assert "too large" in dead["error"]
    assert dead["event"]["data"]["actor"]["name"] == f"{run}-big"


async def test_unreachable_bootstrap_is_retried_with_a_log_line_naming_the_sink(
    engine: PrivateEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = unique("u")
    address = f"{HOST}:{free_port()}"
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        startup_timeout=0.5,
        sinks=[
            kafka_settings(
                address,
                name="kafka-nowhere",
                request_timeout=1.0,
                filter={"labels": {LABEL: run}},
            )
        ],
    )
    caplog.set_level(logging.WARNING, logger="relay")
    async with running_relay(settings) as relay:
        worker = relay.workers[0]
        labelled_container(engine, "create", f"{run}-c", run)
        # Kept, not dropped: the event waits in the outbox while start is retried.
        await async_wait_for(lambda: len(worker.outbox) == 1, 20, message="event held")
        ready, why = relay.readiness()
        assert not ready and "kafka-nowhere" in why
        assert relay.dead_letter.count == 0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("relay")]
    failing = [line for line in lines if "kafka-nowhere" in line and "retrying" in line]
    assert failing, lines
    assert f"cannot connect to {address}" in failing[0]
    assert "Connect call failed" in failing[0] or "refused" in failing[0].lower()


async def test_sasl_settings_reach_the_client(
    tansu: Tansu, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No SASL server can run here (tansu's user store does not work): this proves the
    # settings reach aiokafka as given and that a broker refusing the handshake is a retried
    # failure whose message carries no secret.
    secret = "s3cret-" + uuid.uuid4().hex
    password_file = tmp_path / "password"
    password_file.write_text(secret + "\n")
    sink = kafka_sink(
        tansu.bootstrap,
        request_timeout=2.0,
        sasl={"mechanism": "SCRAM-SHA-512", "username": "relay", "password_file": password_file},
    )
    options = sink.config.producer_options("test")
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "relay"
    assert options["sasl_plain_password"] == secret
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RetryableSinkError) as info:
        await sink.start()
    await sink.aclose()
    assert "SASL_PLAINTEXT" in str(info.value) and "[kafka]" in str(info.value)
    for text in (str(info.value), repr(sink.config), repr(vars(sink)), caplog.text):
        assert secret not in text


# -- TLS through stunnel --------------------------------------------------------------------


pki = pki_fixture()


class Stunnel(BrokerProcess):
    name = "stunnel"

    def __init__(
        self, workdir: Path, port: int, target: int, cert: Path, key: Path, client_ca: Path
    ) -> None:
        super().__init__(workdir, port)
        self.target, self.cert, self.key, self.client_ca = target, cert, key, client_ca

    def prepare(self) -> None:
        (self.workdir / "stunnel.conf").write_text(
            "\n".join(
                [
                    "foreground = yes",
                    "pid =",
                    "debug = notice",
                    "[kafka]",
                    f"accept = {HOST}:{self.port}",
                    f"connect = {HOST}:{self.target}",
                    f"cert = {self.cert}",
                    f"key = {self.key}",
                    # mTLS: a client without a certificate from this CA is turned away.
                    f"CAfile = {self.client_ca}",
                    "verifyChain = yes",
                    "requireCert = yes",
                ]
            )
            + "\n"
        )

    def command(self) -> list[str]:
        return ["stunnel4", str(self.workdir / "stunnel.conf")]


@dataclass
class TlsKafka:
    bootstrap: str
    pki: Pki


@pytest.fixture
def tls_kafka(tmp_path: Path, pki: Pki) -> Iterator[TlsKafka]:
    tls_port = free_port()
    broker = Tansu(tmp_path / "tansu", advertised_port=tls_port)
    broker.start()
    tunnel = Stunnel(
        tmp_path / "stunnel", tls_port, broker.port, pki.server_cert, pki.server_key, pki.ca
    )
    try:
        tunnel.start()
        yield TlsKafka(f"{HOST}:{tls_port}", pki)
    finally:
        tunnel.stop()
        broker.stop()


async def test_tls_with_client_certificate(tls_kafka: TlsKafka) -> None:
    topic = unique("tls")
    events = sample_events(20)
    sink = kafka_sink(
        tls_kafka.bootstrap,
        topic=topic,
        tls=tls_kafka.pki.client_tls(),
    )
    assert sink.config.security_protocol == "SSL"
    async with started(sink):
        await sink.send(events)
    records = await consume(
        tls_kafka.bootstrap,
        [topic],
        has_ids([e.id for e in events]),
        ssl_context=tls_kafka.pki.client_context(),
    )
    assert sorted(r.id for r in records) == sorted(e.id for e in events)
    assert {r.id: r.structured for r in records} == {e.id: structured(e) for e in events}


async def test_tls_with_a_wrong_ca_is_a_clear_retryable_error(tls_kafka: TlsKafka) -> None:
    sink = kafka_sink(
        tls_kafka.bootstrap,
        request_timeout=2.0,
        tls=tls_kafka.pki.client_tls(ca_file=str(tls_kafka.pki.other_ca)),
    )
    with pytest.raises(RetryableSinkError) as info:
        await sink.start()
    await sink.aclose()
    message = str(info.value)
    assert message.startswith("[kafka] cannot connect to " + tls_kafka.bootstrap + " (SSL)")
    assert (
        "certificate verify failed" in message
        or "self-signed" in message
        or ("unable to get local issuer" in message)
    ), message


async def test_tls_without_client_certificate_is_refused(tls_kafka: TlsKafka) -> None:
    sink = kafka_sink(
        tls_kafka.bootstrap, request_timeout=2.0, tls={"ca_file": str(tls_kafka.pki.ca)}
    )
    with pytest.raises(RetryableSinkError) as info:
        await sink.start()
    await sink.aclose()
    assert "(SSL)" in str(info.value)
