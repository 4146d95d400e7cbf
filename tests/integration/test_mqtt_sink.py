"""The MQTT sink against a real Mosquitto and real engines: binding, prune events, a broker
restart mid-stream, TLS and passwords, the will, and the shared sink contract."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import pytest
from cloudevents.http import CloudEvent, from_json
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from relay.errors import RetryableSinkError
from relay.router import RouteFilter
from relay.schema import Event
from relay.sink import Sink, SinkContext
from sinks.mqtt import STRUCTURED_CONTENT_TYPE, MqttSink, MqttSinkConfig
from tests.contract import SinkContract, rebuilt, sample_events
from tests.harness import (
    DelayProxy,
    Mosquitto,
    PrivateEngine,
    async_wait_for,
    free_port,
    wait_for,
)
from tests.harness.pki import KEY_PASSWORD, Pki, pki_fixture
from tests.relay_harness import Recorder, relay_settings, running_relay, started
from tests.scenarios import prune_scenario

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL = RouteFilter()
BINARY_ATTRIBUTES = {"specversion", "id", "source", "type", "time", "dataschema", "subject"}


# -- a real subscriber -----------------------------------------------------------------------


class Received:
    """One message as the subscriber saw it."""

    def __init__(self, message: mqtt.MQTTMessage) -> None:
        self.topic = message.topic
        self.payload = bytes(message.payload)
        self.retain = bool(message.retain)
        props = getattr(message, "properties", None)
        self.content_type: str | None = getattr(props, "ContentType", None)
        self.user_properties: list[tuple[str, str]] = list(getattr(props, "UserProperty", []))

    def structured(self) -> dict[str, Any]:
        """The event in structured form, whichever mode it travelled in."""
        if self.content_type is None or self.content_type == STRUCTURED_CONTENT_TYPE:
            event: dict[str, Any] = json.loads(self.payload)
            return event
        event = dict(self.user_properties)
        event["datacontenttype"] = self.content_type
        event["data"] = json.loads(self.payload)
        return event


class Subscriber:
    """A paho subscriber on its own network thread; optionally with a persistent session."""

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        protocol: str = "5",
        client_id: str = "",
        persistent: bool = False,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent,
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        if tls is not None:
            self.client.tls_set_context(tls)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if persistent:
                properties.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1",
            port,
            clean_start=not persistent if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise AssertionError(f"subscriber on {topic} got no SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message))

    def expect_resubscribe(self) -> None:
        """Before the broker goes away: `wait_subscribed` then waits for the next SUBACK."""
        self._subscribed.clear()

    def wait_subscribed(self, timeout: float) -> None:
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"subscriber not subscribed again within {timeout:g}s")

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def events(self) -> list[dict[str, Any]]:
        return [m.structured() for m in self.snapshot() if not m.topic.endswith("/status")]

    def ids(self) -> list[str]:
        return [e["id"] for e in self.events()]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_sink(port: int, relay_id: str = "test-node", **settings: Any) -> MqttSink:
    config = MqttSinkConfig(host="127.0.0.1", port=port, **settings)
    sink = config.build(SinkContext(relay_id=relay_id))
    assert isinstance(sink, MqttSink)
    return sink


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


# -- the shared contract -----------------------------------------------------------------------

# What the contract's broker denies, by topic ACL: the only refusal of one message that Mosquitto
# reports per message (MQTT 5 PUBACK 0x87 Not authorized, measured on 2.0.11). Its
# `message_size_limit` answers PUBACK 0x95, which MQTT 5 does not allow in a PUBACK: paho then
# drops the connection as malformed, so no client can see that refusal.
REFUSED_SUBJECT = "refused"
_CONTRACT_ACL = f"topic readwrite #\ntopic deny +/+/+/{REFUSED_SUBJECT}\n"


class _MqttContract(SinkContract):
    protocol = "5"
    mode: str | None = "binary"

    @pytest.fixture(autouse=True)
    def _broker(
        self, mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
    ) -> Iterator[None]:
        # A broker of the test's own: the restart test restarts it and the ACL refuses one
        # subject. Persistence keeps the subscriber's session and queue across a restart, so
        # any loss can only be the sink's.
        store = tmp_path / "mosquitto-db"
        store.mkdir()
        (tmp_path / "acl").write_text(_CONTRACT_ACL)
        self.broker = mosquitto_factory(
            f"persistence true\npersistence_location {store}/\nacl_file {tmp_path / 'acl'}\n"
        )
        self.tmp_path = tmp_path
        self.root = prefix()
        self.subscriber = Subscriber(
            self.broker.port,
            f"{self.root}/#",
            protocol=self.protocol,
            client_id=f"sub-{self.root}",
            persistent=True,
        )
        self.cleanups: list[Callable[[], None]] = []
        yield
        self.subscriber.close()
        for cleanup in reversed(self.cleanups):
            cleanup()

    def make_sink(self, port: int | None = None, **settings: Any) -> Sink:
        return mqtt_sink(
            self.broker.port if port is None else port,
            # A client id per sink: two sinks of one test must not take over each other.
            relay_id=f"node-{uuid.uuid4().hex[:8]}",
            topic=self.root + "/{type}/{action}/{subject}",
            status_topic=self.root + "/{relay_id}/status",
            protocol=self.protocol,
            mode=self.mode,
            **settings,
        )

    async def _messages(self, ids: list[str], timeout: float) -> list[Received]:  # noqa: ASYNC109
        wanted = set(ids)

        def arrived() -> list[Received] | None:
            messages = [m for m in self.subscriber.snapshot() if not m.topic.endswith("/status")]
            return messages if wanted <= {m.structured()["id"] for m in messages} else None

        result = await async_wait_for(arrived, timeout, message=f"{len(ids)} events")
        assert result is not None
        return result

    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 (the contract's)
    ) -> list[dict[str, Any]]:
        return [m.structured() for m in await self._messages(ids, timeout)]

    async def read_back_sdk(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 (the contract's)
    ) -> list[CloudEvent]:
        # The CloudEvents SDK has no MQTT binding: structured mode is its JSON format; binary
        # mode is the binding's mapping, user properties to attributes.
        parsed: list[CloudEvent] = []
        for m in await self._messages(ids, timeout):
            if m.content_type is None or m.content_type == STRUCTURED_CONTENT_TYPE:
                parsed.append(from_json(m.payload))
            else:
                attributes = {**dict(m.user_properties), "datacontenttype": m.content_type}
                parsed.append(CloudEvent(attributes, json.loads(m.payload)))
        return parsed

    def make_unreachable_sink(self) -> Sink:
        return mqtt_sink(free_port())

    def make_undeliverable(self, event: Event) -> Event:
        # The topic's last level is the subject, which the broker's ACL denies for this name.
        return rebuilt(event, {"name": REFUSED_SUBJECT})

    async def restart_destination(self) -> None:
        # The test's own subscriber must be back (re-subscribed) before the sink publishes
        # again: under load, 2 runs of 12 missed the second batch when the sink published it
        # before the subscriber's reconnect, though Mosquitto restores its persistent session
        # from its file. What is tested here is the sink's reconnect, not the broker's queue.
        self.subscriber.expect_resubscribe()
        await asyncio.to_thread(self.broker.restart)
        await asyncio.to_thread(self.subscriber.wait_subscribed, 30)

    async def make_slow_sink(self, delay: float) -> Sink:
        proxy = DelayProxy(self.broker.port, delay)
        proxy.start()
        self.cleanups.append(proxy.stop)
        return self.make_sink(proxy.port)

    def make_secret_sink(self) -> tuple[Sink, list[str]]:
        # A broker that knows the user under another password: the sink's connect is refused.
        right, wrong = f"right-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
        passwd = _password_file(self.tmp_path / "passwd", "relay", right)
        secure = Mosquitto(
            self.tmp_path / "secure",
            extra_config=f"password_file {passwd}\n",
            allow_anonymous=False,
        )
        secure.start()
        self.cleanups.append(secure.stop)
        sink = self.make_sink(secure.port, username="relay", password=wrong)
        return sink, [right, wrong]


class TestContractMqtt5Binary(_MqttContract):
    pass


class TestContractMqtt5Structured(_MqttContract):
    mode = "structured"


class TestContractMqtt311(_MqttContract):
    protocol = "3.1.1"
    mode = None
    cannot: ClassVar[Mapping[str, str]] = {
        "refuse_one_event": "an MQTT 3.1.1 PUBACK carries no reason code: Mosquitto "
        "acknowledges a publish its ACL denies and drops it (measured), so no client can see "
        "one event refused",
        "dead_letter_one_event": "as refuse_one_event",
    }


# -- events from a real engine -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "mode"), [("5", "binary"), ("5", "structured"), ("3.1.1", None)]
)
async def test_engine_events_follow_the_binding(
    engine: PrivateEngine, mosquitto: Mosquitto, tmp_path: Path, protocol: str, mode: str | None
) -> None:
    root = prefix()
    sub = Subscriber(mosquitto.port, f"{root}/#", protocol=protocol)
    sink_config = {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": mosquitto.port,
        "topic": root + "/{engine_name}/{type}/{action}",
        "status_topic": root + "/{relay_id}/status",
        "protocol": protocol,
        "mode": mode,
    }
    volume, container = f"vol-{root}", f"ctr-{root}"
    try:
        settings = relay_settings(engine.docker_host, tmp_path, sinks=[sink_config])
        async with running_relay(settings):
            engine.cli("volume", "create", volume)
            engine.cli(
                "run",
                "--name",
                container,
                "--label",
                "team=mqtt",
                "--network",
                "none",
                "busybox:latest",
                "true",
            )
            engine.cli("rm", container)
            engine.cli("volume", "rm", volume)

            def seen() -> bool:
                subjects = {(e["subject"], e["data"]["action"]) for e in sub.events()}
                return {(volume, "destroy"), (container, "destroy")} <= subjects

            await async_wait_for(seen, 30, message="volume and container destroy events")
        messages = [m for m in sub.snapshot() if not m.topic.endswith("/status")]
    finally:
        sub.close()

    ours = [m for m in messages if m.structured()["subject"] in (volume, container)]
    actions = [(m.structured()["data"]["type"], m.structured()["data"]["action"]) for m in ours]
    assert [a[1] for a in actions if a[0] == "volume"] == ["create", "destroy"]
    container_actions = [a[1] for a in actions if a[0] == "container"]
    for expected in ("create", "start", "die", "destroy"):
        assert expected in container_actions
    assert (
        container_actions.index("create")
        < container_actions.index("die")
        < container_actions.index("destroy")
    )
    for m in ours:
        event = m.structured()
        data = event["data"]
        assert m.topic == f"{root}/{data['engine']['name']}/{data['type']}/{data['action']}"
        assert event["specversion"] == "1.0"
        assert event["type"] == f"dev.docker-event-relay.{data['type']}.{data['action']}"
        assert event["datacontenttype"] == "application/json"
        if protocol == "5" and mode == "binary":
            assert m.content_type == "application/json"
            assert {k for k, _ in m.user_properties} == BINARY_ATTRIBUTES
            assert set(json.loads(m.payload)) == set(data)  # payload is `data` only
        elif protocol == "5":
            assert m.content_type == STRUCTURED_CONTENT_TYPE
            assert m.user_properties == []
            assert json.loads(m.payload)["id"] == event["id"]
        else:
            assert m.content_type is None and m.user_properties == []
            assert json.loads(m.payload)["specversion"] == "1.0"
        if data["type"] == "container" and data["action"] == "create":
            assert data["actor"]["labels"] == {"team": "mqtt"}


async def test_prune_events_arrive_with_reclaimed_bytes(
    engine: PrivateEngine, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    root = prefix()
    sub = Subscriber(mosquitto.port, f"{root}/+/+/prune")
    recorder = Recorder()
    sink = mqtt_sink(
        mosquitto.port, topic=root + "/{engine_name}/{type}/{action}", status_topic=root + "/status"
    )

    def read() -> dict[str, int | None]:
        return {
            e.ce.data.type: e.ce.data.reclaimed_bytes
            for e in recorder.events
            if e.ce.data.action == "prune"
        }

    def received() -> dict[str, int]:
        return {e["data"]["type"]: e["data"]["reclaimed_bytes"] for e in sub.events()}

    try:
        settings = relay_settings(engine.docker_host, tmp_path)
        async with running_relay(settings, sinks=[(sink, RouteFilter()), (recorder, ALL)]):
            reported = prune_scenario(engine)
            await async_wait_for(
                lambda: read().keys() == reported.keys() and received().keys() == read().keys(),
                30,
                message="every prune event the relay read",
            )
    finally:
        sub.close()
    # What the engine said, byte for byte, per type, read by the relay and received.
    assert received() == read() == reported
    assert [m.topic.split("/")[2:] for m in sub.snapshot()] == [[t, "prune"] for t in read()]
    got = received()
    assert got["container"] >= 5 * 2**20
    assert got["volume"] >= 5 * 2**20
    assert got["network"] == 0
    assert got["image"] > 0


# -- a broker restart mid-stream ---------------------------------------------------------------


async def test_broker_restart_mid_stream_loses_no_qos1_event(
    engine: PrivateEngine,
    mosquitto_factory: Callable[..., Mosquitto],
    tmp_path: Path,
) -> None:
    # A persistent broker keeps the subscriber's session and its queue across the restart, so
    # any loss below can only be the relay's.
    store = tmp_path / "mosquitto-db"
    store.mkdir()
    broker = mosquitto_factory(f"persistence true\npersistence_location {store}/\n")
    root = prefix()
    sub = Subscriber(broker.port, f"{root}/#", client_id=f"sub-{root}", persistent=True)
    recorder = Recorder()
    sink = mqtt_sink(
        broker.port, topic=root + "/{type}/{action}/{subject}", status_topic=root + "/status", qos=1
    )
    made: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        # Events keep coming the whole time: before, during and after the outage.
        while not stop.is_set():
            name = f"r{root}-{len(made):04d}"
            engine.cli("volume", "create", name)
            made.append(name)

    def ours(events: Sequence[Event]) -> list[str]:
        return [e.id for e in events if (e.ce.subject or "").startswith(f"r{root}")]

    settings = relay_settings(engine.docker_host, tmp_path / "state")
    try:
        async with running_relay(settings, sinks=[(sink, RouteFilter()), (recorder, ALL)]):
            producer = threading.Thread(target=produce)
            producer.start()
            try:
                await async_wait_for(lambda: len(sub.ids()) >= 20, 60, message="20 delivered")
                broker.stop()
                down_at = len(ours(recorder.events))
                await async_wait_for(
                    lambda: len(ours(recorder.events)) >= down_at + 20,
                    60,
                    message="20 events read while the broker is down",
                )
                broker.start()
                up_at = len(ours(recorder.events))
                await async_wait_for(
                    lambda: len(ours(recorder.events)) >= up_at + 20,
                    60,
                    message="20 events read after the broker is back",
                )
            finally:
                stop.set()
                producer.join()
            await async_wait_for(
                lambda: len(ours(recorder.events)) == len(made),
                30,
                message="the relay read every volume create",
            )
            read = ours(recorder.events)
            await async_wait_for(
                lambda: set(read) <= set(sub.ids()),
                60,
                message="every event read reaches the subscriber",
            )
    finally:
        sub.close()
    assert sink.connects >= 2  # it did lose the broker and reconnect by itself
    delivered = sub.ids()
    assert set(delivered) == set(read)
    # Order of first arrival follows the engine's (a re-sent duplicate may come later).
    first_seen = list(dict.fromkeys(delivered))
    assert first_seen == read


# -- security ----------------------------------------------------------------------------------


pki = pki_fixture()

READER_PASSWORD = "reader-pw"


def _password_file(path: Path, user: str, password: str) -> Path:
    """A mosquitto password file with `user` and the test's subscriber `reader`."""
    path.unlink(missing_ok=True)
    for n, (name, secret) in enumerate(((user, password), ("reader", READER_PASSWORD))):
        create = ["-c"] if n == 0 else []
        subprocess.run(
            ["mosquitto_passwd", "-b", *create, str(path), name, secret],
            check=True,
            capture_output=True,
        )
    return path


