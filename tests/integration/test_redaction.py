"""Redaction against a real engine and real destinations: a container whose labels carry a
secret and an owner, and an exec whose command line carries a secret argument, relayed to a
webhook receiver and to Kafka (tansu), both redacting, and to Mosquitto, not redacting.

Every byte each destination received is searched: the HTTP bodies, headers and paths; the
Kafka topics, keys, headers and values; the MQTT topics, user properties and payloads. The
secrets appear nowhere at the redacting destinations and do appear at the other; the owner
arrives there as the documented HMAC, the same at both (one key), and in clear at Mosquitto."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay import plugins
from relay.router import RouteFilter
from relay.schema import Event
from tests.harness import Mosquitto, PrivateEngine, Tansu, async_wait_for
from tests.harness.receiver import Receiver
from tests.integration.test_kafka_sink import Record, consume, kafka_settings
from tests.integration.test_mqtt_sink import Subscriber
from tests.relay_harness import Recorder, relay_settings, running_relay

pytestmark = pytest.mark.integration

KEY = "3f9c2a7e0b8d4c1f6a5e9b2d7c0f8a3e"  # 32 bytes: the shortest key the relay accepts


def documented_hash(value: str) -> str:
    """README, Redaction: `hmac-sha256:` + the first 32 hex digits of HMAC-SHA256(key, value)."""
    digest = hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()
    return "hmac-sha256:" + digest[:32]


@dataclass
class Secrets:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def container(self) -> str:
        return f"redact-{self.tag}"

    @property
    def password(self) -> str:
        return f"pw-Hunter2-{self.tag}"  # a label value: dropped

    @property
    def owner(self) -> str:
        return f"owner-{self.tag}"  # a label value: hashed

    @property
    def exec_secret(self) -> str:
        return f"exec-Token-{self.tag}"  # an exec argument: cut off

    @property
    def label_name(self) -> str:
        return "com.example.secret.db_password"

    def create(self, engine: PrivateEngine) -> None:
        engine.cli(
            "run",
            "-d",
            "--name",
            self.container,
            "--network",
            "none",
            "--label",
            f"{self.label_name}={self.password}",
            "--label",
            f"com.example.owner={self.owner}",
            "--label",
            "app=web",
            "busybox:latest",
            "sleep",
            "600",
        )
        engine.cli("exec", self.container, "sh", "-c", f"test -n {self.exec_secret}")
        engine.cli("rm", "-f", self.container)

    def ours(self, recorder: Recorder) -> list[Event]:
        return [e for e in recorder.events if e.ce.subject == self.container]


def http_bytes(receiver: Receiver) -> list[bytes]:
    """Everything each request carried: path, headers (names and values), body."""
    out = []
    for r in receiver.requests:
        head = "\n".join([r.path, *(f"{k}: {v}" for k, v in r.headers.items())])
        out.append(head.encode() + b"\n\n" + r.body)
    return out


def kafka_bytes(records: list[Record]) -> list[bytes]:
    out = []
    for r in records:
        headers = b"\n".join(k.encode() + b": " + v for k, v in r.headers.items())
        out.append(b"\n".join([r.topic.encode(), r.key or b"", headers, r.value]))
    return out


def mqtt_bytes(sub: Subscriber) -> list[bytes]:
    out = []
    for m in sub.snapshot():
        props = "\n".join(f"{k}: {v}" for k, v in m.user_properties)
        out.append(f"{m.topic}\n{props}\n".encode() + m.payload)
    return out


def nowhere(blobs: list[bytes], *secrets: str) -> None:
    for secret in secrets:
        hits = [b for b in blobs if secret.encode() in b]
        assert not hits, f"{secret!r} reached a redacting destination: {hits[0][:400]!r}"


def somewhere(blobs: list[bytes], secret: str) -> None:
    assert any(secret.encode() in b for b in blobs), f"{secret!r} never arrived"


async def test_redacted_values_appear_nowhere_at_the_redacting_destinations(
    engine: PrivateEngine, tansu: Tansu, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    s = Secrets()
    key_file = tmp_path / "redact.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o400)
    rule = {"drop": ["labels.com.example.secret*"], "hash": ["labels.com.example.owner"]}
    topic = f"redact.{s.tag}"
    sub = Subscriber(mosquitto.port, "docker/#")
    recorder = Recorder()
    async with Receiver() as receiver:
        settings = relay_settings(
            engine.docker_host,
            tmp_path / "state",
            # The default for every sink without a rule of its own: the whole command line.
            schema={"exec_command": "full"},
            sinks=[
                {
                    "type": "webhook",
                    "url": receiver.url(),
                    "redact": {**rule, "key_file": str(key_file), "exec_command": "none"},
                },
                kafka_settings(
                    tansu.bootstrap,
                    topic=topic,
                    redact={**rule, "key": KEY, "exec_command": "program"},
                ),
                {"type": "mqtt", "host": "127.0.0.1", "port": mosquitto.port},
            ],
        )
        sinks = [*plugins.build_sinks(settings), (recorder, RouteFilter())]
        try:
            async with running_relay(settings, sinks):
                await asyncio.to_thread(s.create, engine)
                await async_wait_for(
                    lambda: any(e.ce.data.action == "destroy" for e in s.ours(recorder)),
                    60,
                    message="the relay read the container's destroy",
                )
                expected = [e.id for e in s.ours(recorder)]

                def at_hook() -> list[str]:
                    return [e["id"] for e in receiver.events() if e.get("subject") == s.container]

                await async_wait_for(
                    lambda: at_hook() == expected, 60, message="every event at the webhook"
                )
                records = await consume(
                    tansu.bootstrap,
                    [topic],
                    lambda rs: {r.id for r in rs} >= set(expected),
                    timeout=60,
                )

                def at_mqtt() -> list[str]:
                    return [e["id"] for e in sub.events() if e.get("subject") == s.container]

                await async_wait_for(
                    lambda: at_mqtt() == expected, 60, message="every event at Mosquitto"
                )
        finally:
            sub.close()

    read = s.ours(recorder)
    actions = [e.ce.data.action for e in read]
    assert actions[:5] == ["create", "start", "exec_create", "exec_start", "exec_die"]
    assert actions[-1] == "destroy"
    # What the relay read (and the spool held) is the whole event.
    exec_start = read[3]
    assert exec_start.ce.data.action_detail == f"sh -c test -n {s.exec_secret}"
    assert read[0].ce.data.actor.labels[s.label_name] == s.password

    hook, kafka, mqtt = http_bytes(receiver), kafka_bytes(records), mqtt_bytes(sub)
    # Each once (the topic also holds the engine's other events; all of it was searched).
    assert sorted(r.id for r in records if r.id in set(expected)) == sorted(expected)
    nowhere(hook, s.password, s.owner, s.exec_secret, s.label_name)
    nowhere(kafka, s.password, s.owner, s.exec_secret, s.label_name)
    for secret in (s.password, s.owner, s.exec_secret, s.label_name):
        somewhere(mqtt, secret)

    # Each redacting destination, event by event: the labels it may see, the owner's HMAC,
    # and its own exec rule; the unredacting one gets everything.
    hook_events = {e["id"]: e for e in receiver.events() if e.get("subject") == s.container}
    kafka_events = {r.id: r.structured for r in records}
    mqtt_events = {e["id"]: e for e in sub.events() if e.get("subject") == s.container}
    hashed = documented_hash(s.owner)
    for event in read:
        for got in (hook_events[event.id], kafka_events[event.id]):
            assert got["data"]["actor"]["labels"] == {
                "app": "web",
                "com.example.owner": hashed,
            }
            assert got["subject"] == s.container  # the name is not a label
        assert mqtt_events[event.id]["data"]["actor"]["labels"] == {
            s.label_name: s.password,
            "com.example.owner": s.owner,
            "app": "web",
        }
    assert "action_detail" not in hook_events[exec_start.id]["data"]
    assert kafka_events[exec_start.id]["data"]["action_detail"] == "sh"
    assert mqtt_events[exec_start.id]["data"]["action_detail"] == exec_start.ce.data.action_detail
