"""Isolation in the outbox: a batch the destination rejected (RejectedSinkError) is sent again
one event at a time, in order, and only an event rejected again when sent alone is
dead-lettered.

The sinks here are scripted stand-ins for the pure logic of the worker; the real destinations
(Mosquitto dropping the connection, tansu refusing a record) are in
tests/integration/test_rejection.py. Backoff waits are off (stamina's testing mode); where the
waits matter, the test counts the policy's attempts, each of which follows one backoff wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import stamina

from relay.deadletter import DeadLetter
from relay.errors import (
    PartialDeliveryError,
    PermanentSinkError,
    RejectedSinkError,
    RetryableSinkError,
    SinkError,
    SinkStoppedError,
)
from relay.lifecycle import TaskStatus
from relay.metrics import Metrics
from relay.outbox import REJECTED_ALONE, Budget, Isolation, SinkWorker
from relay.retry import RetryPolicy
from relay.schema import Event
from relay.settings import RetrySettings
from relay.sink import Sink, SinkContext
from relay.spool import Spool
from tests.contract import sample_events

ATTEMPT = "|"  # marks, in the log of sends, where the policy began an attempt (after a wait)


@pytest.fixture(autouse=True)
def no_waits() -> Iterator[None]:
    """Retries without backoff waits, at most 20 attempts (fewer where `retry.attempts` says)."""
    stamina.set_testing(True, attempts=20, cap=True)
    yield
    stamina.set_testing(False)


class RejectingSink(Sink):
    """Refuses every send that holds a poison event, the way a broker drops the connection:
    `partial=False`, the whole send fails (nothing was acknowledged); `partial=True`, the events
    before the first poison were acknowledged and the rest were in flight when the connection
    went. `coincidences` rejects a good event that many times more when it is sent alone (a
    broker restart while it was in flight). `script` answers sends in turn first (None: go on
    as above)."""

    def __init__(
        self,
        log: list[Any],
        poison: Sequence[str] = (),
        *,
        partial: bool = False,
        coincidences: dict[str, int] | None = None,
        script: Sequence[SinkError | None] = (),
    ) -> None:
        super().__init__("rejecting", max_batch=10)
        self.log = log
        self.poison = set(poison)
        self.partial = partial
        self.coincidences = dict(coincidences or {})
        self.script = list(script)
        self.delivered: list[str] = []

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Event]) -> None:
        ids = [e.id for e in batch]
        self.log.append(ids)
        if self.script:
            outcome = self.script.pop(0)
            if outcome is not None:
                raise outcome
        if len(ids) == 1 and self.coincidences.get(ids[0], 0) > 0:
            self.coincidences[ids[0]] -= 1
            raise RejectedSinkError("connection lost: Unspecified error", sink=self.name)
        first = next((i for i, id_ in enumerate(ids) if id_ in self.poison), None)
        if first is None:
            self.delivered += ids
            return
        lost = RejectedSinkError("connection lost: Malformed packet", sink=self.name)
        if not self.partial or first == 0:
            raise lost
        self.delivered += ids[:first]
        raise PartialDeliveryError(dict.fromkeys(range(first, len(ids)), lost), sink=self.name)

    async def aclose(self) -> None:
        pass

    def sends(self) -> list[list[str]]:
        return [entry for entry in self.log if entry != ATTEMPT]


class MarkingPolicy(RetryPolicy):
    """The shared policy, marking in `log` where each delivery attempt begins: every attempt
    but a batch's first comes after one backoff wait."""

    def __init__(self, settings: RetrySettings, log: list[Any]) -> None:
        super().__init__(settings)
        self.log = log

    async def deliver(self, attempt: Callable[[], Awaitable[None]]) -> None:
        async def marked() -> None:
            self.log.append(ATTEMPT)
            await attempt()

        await super().deliver(marked)