def _secure_broker(make: Callable[..., Mosquitto], pki: Pki, passwd: Path) -> Mosquitto:
    # Persistence: the subscriber's session and queue survive the restart in the retry test.
    store = passwd.parent / "db"
    store.mkdir(exist_ok=True)
    return make(
        extra_config=f"cafile {pki.ca}\ncertfile {pki.server_cert}\n"
        f"keyfile {pki.server_key}\nrequire_certificate true\npassword_file {passwd}\n"
        f"persistence true\npersistence_location {store}/\n",
        allow_anonymous=False,
    )


def _secure_subscriber(port: int, topic: str, pki: Pki) -> Subscriber:
    return Subscriber(
        port,
        topic,
        tls=pki.client_context(),
        username="reader",
        password=READER_PASSWORD,
        client_id=f"reader-{uuid.uuid4().hex[:8]}",
        persistent=True,
    )


async def test_tls_client_certificate_and_password(
    mosquitto_factory: Callable[..., Mosquitto],
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex[:6]}"
    broker = _secure_broker(
        mosquitto_factory, pki, _password_file(tmp_path / "pw", "relay", secret)
    )
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "key-secret").write_text(KEY_PASSWORD + "\n")
    root = prefix()
    sub = _secure_subscriber(broker.port, f"{root}/#", pki)
    # The client key is encrypted; both secrets come from files.
    tls = pki.client_tls(
        key_file=str(pki.client_key_encrypted), key_password_file=str(tmp_path / "key-secret")
    )
    sink = mqtt_sink(
        broker.port,
        topic=root + "/{type}/{action}",
        status_topic=root + "/status",
        tls=tls,
        username="relay",
        password_file=tmp_path / "secret",
    )
    for shown in (repr(sink.config), repr(vars(sink))):
        assert secret not in shown and KEY_PASSWORD not in shown
    events = sample_events(10)
    caplog.set_level(logging.DEBUG)
    try:
        await sink.start()
        await sink.send(events)
        await async_wait_for(lambda: len(sub.ids()) == 10, 20, message="10 events over TLS")
        await sink.aclose()
    finally:
        sub.close()
    assert sub.ids() == [e.id for e in events]
    assert secret not in caplog.text and KEY_PASSWORD not in caplog.text


