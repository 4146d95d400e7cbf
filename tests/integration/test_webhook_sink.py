"""Webhook sink against a real aiohttp receiver (tests/harness/receiver.py), with events from a
real engine through the real relay: modes, signatures, every HTTP outcome, Retry-After, a slow
webhook beside a fast one, the prune scenario with a reclaimed-bytes route, mTLS, the contract.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from cloudevents.http import CloudEvent, from_http

from relay.app import Relay
from relay.errors import PartialDeliveryError, PermanentSinkError, RetryableSinkError
from relay.schema import Event
from relay.settings import Settings
from relay.sink import Sink, SinkContext
from sinks.webhook import WebhookSinkConfig, sign
from tests.contract import SinkContract, sample_events, structured
from tests.harness import DelayProxy, PrivateEngine, async_wait_for
from tests.harness.pki import Pki, pki_fixture
from tests.harness.receiver import Receiver, Recorded
from tests.relay_harness import relay_settings, running_relay, started
from tests.scenarios import prune_scenario

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-tests"
MiB = 1024 * 1024

ReceiverFactory = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receivers() -> AsyncIterator[ReceiverFactory]:
    started: list[Receiver] = []

    async def make(**kwargs: Any) -> Receiver:
        receiver = await Receiver(**kwargs).start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.aclose()


def webhook(receiver: Receiver, **values: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": receiver.url(), **values}


def build(receiver: Receiver, **values: Any) -> Sink:
    return WebhookSinkConfig.model_validate(webhook(receiver, **values)).build(SinkContext("t"))


def delivered(relay: Relay, sink: str = "webhook") -> float:
    value = relay.metrics.registry.get_sample_value("relay_events_delivered_total", {"sink": sink})
    return value or 0.0


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    path = settings.dead_letter_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def volume_create_settings(engine: PrivateEngine, tmp_path: Path, **sink: Any) -> Settings:
    """One webhook sink that only gets volume creations (one event per `volume create`)."""
    sink.setdefault("filter", {"types": ["volume"], "actions": ["create"]})
    return relay_settings(engine.docker_host, tmp_path, sinks=[sink])


def new_volume(engine: PrivateEngine, prefix: str = "wh") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    engine.cli("volume", "create", name)
    return name


# -- events from the real engine, in each mode --------------------------------------------------


@pytest.mark.parametrize("mode", ["binary", "structured", "batch"])
async def test_engine_events_arrive_signed_in_each_mode(
    engine: PrivateEngine, tmp_path: Path, receivers: ReceiverFactory, mode: str
) -> None:
    receiver = await receivers(secret=SECRET.encode())
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[webhook(receiver, mode=mode, secret=SECRET, bearer_token="tok")],
    )
    prefix = f"mode-{uuid.uuid4().hex[:6]}"
    async with running_relay(settings) as relay:
        names = [new_volume(engine, prefix) for _ in range(5)]
        cname = f"{prefix}-c"
        engine.cli(
            "run",
            "--name",
            cname,
            "--label",
            "team=relay",
            "--network",
            "none",
            "busybox:latest",
            "true",
        )
        await receiver.wait_for_events(
            6,
            where=lambda e: (
                e.get("subject", "").startswith(prefix)
                and e["type"].endswith((".volume.create", ".container.die"))
            ),
        )
        assert delivered(relay) >= 6
    ours = [e for e in receiver.events() if e.get("subject", "").startswith(prefix)]
    creates = [e for e in ours if e["type"].endswith(".volume.create")]
    assert [e["subject"] for e in creates] == names
    assert all(e["data"]["type"] == "volume" and e["data"]["action"] == "create" for e in creates)
    die = next(e for e in ours if e["type"].endswith(".container.die"))
    assert die["data"]["actor"]["labels"] == {"team": "relay"}
    assert die["data"]["actor"]["attributes"]["exitCode"] == "0"
    for e in ours:
        assert e["specversion"] == "1.0" and e["datacontenttype"] == "application/json"
        assert e["source"].startswith("urn:docker:engine:")
    assert len({e["id"] for e in ours}) == len(ours)
    # Every request carried a valid signature and the bearer token; none was refused.
    assert receiver.requests and all(r.status == 204 for r in receiver.requests)
    assert all(r.headers["authorization"] == "Bearer tok" for r in receiver.requests)
    expected_type = {
        "binary": "application/json",
        "structured": "application/cloudevents+json",
        "batch": "application/cloudevents-batch+json",
    }[mode]
    assert {r.content_type for r in receiver.requests} == {expected_type}
    if mode == "binary":
        assert all(
            r.headers["ce-id"] and r.headers["ce-specversion"] == "1.0" for r in receiver.requests
        )
    assert dead_letters(settings) == []


async def test_receiver_rejects_tampered_body_and_old_timestamp(
    receivers: ReceiverFactory,
) -> None:
    receiver = await receivers(secret=SECRET.encode())
    sink = build(receiver, mode="structured", secret=SECRET)
    async with started(sink):
        await sink.send(sample_events(1))
    [good] = receiver.requests
    assert good.status == 204 and good.signature_error is None
    header = good.headers["x-relay-signature"]
    tampered = good.body.replace(b'"specversion":"1.0"', b'"specversion":"1.0" ')
    assert tampered != good.body
    old = int(time.time()) - 3600
    async with aiohttp.ClientSession() as client:

        async def post(body: bytes, signature: str) -> tuple[int, str]:
            async with client.post(
                receiver.url(), data=body, headers={"X-Relay-Signature": signature}
            ) as resp:
                return resp.status, await resp.text()

        assert await post(tampered, header) == (401, "bad signature: signature mismatch")
        status, text = await post(good.body, sign(SECRET.encode(), good.body, old))
        assert (status, text) == (401, "bad signature: timestamp outside the tolerance (replay?)")
        assert (await post(good.body, header))[0] == 204  # the genuine one still verifies

    # A relay with the wrong secret is refused: permanent, with the receiver's words.
    wrong = build(receiver, mode="structured", secret="not-the-secret")
    async with started(wrong):
        with pytest.raises(PermanentSinkError, match=r"401 Unauthorized: bad signature"):
            await wrong.send(sample_events(1))


# -- outcomes through the relay: retries, dead letters, stop ------------------------------------


@pytest.mark.parametrize(
    ("script", "expected_requests"),
    [
        pytest.param(lambda r: r.fail(500, times=2, body="boom"), 3, id="500"),
        pytest.param(lambda r: r.fail(502, times=1), 2, id="502"),
        pytest.param(lambda r: r.fail(503, times=2), 3, id="503-no-retry-after"),
        pytest.param(lambda r: r.drop_connection(times=2), 3, id="connection-dropped"),
        pytest.param(lambda r: r.slow(3.0, times=1), 2, id="timeout"),
    ],
)
async def test_retryable_outcomes_are_retried_then_delivered(
    engine: PrivateEngine,
    tmp_path: Path,
    receivers: ReceiverFactory,
    script: Callable[[Receiver], None],
    expected_requests: int,
) -> None:
    receiver = await receivers()
    script(receiver)
    settings = volume_create_settings(engine, tmp_path, **webhook(receiver, timeout=1.0))
    async with running_relay(settings) as relay:
        name = new_volume(engine)
        await async_wait_for(lambda: delivered(relay) == 1, 20, message="delivered")
        assert relay.workers[0].ready
        retried = relay.metrics.registry.get_sample_value(
            "relay_events_retried_total", {"sink": "webhook"}
        )
    assert len(receiver.requests) == expected_requests
    # The same event each time.
    assert {r.headers["ce-subject"] for r in receiver.requests} == {name}
    assert len({r.headers["ce-id"] for r in receiver.requests}) == 1
    assert retried == expected_requests - 1
    assert dead_letters(settings) == []


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_honoured(
    engine: PrivateEngine, tmp_path: Path, receivers: ReceiverFactory, form: str
) -> None:
    receiver = await receivers()

    def four_seconds_on() -> str:
        # Computed as the 429 is answered: an HTTP date has whole seconds, so it asks for a
        # wait of more than 3 s, however long the relay took to start.
        return email.utils.formatdate(time.time() + 4, usegmt=True)

    value = "4" if form == "seconds" else four_seconds_on
    receiver.fail(429, times=1, headers={"Retry-After": value})
    settings = volume_create_settings(engine, tmp_path, **webhook(receiver))
    async with running_relay(settings) as relay:
        new_volume(engine)
        await async_wait_for(lambda: delivered(relay) == 1, 30, message="delivered")
    first, second = receiver.requests
    assert (first.status, second.status) == (429, 204)
    # The default backoff's first wait is at most 1.5 s (0.5 s, plus up to 1 s of jitter):
    # a gap of more than 3 s is the Retry-After.
    assert second.arrived - first.arrived > 3.0


async def test_410_gone_stops_the_sink_loudly(
    engine: PrivateEngine,
    tmp_path: Path,
    receivers: ReceiverFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = await receivers()
    receiver.fail(410, body="subscription deleted")
    settings = volume_create_settings(engine, tmp_path, **webhook(receiver))
    async with running_relay(settings) as relay:
        first = new_volume(engine)
        await async_wait_for(lambda: len(dead_letters(settings)) == 1, 20, message="dead letter")
        second = new_volume(engine)
        await async_wait_for(lambda: len(dead_letters(settings)) == 2, 20, message="dead letter")
        worker = relay.workers[0]
        assert worker.stopped_reason is not None and "410" in worker.stopped_reason
        assert (
            relay.metrics.registry.get_sample_value("relay_sink_stopped", {"sink": "webhook"}) == 1
        )
        ready, why = relay.readiness()
        assert not ready and "sink webhook stopped" in why and "410" in why
    # The receiver saw only the first event; the second never left the relay.
    assert len(receiver.requests) == 1
    letters = dead_letters(settings)
    assert [d["event"]["subject"] for d in letters] == [first, second]
    assert {d["reason"] for d in letters} == {"sink_stopped"}
    assert "410" in letters[0]["error"]
    assert delivered(relay) == 0
    assert any("STOPPED" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


@pytest.mark.parametrize(
    ("status", "headers", "body", "words"),
    [
        (400, {}, "missing field: data.type", ["400 Bad Request", "missing field: data.type"]),
        (404, {}, "no such hook", ["404 Not Found", "no such hook"]),
        (
            302,
            {"Location": "http://127.0.0.1:1/elsewhere"},
            "",
            ["302", "not followed", "/elsewhere"],
        ),
    ],
)
async def test_other_4xx_and_redirects_are_dead_lettered_once(
    engine: PrivateEngine,
    tmp_path: Path,
    receivers: ReceiverFactory,
    status: int,
    headers: dict[str, str],
    body: str,
    words: list[str],
) -> None:
    receiver = await receivers()
    receiver.fail(status, times=1, headers=headers, body=body)
    settings = volume_create_settings(engine, tmp_path, **webhook(receiver))
    async with running_relay(settings) as relay:
        rejected = new_volume(engine)
        await async_wait_for(lambda: dead_letters(settings), 20, message="dead letter")
        accepted = new_volume(engine)  # the sink goes on with the next event
        await async_wait_for(lambda: delivered(relay) == 1, 20, message="delivered")
    [letter] = dead_letters(settings)
    assert letter["reason"] == "permanent" and letter["event"]["subject"] == rejected
    for word in words:
        assert word in letter["error"]
    assert [r.headers["ce-subject"] for r in receiver.requests] == [rejected, accepted]


# -- concurrency, order, partial delivery -------------------------------------------------------


async def test_concurrency_keeps_each_actor_in_order(receivers: ReceiverFactory) -> None:
    receiver = await receivers()
    receiver.slow(0.02)  # long enough that requests overlap
    sink = build(receiver, concurrency=4)
    events = sample_events(80)
    async with started(sink):
        await sink.send(events)
    got = receiver.events()
    assert sorted(e["id"] for e in got) == sorted(e.id for e in events)
    for key in {(e.ce.data.type, e.ce.data.actor.id) for e in events}:
        want = [e.id for e in events if (e.ce.data.type, e.ce.data.actor.id) == key]
        have = [g["id"] for g in got if (g["data"]["type"], g["data"]["actor"]["id"]) == key]
        assert have == want
    assert 2 <= receiver.max_in_flight <= 4


async def test_a_failing_actor_holds_back_only_its_own_events(
    receivers: ReceiverFactory,
) -> None:
    receiver = await receivers()
    receiver.fail(500, times=1)
    sink = build(receiver, concurrency=2)
    events = sample_events(40)
    async with started(sink):
        with pytest.raises(PartialDeliveryError) as info:
            await sink.send(events)
    [refused] = [r for r in receiver.requests if r.status == 500]
    key = next(
        (e.ce.data.type, e.ce.data.actor.id) for e in events if e.id == refused.headers["ce-id"]
    )
    chain = [i for i, e in enumerate(events) if (e.ce.data.type, e.ce.data.actor.id) == key]
    failures = info.value.failures
    assert sorted(failures) == chain
    assert events[chain[0]].id == refused.headers["ce-id"]
    assert all(isinstance(f, RetryableSinkError) for f in failures.values())
    assert len(receiver.requests) == 1 + len(events) - len(chain)
    assert {e["id"] for e in receiver.events()} == {
        e.id for i, e in enumerate(events) if i not in chain
    }


async def test_one_at_a_time_holds_back_everything_after_a_failure(
    receivers: ReceiverFactory,
) -> None:
    receiver = await receivers()
    sink = build(receiver)  # concurrency 1: engine order across actors
    events = sample_events(10)
    async with started(sink):
        await sink.send(events[:3])
        receiver.fail(400, times=1, body="not this one")
        receiver.fail(503, times=1, headers={"Retry-After": "2"})
        with pytest.raises(PartialDeliveryError) as info:
            await sink.send(events[3:])
        await sink.send(events[5:])
    failures = info.value.failures
    assert type(failures[0]) is PermanentSinkError and "not this one" in str(failures[0])
    # Everything after the 503 is held back, to be retried after its Retry-After.
    assert sorted(failures) == list(range(7))
    assert {f.retry_after for f in list(failures.values())[1:]} == {2.0}  # type: ignore[attr-defined]
    assert [e["id"] for e in receiver.events()] == [e.id for e in events[:3] + events[5:]]


async def test_batch_mode_sends_the_batch_as_one_request(receivers: ReceiverFactory) -> None:
    receiver = await receivers()
    sink = build(receiver, mode="batch", max_batch=25)
    events = sample_events(25)
    async with started(sink):
        await sink.send(events)
        receiver.fail(429, times=1, headers={"Retry-After": "7"})
        with pytest.raises(RetryableSinkError) as info:
            await sink.send(events[:3])
    assert info.value.retry_after == 7.0
    assert len(receiver.requests) == 2
    assert receiver.events() == [structured(e) for e in events]


async def test_batch_max_wait_gathers_engine_events_into_one_request(
    engine: PrivateEngine, tmp_path: Path, receivers: ReceiverFactory
) -> None:
    receiver = await receivers()
    settings = volume_create_settings(
        engine, tmp_path, **webhook(receiver, mode="batch", max_batch=5, max_wait=20.0)
    )
    async with running_relay(settings):
        names = [new_volume(engine, "mw") for _ in range(5)]
        got = await receiver.wait_for_events(5)
    # Five volumes created one after the other: one request of five, sent when the batch was
    # full (long before the 20 s wait), in engine order.
    assert len(receiver.requests) == 1
    assert [e["subject"] for e in got] == names


# -- a slow webhook does not delay the others ---------------------------------------------------


async def test_slow_webhook_does_not_hold_back_a_fast_one(
    engine: PrivateEngine, tmp_path: Path, receivers: ReceiverFactory
) -> None:
    slow = await receivers()
    # Held until the fast sink has every event: "slow" as long as the test needs, not for a
    # time that a loaded machine could outlast.
    release = asyncio.Event()
    slow.hold(release)
    fast = await receivers()
    only_volumes = {"types": ["volume"], "actions": ["create"]}
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[
            webhook(slow, name="slow", concurrency=1, filter=only_volumes),
            webhook(fast, name="fast", concurrency=1, filter=only_volumes),
        ],
        drain_timeout=10.0,
    )
    async with running_relay(settings) as relay:
        names = [new_volume(engine, "slowfast") for _ in range(3)]
        await fast.wait_for_events(3, timeout=30)
        # The fast webhook has everything while the slow one still holds its first request.
        assert len(slow.requests) == 1 and delivered(relay, "slow") == 0
        release.set()
        await slow.wait_for_events(3, timeout=30)
        assert delivered(relay, "fast") == 3 and delivered(relay, "slow") == 3
    assert [e["subject"] for e in fast.events()] == names
    assert [e["subject"] for e in slow.events()] == names


# -- the prune scenario and the "fstrim after prune" route --------------------------------------


async def test_prune_events_and_reclaimed_bytes_route(
    engine: PrivateEngine, tmp_path: Path, receivers: ReceiverFactory
) -> None:
    every_prune = await receivers(secret=SECRET.encode())
    big_prunes = await receivers()
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[
            webhook(
                every_prune,
                name="prunes",
                mode="batch",
                secret=SECRET,
                filter={"actions": ["prune"]},
            ),
            webhook(
                big_prunes, name="fstrim", filter={"actions": ["prune"], "min_reclaimed_bytes": MiB}
            ),
        ],
    )
    async with running_relay(settings):
        reported = prune_scenario(engine)
        all_prunes = await every_prune.wait_for_events(len(reported))
        big = [e for e in all_prunes if e["data"]["reclaimed_bytes"] >= MiB]
        await big_prunes.wait_for_events(len(big))
    reclaimed = {e["data"]["type"]: e["data"]["reclaimed_bytes"] for e in all_prunes}
    assert len(all_prunes) == len(reported)
    assert reclaimed == reported  # what the engine said, byte for byte, per type
    assert all(e["data"]["action"] == "prune" for e in all_prunes)
    assert reclaimed["container"] >= 5 * MiB
    assert reclaimed["volume"] >= 5 * MiB
    assert reclaimed["image"] >= 5 * MiB  # the committed layer at least
    assert reclaimed["network"] == 0
    assert all(r.signature_error is None for r in every_prune.requests)
    # The fstrim route got exactly the big prunes, in order, byte counts intact.
    assert big_prunes.events() == big
    assert {e["data"]["type"] for e in big} >= {"container", "volume", "image"}


# -- mTLS ------------------------------------------------------------------------------------


pki = pki_fixture()


async def test_mtls(pki: Pki, receivers: ReceiverFactory) -> None:
    receiver = await receivers(ssl_context=pki.server_context())
    sink = build(receiver, tls=pki.client_tls())
    events = sample_events(5)
    async with started(sink):
        await sink.send(events)
    assert receiver.events() == [structured(e) for e in events]

    # Without the client certificate the server refuses the handshake; trusting the system
    # CAs or another CA, the sink refuses the server. All retryable (fixable without losing
    # the events).
    refused: list[tuple[dict[str, Any] | None, str]] = [
        ({"ca_file": str(pki.ca)}, ""),
        (None, "certificate verify failed"),
        ({}, "certificate verify failed"),
        (pki.client_tls(ca_file=str(pki.other_ca)), "certificate verify failed"),
    ]
    for tls, words in refused:
        sink = build(receiver, **({} if tls is None else {"tls": tls}))
        async with started(sink):
            with pytest.raises(RetryableSinkError) as info:
                await sink.send(events[:1])
        assert words in str(info.value)
    assert len(receiver.requests) == 5


# -- the shared contract -------------------------------------------------------------------------


class TestWebhookContract(SinkContract):
    """Binary mode; the subclasses below run the same contract in the other modes."""

    mode = "binary"
    receiver: Receiver

    @pytest.fixture(autouse=True)
    async def _receiver(self) -> AsyncIterator[None]:
        self.receiver = await Receiver(secret=SECRET.encode()).start()
        self.proxies: list[DelayProxy] = []
        yield
        await self.receiver.aclose()
        for proxy in self.proxies:
            proxy.stop()

    def make_sink(self, url: str | None = None, **settings: Any) -> Sink:
        url = url or self.receiver.url()
        values = {"type": "webhook", "url": url, "mode": self.mode, "secret": SECRET, **settings}
        return WebhookSinkConfig.model_validate(values).build(SinkContext("t"))

    async def _delivered(self, ids: list[str], timeout: float) -> list[Recorded]:  # noqa: ASYNC109
        wanted = set(ids)

        def arrived() -> list[Recorded] | None:
            delivered = self.receiver.delivered()
            got = {e["id"] for r in delivered for e in r.events()}
            return delivered if wanted <= got else None

        result = await async_wait_for(arrived, timeout, message=f"{len(ids)} events")
        assert result is not None
        return result

    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's
    ) -> list[dict[str, Any]]:
        return [e for r in await self._delivered(ids, timeout) for e in r.events()]

    async def read_back_sdk(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's
    ) -> list[CloudEvent]:
        parsed: list[CloudEvent] = []
        for r in await self._delivered(ids, timeout):
            if r.content_type == "application/cloudevents-batch+json":
                # The SDK reads one event per message: each element of the batch is one.
                for element in json.loads(r.body):
                    one = {"content-type": "application/cloudevents+json"}
                    parsed.append(from_http(one, json.dumps(element)))
            else:
                parsed.append(from_http(r.headers, r.body))
        return parsed

    def make_unreachable_sink(self) -> Sink:
        return self.make_sink("http://127.0.0.1:1/hook")

    def make_undeliverable(self, event: Event) -> Event:
        self.receiver.refuse(event.id, 400)
        return event

    async def restart_destination(self) -> None:
        await self.receiver.restart()

    async def make_slow_sink(self, delay: float) -> Sink:
        proxy = DelayProxy(self.receiver.port, delay)
        proxy.start()
        self.proxies.append(proxy)
        return self.make_sink(f"http://127.0.0.1:{proxy.port}/hook")

    def make_secret_sink(self) -> tuple[Sink, list[str]]:
        # A signing secret the receiver does not share: it answers 401 to every request.
        token, secret = f"token-{uuid.uuid4().hex}", f"secret-{uuid.uuid4().hex}"
        return self.make_sink(bearer_token=token, secret=secret), [token, secret]


class TestWebhookContractStructured(TestWebhookContract):
    mode = "structured"


class TestWebhookContractBatch(TestWebhookContract):
    mode = "batch"
    cannot: ClassVar[Mapping[str, str]] = {
        "refuse_one_event": "a batch is one HTTP request, and one status code answers all of "
        "it: a receiver cannot refuse one event of it and take the others (the outbox worker "
        "finds the one by sending them alone: dead_letter_one_event)",
    }