class Run:
    """A SinkWorker over a real spool and dead-letter file, fed `events`, drained."""

    def __init__(self, sink: RejectingSink, tmp_path: Path, retry: RetrySettings) -> None:
        self.sink = sink
        self.metrics = Metrics()
        self.spool = Spool(tmp_path / "spool.db", self.metrics)
        recovered = self.spool.open([sink.name])
        self.dead_letter = DeadLetter(tmp_path / "dl.jsonl", self.spool, self.metrics)
        self.worker = SinkWorker(
            sink,
            1000,
            "dead_letter",
            10**9,
            Budget(10**10),
            self.spool,
            MarkingPolicy(retry, sink.log),
            self.dead_letter,
            self.metrics,
        )
        self.worker.recover(self.spool.bits[sink.name], recovered.backlog[sink.name])

    async def deliver(self, events: list[Event]) -> None:
        for event in events:
            self.spool.add(event, self.worker.bit)
            self.worker.put(event)
        self.worker.outbox.close()
        status = TaskStatus(asyncio.get_running_loop().create_future())
        await asyncio.wait_for(self.worker.run(status), 10)

    def dead_letters(self) -> list[dict[str, Any]]:
        path = self.dead_letter.path
        if not path.exists():
            return []
        return [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, {"sink": self.sink.name, **labels}) or 0

    def owes_nothing(self) -> bool:
        return self.worker.held_events == 0 and not self.spool.held(self.worker.bit, 0)

    def close(self) -> None:
        self.dead_letter.close()
        self.spool.close()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    made: list[Run] = []

    def make(sink: RejectingSink, retry: RetrySettings | None = None) -> Run:
        made.append(Run(sink, tmp_path / str(len(made)), retry or RetrySettings()))
        return made[-1]

    yield make
    for r in made:
        r.close()


def ids(events: Sequence[Event]) -> list[str]:
    return [e.id for e in events]


def alone(events: Sequence[Event]) -> list[list[str]]:
    return [[e.id] for e in events]


# -- one poison event ----------------------------------------------------------------------------


async def test_a_rejected_batch_is_sent_one_at_a_time_and_only_the_poison_is_dead_lettered(
    run: Callable[..., Run],
) -> None:
    log: list[Any] = []
    events = sample_events(10)
    poison = events[4]
    r = run(RejectingSink(log, [poison.id]))
    await r.deliver(events)

    good = [e for e in events if e is not poison]
    assert r.sink.delivered == ids(good)  # each once, in engine order
    # The batch; a backoff; each event alone, in order, until the poison is refused; a
    # backoff; the poison alone again, refused again: dead-lettered, and the rest go on at once.
    assert log == [
        ATTEMPT,
        ids(events),
        ATTEMPT,
        *alone(events[:5]),
        ATTEMPT,
        [poison.id],
        *alone(events[5:]),
    ]
    (record,) = r.dead_letters()
    assert (record["event"]["id"], record["reason"], record["sink"]) == (
        poison.id,
        "permanent",
        "rejecting",
    )
    assert record["error_type"] == "PermanentSinkError"
    assert record["error"] == (
        "[rejecting] rejected by the destination when sent alone (2 times, each on a new "
        "attempt): connection lost: Malformed packet"
    )
    assert r.value("relay_events_delivered_total") == 9
    assert r.value("relay_events_dead_lettered_total", reason="permanent") == 1
    # Sent again: the 10 of the batch once each, and the poison a second time alone.
    assert r.value("relay_events_retried_total") == 11
    assert r.owes_nothing()
    assert r.worker.failing_since is None and r.worker.ready  # delivering again


async def test_events_acknowledged_before_the_loss_are_not_sent_again(
    run: Callable[..., Run],
) -> None:
    log: list[Any] = []
    events = sample_events(15)  # a batch of 10, then one of 5
    poison = events[6]
    r = run(RejectingSink(log, [poison.id], partial=True))
    await r.deliver(events)

    assert r.sink.delivered == ids(e for e in events if e is not poison)
    # Only what was in flight is suspect: from the poison to the end of its batch. Once those
    # are through, the next batch goes whole again.
    assert log == [
        ATTEMPT,
        ids(events[:10]),
        ATTEMPT,
        [poison.id],
        ATTEMPT,
        [poison.id],
        *alone(events[7:10]),
        ATTEMPT,
        ids(events[10:]),
    ]
    assert [(d["event"]["id"], d["reason"]) for d in r.dead_letters()] == [(poison.id, "permanent")]
    assert r.value("relay_events_retried_total") == 4 + 1  # 6..9 once, the poison twice
    assert r.owes_nothing()