async def test_tls_verification_toggle(
    mosquitto_factory: Callable[..., Mosquitto], pki: Pki
) -> None:
    broker = mosquitto_factory(
        extra_config=f"certfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
    )
    # Neither the system CAs nor another CA know our test CA: verification must refuse, and
    # say why.
    for tls in ({}, {"ca_file": str(pki.other_ca)}):
        strict = mqtt_sink(broker.port, tls=tls, connect_timeout=5)
        with pytest.raises(RetryableSinkError, match="TLS handshake failed"):
            await strict.start()
        await strict.aclose()
    for tls in ({"verify": False}, {"ca_file": str(pki.ca)}):
        async with started(mqtt_sink(broker.port, tls=tls)) as sink:
            await sink.send(sample_events(2))


async def test_wrong_password_is_reported_and_retried_until_fixed(
    engine: PrivateEngine,
    mosquitto_factory: Callable[..., Mosquitto],
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    right, wrong = f"right-{uuid.uuid4().hex[:6]}", f"wrong-{uuid.uuid4().hex[:6]}"
    passwd = _password_file(tmp_path / "pw", "relay", right)
    broker = _secure_broker(mosquitto_factory, pki, passwd)
    root = prefix()
    sub = _secure_subscriber(broker.port, f"{root}/#", pki)
    config = MqttSinkConfig(
        name="secure",
        host="127.0.0.1",
        port=broker.port,
        topic=root + "/{type}/{action}/{subject}",
        status_topic=root + "/status",
        tls=pki.client_tls(),
        username="relay",
        password=wrong,
    )
    sink = config.build(SinkContext("node-pw"))
    assert isinstance(sink, MqttSink)
    caplog.set_level(logging.INFO)
    names = [f"pw{root}-{i}" for i in range(5)]
    try:
        settings = relay_settings(engine.docker_host, tmp_path / "state")
        async with running_relay(settings, sinks=[(sink, RouteFilter())]) as relay:
            worker = relay.workers[0]
            for name in names:
                engine.cli("volume", "create", name)
            await async_wait_for(
                lambda: any("refused the connection" in r.getMessage() for r in caplog.records),
                20,
                message="the refusal logged",
            )
            assert not worker.started
            refusals = [r for r in caplog.records if "refused the connection" in r.getMessage()]
            assert refusals, caplog.text
            line = refusals[0].getMessage()
            assert "secure" in line and "reason code 13" in line, line  # 134 or 135
            assert "Bad user name or password" in line or "Not authorized" in line, line
            # The broker's password file changes to what the relay holds; the relay keeps
            # retrying on its own and delivers what its outbox held.
            _password_file(passwd, "relay", wrong)
            broker.restart()
            await async_wait_for(
                lambda: {e["subject"] for e in sub.events()} >= set(names),
                30,
                message="held events delivered after the credentials became right",
            )
            await async_wait_for(lambda: relay.readiness()[0], 10, message="relay ready again")
            assert worker.started
    finally:
        sub.close()
    assert wrong not in caplog.text and right not in caplog.text
    own = [
        r.getMessage()
        for r in caplog.records
        if r.name == "relay.sink.secure" and "refused the connection" in r.getMessage()
    ]
    # The sink says it once, not once per retry; an attempt that meets the broker's restart
    # (closed before any CONNACK) is no refusal and not logged as one.
    assert len(own) == 1, own
    assert "reason code 13" in own[0] and "check username/password" in own[0], own


# -- status and will -----------------------------------------------------------------------------


def _relay_process(
    engine: PrivateEngine, state: Path, port: int, status: str
) -> subprocess.Popen[bytes]:
    env = engine.env()
    env.update(
        RELAY_ENGINE__HOST=engine.docker_host,
        RELAY_STATE_DIR=str(state),
        RELAY_HTTP__ENABLED="false",
        RELAY_NODE_NAME="will-node",
        RELAY_LOG__FORMAT="console",
        RELAY_SINKS=json.dumps(
            [
                {
                    "type": "mqtt",
                    "host": "127.0.0.1",
                    "port": port,
                    "status_topic": status,
                    "topic": "will/{type}/{action}",
                }
            ]
        ),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "run"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(state / "relay.log", "ab"),
    )


def test_will_fires_when_the_relay_is_killed(
    engine: PrivateEngine, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    status = f"{prefix()}/{{relay_id}}/status"
    topic = status.format(relay_id="will-node")
    sub = Subscriber(mosquitto.port, topic)

    def last() -> str | None:
        got = [m.payload.decode() for m in sub.snapshot()]
        return got[-1] if got else None

    proc = _relay_process(engine, tmp_path, mosquitto.port, status)
    try:
        wait_for(lambda: last() == "online", 30, message="online after start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: last() == "offline", 30, message="offline from the will")
        proc = _relay_process(engine, tmp_path, mosquitto.port, status)
        wait_for(lambda: last() == "online", 30, message="online after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: last() == "offline", 10, message="offline after a clean stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()
    assert [m.payload for m in sub.snapshot()] == [b"online", b"offline", b"online", b"offline"]
    # A late subscriber sees the retained state.
    late = Subscriber(mosquitto.port, topic)
    try:
        wait_for(lambda: late.snapshot(), 10, message="retained status")
        assert late.snapshot()[0].payload == b"offline" and late.snapshot()[0].retain
    finally:
        late.close()
    assert os.path.exists(tmp_path / "relay.log")