async def test_two_poison_events_in_one_batch(run: Callable[..., Run]) -> None:
    log: list[Any] = []
    events = sample_events(8)
    poison = [events[2], events[5]]
    r = run(RejectingSink(log, ids(poison)))
    await r.deliver(events)

    assert r.sink.delivered == ids(e for e in events if e not in poison)
    assert [d["event"]["id"] for d in r.dead_letters()] == ids(poison)
    assert {d["reason"] for d in r.dead_letters()} == {"permanent"}
    # Each refusal alone is followed by a backoff, except the one that settles the event.
    assert log == [
        ATTEMPT,
        ids(events),
        ATTEMPT,
        *alone(events[:3]),
        ATTEMPT,
        [events[2].id],
        *alone(events[3:6]),
        ATTEMPT,
        [events[5].id],
        *alone(events[6:]),
    ]
    assert r.owes_nothing()


async def test_a_batch_of_one_rejected_twice_is_dead_lettered(run: Callable[..., Run]) -> None:
    log: list[Any] = []
    (poison,) = sample_events(1)
    r = run(RejectingSink(log, [poison.id]))
    await r.deliver([poison])
    assert log == [ATTEMPT, [poison.id], ATTEMPT, [poison.id]]
    assert [(d["event"]["id"], d["reason"]) for d in r.dead_letters()] == [(poison.id, "permanent")]
    assert r.sink.delivered == [] and r.owes_nothing()
    assert REJECTED_ALONE == 2


# -- what is not a poison event ------------------------------------------------------------------


async def test_a_good_event_rejected_once_alone_is_delivered(run: Callable[..., Run]) -> None:
    # The broker restarted while the event was alone in flight: it comes back, and the event
    # with it.
    log: list[Any] = []
    events = sample_events(5)
    lost = RejectedSinkError("connection lost: Unspecified error", sink="rejecting")
    r = run(RejectingSink(log, script=[lost], coincidences={events[1].id: 1}))
    await r.deliver(events)

    assert r.sink.delivered == ids(events)
    assert r.dead_letters() == []
    assert log == [
        ATTEMPT,
        ids(events),
        ATTEMPT,
        *alone(events[:2]),
        ATTEMPT,
        *alone(events[1:]),
    ]
    assert r.owes_nothing()


async def test_plain_retryable_failures_never_isolate(run: Callable[..., Run]) -> None:
    log: list[Any] = []
    events = sample_events(10)
    down = RetryableSinkError("broker 127.0.0.1:1883 unreachable: Connection refused")
    timeout = RetryableSinkError("no acknowledgement within 30s")
    partly = PartialDeliveryError(dict.fromkeys(range(6, 10), timeout))
    r = run(RejectingSink(log, script=[down, down, partly]))
    r.sink.partial = True
    await r.deliver(events)

    # The same batch again and again; after a partial failure, its rest as one batch.
    assert log == [
        ATTEMPT,
        ids(events),
        ATTEMPT,
        ids(events),
        ATTEMPT,
        ids(events),
        ATTEMPT,
        ids(events[6:]),
    ]
    assert r.sink.delivered == ids(events[6:])  # the script stands for the first three sends
    assert r.dead_letters() == []
    assert r.value("relay_events_retried_total") == 10 + 10 + 4


async def test_a_plain_failure_alone_during_isolation_keeps_the_event_alone(
    run: Callable[..., Run],
) -> None:
    # While isolating, the broker goes away: the event waits (with backoff) and is sent alone
    # again; being unreachable is no rejection, so it is not counted against the event.
    log: list[Any] = []
    events = sample_events(4)
    lost = RejectedSinkError("connection lost: Unspecified error", sink="rejecting")
    down = RetryableSinkError("broker unreachable")
    r = run(RejectingSink(log, [events[3].id], script=[lost, None, down, down]))
    await r.deliver(events)

    assert log == [
        ATTEMPT,
        ids(events),
        ATTEMPT,
        [events[0].id],
        [events[1].id],
        ATTEMPT,
        [events[1].id],
        ATTEMPT,
        [events[1].id],
        [events[2].id],
        [events[3].id],
        ATTEMPT,
        [events[3].id],
    ]
    assert r.sink.delivered == ids(events[:3])
    assert [d["event"]["id"] for d in r.dead_letters()] == [events[3].id]


async def test_other_outcomes_alone_are_kept_per_event(run: Callable[..., Run]) -> None:
    # While isolating, a lone event may fail for good in its own right, or the destination may
    # ask to stop: those take their usual course.
    log: list[Any] = []
    events = sample_events(5)
    lost = RejectedSinkError("connection lost", sink="rejecting")
    refused = PermanentSinkError("not authorized", sink="rejecting")
    gone = SinkStoppedError("410 Gone", sink="rejecting")
    r = run(RejectingSink(log, script=[lost, None, refused, gone]))
    await r.deliver(events)

    assert log == [ATTEMPT, ids(events), ATTEMPT, *alone(events[:3])]
    assert r.sink.delivered == [events[0].id]
    assert [(d["event"]["id"], d["reason"]) for d in r.dead_letters()] == [
        (events[1].id, "permanent"),
        (events[2].id, "sink_stopped"),
        (events[3].id, "sink_stopped"),
        (events[4].id, "sink_stopped"),
    ]
    assert r.worker.stopped_reason is not None
    assert r.owes_nothing()


async def test_retries_run_out_during_isolation(run: Callable[..., Run]) -> None:
    # `retry.attempts` bounds a batch's attempts, isolation included: what is still owed then
    # is dead-lettered as retries exhausted, the poison with it.
    log: list[Any] = []
    events = sample_events(4)
    r = run(RejectingSink(log, [events[1].id]), RetrySettings(attempts=2))
    await r.deliver(events)

    assert log == [ATTEMPT, ids(events), ATTEMPT, *alone(events[:2])]
    assert r.sink.delivered == [events[0].id]
    assert [(d["event"]["id"], d["reason"]) for d in r.dead_letters()] == [
        (e.id, "retries_exhausted") for e in events[1:]
    ]
    assert r.owes_nothing()


# -- the helper ----------------------------------------------------------------------------------


def test_isolation_bookkeeping() -> None:
    events = sample_events(6)
    state = Isolation(list(events))
    assert state.sending(events) == 0
    # Sent whole; 0 and 1 delivered, 2 rejected, 3 failed plainly, 4 rejected, 5 failed plainly.
    state.settled([events[2], events[3], events[4], events[5]], sent=6, suspects=3)
    assert state.pending == events[2:] and state.alone == 3
    assert state.sending(events[2:3]) == 1
    state.settled([events[2]], sent=1, suspects=0)  # still owed: still alone
    assert state.alone == 3
    assert state.rejected_alone(events[2]) == 1 and state.rejected_alone(events[2]) == 2
    state.settled([], sent=1, suspects=0)  # settled: the next suspect
    assert state.pending == events[3:] and state.alone == 2
    state.settled([], sent=1, suspects=0)
    state.settled([], sent=1, suspects=0)
    assert state.pending == events[5:] and state.alone == 0  # isolation is over


# -- what the sinks call a rejection -------------------------------------------------------------


def kafka_sink() -> Any:
    from sinks.kafka import KafkaSinkConfig

    return KafkaSinkConfig(bootstrap_servers="127.0.0.1:9092").build(SinkContext("node-1"))


def test_kafka_broker_refusals_of_a_batch_are_rejections_and_the_producers_own_check_is_not() -> (
    None
):
    from aiokafka import errors

    from sinks.kafka import _know_invalid_record

    sink = kafka_sink()
    # How aiokafka's sender builds a broker's error for a partition's batch: the class of the
    # code, no arguments.
    _know_invalid_record()
    for code in (10, 18, 2, 87):  # MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE, CORRUPT, INVALID
        answer = errors.for_code(code)()
        translated = sink._translate(answer, "topic-x")
        assert type(translated) is RejectedSinkError, (code, translated)
        assert "topic-x" in str(translated) and f"[Error {code}]" in str(translated)
    # The producer's own check, before anything is sent: this record alone, for good.
    own = errors.MessageSizeTooLargeError("The message is 2000000 bytes when serialized ...")
    assert type(sink._translate(own, "topic-x")) is PermanentSinkError
    # A broker failing says nothing about the records (tansu answers it while it starts).
    assert type(sink._translate(errors.UnknownError(), "topic-x")) is RetryableSinkError


def test_kafka_invalid_record_is_known_once_the_sink_connects() -> None:
    from aiokafka import errors

    from sinks.kafka import _know_invalid_record

    _know_invalid_record()
    _know_invalid_record()  # idempotent
    assert errors.for_code(87).errno == 87
    assert errors.for_code(87).message == "INVALID_RECORD"


def mqtt_sink(**settings: Any) -> Any:
    from sinks.mqtt import MqttSinkConfig

    return MqttSinkConfig(host="127.0.0.1", port=1883, **settings).build(SinkContext("node-1"))


@pytest.mark.parametrize(
    ("code", "name", "from_broker", "suspect"),
    [
        # Measured against Mosquitto 2.0.11 with paho 2.2 (MQTT 5 unless said):
        (0x81, "Malformed packet", True, True),  # a control character in a topic
        (0x95, "Packet too large", True, True),  # a packet over max_packet_size
        (0x82, "Protocol error", False, True),  # paho refusing the PUBACK 0x95 of a message
        # over message_size_limit
        (0x80, "Unspecified error", False, True),  # the socket closed: Mosquitto's restart,
        # a session takeover, MQTT 3.1.1's every refusal, a malformed user property
        (0x8D, "Keep alive timeout", False, False),
        (0x8B, "Server shutting down", True, False),
        (0x8E, "Session taken over", True, False),
        (0x00, "Normal disconnection", False, False),  # our own close
    ],
)
def test_mqtt_loss_classification(code: int, name: str, from_broker: bool, suspect: bool) -> None:
    from sinks.mqtt.sink import _loss

    loss = _loss("127.0.0.1:1883", code, name, from_broker=from_broker)
    assert loss.suspect is suspect
    assert name in loss.text and "127.0.0.1:1883" in loss.text


async def test_mqtt_unacknowledged_messages_fail_by_how_the_connection_ended() -> None:
    from sinks.mqtt.sink import _loss

    sink = mqtt_sink()
    loop = asyncio.get_running_loop()

    def ended(code: int, name: str) -> asyncio.Future[Any]:
        lost: asyncio.Future[Any] = loop.create_future()
        lost.set_result(_loss(sink.address, code, name, from_broker=True))
        return lost

    refused = sink._unacknowledged(ended(0x81, "Malformed packet"), in_flight=True)
    assert type(refused) is RejectedSinkError
    assert str(refused) == (
        "[mqtt] broker 127.0.0.1:1883 closed the connection: Malformed packet (reason code "
        "129), with the message in flight"
    )
    # Published while the connection was already gone: it was never in flight.
    lost_before = sink._unacknowledged(ended(0x81, "Malformed packet"), in_flight=False)
    assert type(lost_before) is RetryableSinkError
    restart = sink._unacknowledged(ended(0x8B, "Server shutting down"), in_flight=True)
    assert type(restart) is RetryableSinkError
    waiting: asyncio.Future[Any] = loop.create_future()
    slow = sink._unacknowledged(waiting, in_flight=True)
    assert type(slow) is RetryableSinkError and "no acknowledgement within 30s" in str(slow)


async def test_mqtt_a_lost_connection_drops_what_paho_would_resend() -> None:
    # paho's own message store, as a lost connection leaves it: what it would re-send by
    # itself after the reconnect.
    import paho.mqtt.client as mqtt

    from sinks.mqtt.sink import _LOST

    sink = mqtt_sink(qos=2)
    client = sink._make_client()
    loop = asyncio.get_running_loop()
    states = {
        "queued": mqtt.mqtt_ms_queued,
        "no PUBREC yet": mqtt.mqtt_ms_wait_for_pubrec,
        "PUBREC, PUBREL sent": mqtt.mqtt_ms_wait_for_pubcomp,
        "PUBREC, PUBREL owed": mqtt.mqtt_ms_resend_pubrel,
    }
    futures: dict[str, asyncio.Future[int]] = {}
    for what, state in states.items():
        info = client.publish(f"t/{what}", b"x", qos=2)  # not connected: paho stores it
        client._out_messages[info.mid].state = state
        futures[what] = loop.create_future()
        sink._by_mid[info.mid] = futures[what]
    qos1 = client.publish("t/qos1", b"x", qos=1)
    client._out_messages[qos1.mid].state = mqtt.mqtt_ms_wait_for_puback
    futures["qos1"] = loop.create_future()
    sink._by_mid[qos1.mid] = futures["qos1"]

    sink._forget_unacknowledged(client)

    # The broker holds the QoS 2 messages it answered with PUBREC: paho completes them.
    assert sorted(m.topic for m in client._out_messages.values()) == [
        "t/PUBREC, PUBREL owed",
        "t/PUBREC, PUBREL sent",
    ]
    assert {what for what, f in futures.items() if not f.done()} == {
        "PUBREC, PUBREL sent",
        "PUBREC, PUBREL owed",
    }
    assert {f.result() for f in futures.values() if f.done()} == {_LOST}
    assert set(sink._by_mid.values()) == {
        futures["PUBREC, PUBREL sent"],
        futures["PUBREC, PUBREL owed"],
    }
